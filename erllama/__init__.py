"""erllama: a supervised llama.cpp inference daemon with a token-exact KV-state cache.

The public surface: ``Client`` / ``AsyncClient`` and what they return,
``ClusterClient`` / ``AsyncClusterClient`` (generation routed over several daemons), and
the exception tree (catch ``ErllamaError`` for everything; ``.code`` /
``.reason`` is the stable error code).
"""

from erllama.client import AsyncClient as AsyncClient
from erllama.client import AsyncClusterClient as AsyncClusterClient
from erllama.client import AsyncClusterStream as AsyncClusterStream
from erllama.client import AsyncStream as AsyncStream
from erllama.client import Client as Client
from erllama.client import ClientState as ClientState
from erllama.client import ClusterClient as ClusterClient
from erllama.client import ClusterStream as ClusterStream
from erllama.client import Completion as Completion
from erllama.client import Event as Event
from erllama.client import Stream as Stream
from erllama.client import Timeout as Timeout
from erllama.protocol.errors import ConflictError as ConflictError
from erllama.protocol.errors import DaemonUnavailableError as DaemonUnavailableError
from erllama.protocol.errors import ErllamaError as ErllamaError
from erllama.protocol.errors import ErrorCode as ErrorCode
from erllama.protocol.errors import InternalError as InternalError
from erllama.protocol.errors import InvalidRequestError as InvalidRequestError
from erllama.protocol.errors import ModelLoadError as ModelLoadError
from erllama.protocol.errors import NotSupportedError as NotSupportedError
from erllama.protocol.errors import ProtocolError as ProtocolError
from erllama.protocol.errors import RequestError as RequestError
from erllama.protocol.errors import RequestTimeoutError as RequestTimeoutError
from erllama.protocol.errors import TransportError as TransportError
from erllama.protocol.errors import UnknownModelError as UnknownModelError
from erllama.protocol.errors import WorkerCrashedError as WorkerCrashedError
from erllama.protocol.messages import CacheDelta as CacheDelta
from erllama.protocol.messages import CacheHit as CacheHit
from erllama.protocol.messages import DaemonStatus as DaemonStatus
from erllama.protocol.messages import ModelInfo as ModelInfo
from erllama.protocol.messages import SchedulerAction as SchedulerAction
from erllama.protocol.messages import SchedulerCheck as SchedulerCheck
from erllama.protocol.messages import SchedulerStatus as SchedulerStatus
from erllama.protocol.messages import Stats as Stats
from erllama.protocol.messages import TierUsage as TierUsage

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "AsyncClusterClient",
    "AsyncClusterStream",
    "AsyncStream",
    "CacheDelta",
    "CacheHit",
    "Client",
    "ClientState",
    "ClusterClient",
    "ClusterStream",
    "Completion",
    "ConflictError",
    "DaemonStatus",
    "DaemonUnavailableError",
    "ErllamaError",
    "ErrorCode",
    "Event",
    "InternalError",
    "InvalidRequestError",
    "ModelInfo",
    "ModelLoadError",
    "NotSupportedError",
    "ProtocolError",
    "RequestError",
    "RequestTimeoutError",
    "SchedulerAction",
    "SchedulerCheck",
    "SchedulerStatus",
    "Stats",
    "Stream",
    "TierUsage",
    "Timeout",
    "TransportError",
    "UnknownModelError",
    "WorkerCrashedError",
    "__version__",
]
