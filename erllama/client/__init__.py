"""The client library: ``Client`` (blocking) and ``AsyncClient`` (asyncio), twins.

Both speak to the daemon's client endpoint over ZeroMQ and have the same
methods (``close`` / ``aclose`` aside); ``_core`` holds everything they
share that does no IO. This package imports only ``erllama.protocol``.
"""

from erllama.client._core import ClientState as ClientState
from erllama.client._core import Completion as Completion
from erllama.client._core import Event as Event
from erllama.client._core import EventKind as EventKind
from erllama.client._core import Timeout as Timeout
from erllama.client.aio import AsyncClient as AsyncClient
from erllama.client.aio import AsyncStream as AsyncStream
from erllama.client.sync import Client as Client
from erllama.client.sync import Stream as Stream

__all__ = [
    "AsyncClient",
    "AsyncStream",
    "Client",
    "ClientState",
    "Completion",
    "Event",
    "EventKind",
    "Stream",
    "Timeout",
]
