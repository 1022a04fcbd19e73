"""The client library: ``Client`` (blocking) and ``AsyncClient`` (asyncio), twins.

Both speak to the daemon's client endpoint over ZeroMQ and have the same
methods (``close`` / ``aclose`` aside). What they share that does no IO is
in ``_core`` (replies, exchanges, deadlines), ``requests`` and ``options``
(building and checking requests), ``pending`` (the pending-request table)
and ``base`` (the twins' common half); ``models`` holds the value types.
``ClusterClient`` / ``AsyncClusterClient`` (``cluster``, ``cluster_aio``) route generation over
several daemons with the pure chooser of ``routing``.
This package imports only ``erllama.protocol``.
"""

from erllama.client.aio import AsyncClient as AsyncClient
from erllama.client.aio import AsyncStream as AsyncStream
from erllama.client.cluster import ClusterClient as ClusterClient
from erllama.client.cluster import ClusterStream as ClusterStream
from erllama.client.cluster_aio import AsyncClusterClient as AsyncClusterClient
from erllama.client.cluster_aio import AsyncClusterStream as AsyncClusterStream
from erllama.client.models import ClientState as ClientState
from erllama.client.models import Completion as Completion
from erllama.client.models import Event as Event
from erllama.client.models import EventKind as EventKind
from erllama.client.models import Timeout as Timeout
from erllama.client.sync import Client as Client
from erllama.client.sync import Stream as Stream

__all__ = [
    "AsyncClient",
    "AsyncClusterClient",
    "AsyncClusterStream",
    "AsyncStream",
    "Client",
    "ClientState",
    "ClusterClient",
    "ClusterStream",
    "Completion",
    "Event",
    "EventKind",
    "Stream",
    "Timeout",
]
