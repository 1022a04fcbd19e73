"""CURVE for TCP endpoints: key files, the router's authenticator, the client's options.

DESIGN §2: ``ipc://`` endpoints live in the private (0700) run directory; a TCP
endpoint is opt-in and requires CURVE (pyzmq's ``zmq.auth``), except with the
explicit ``insecure_loopback`` flag, which is refused for a non-loopback host.

Key files are ZeroMQ certificates as ``zmq.auth.create_certificates`` writes
them: ``NAME.key`` holds the public key, ``NAME.key_secret`` both keys.
``erllama keys DIR --name NAME`` makes a pair.

Server side (the router process): ``bind_tcp(ctx, sock, daemon)`` sets the
CURVE server options on the client ROUTER and binds the TCP endpoint (a
``*`` port picks a free one; the log line ``event=tcp_curve endpoint=`` names
it); the
ZAP handler is a ``zmq.auth.thread.ThreadAuthenticator`` in the router's
context whose credentials provider allows exactly the public keys found in
``curve_authorized_dir`` (re-read when the directory changes, so adding a key
needs no restart). A refused key is logged (``event=curve_denied``), at most
once per key per ``DENIED_LOG_INTERVAL_S``: a refused client retries its
handshake every few hundred ms and must not flood the log. The client gets no
reply at all: its request times out.

Options are copied into a listener when it is bound, so the ipc endpoint,
bound before the CURVE options are set, keeps the NULL mechanism.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import zmq
import zmq.auth

if TYPE_CHECKING:
    from zmq.auth.thread import ThreadAuthenticator


class TcpConfigError(ValueError):
    """The TCP / CURVE settings are invalid (``config.validate_config`` re-raises it as
    ``ConfigError``; the protocol package must not import ``config``)."""


log = logging.getLogger(__name__)

ZAP_DOMAIN = "erllama"
DENIED_LOG_INTERVAL_S = 60.0
Z85_KEY_LEN = 40
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


class _TcpSettings(Protocol):
    @property
    def tcp_endpoint(self) -> str | None: ...
    @property
    def curve_server_secret_key(self) -> str | None: ...
    @property
    def curve_authorized_dir(self) -> str | None: ...
    @property
    def insecure_loopback(self) -> bool: ...


# ================================================================ endpoints
def tcp_host(endpoint: str) -> str:
    """The host part of ``tcp://host:port`` (brackets of an IPv6 literal removed).

    Raises:
        TcpConfigError: not a ``tcp://host:port`` endpoint.
    """
    if not endpoint.startswith("tcp://"):
        raise TcpConfigError(f"daemon.tcp_endpoint must be tcp://host:port, got {endpoint!r}")
    rest = endpoint[len("tcp://") :]
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port:
        raise TcpConfigError(f"daemon.tcp_endpoint must be tcp://host:port, got {endpoint!r}")
    if ";" in host:  # zmq's "source;destination" form: the bound address is the destination
        raise TcpConfigError("daemon.tcp_endpoint: the source;address form is not supported")
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def is_loopback(host: str) -> bool:
    """Whether ``host`` names only the loopback interface (``*`` and 0.0.0.0 do not)."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_tcp_settings(daemon: _TcpSettings) -> None:
    """Validate the TCP / CURVE fields of ``DaemonConfig`` (called by ``validate_config``).

    Raises:
        TcpConfigError: naming the field: a TCP endpoint without CURVE keys and
            without ``insecure_loopback``; ``insecure_loopback`` on a host that
            is not loopback; key files or directories that do not exist.
    """
    ep = daemon.tcp_endpoint
    curve = (daemon.curve_server_secret_key, daemon.curve_authorized_dir)
    if ep is None:
        if any(curve) or daemon.insecure_loopback:
            raise TcpConfigError(
                "daemon: CURVE keys and insecure_loopback need daemon.tcp_endpoint"
            )
        return
    host = tcp_host(ep)
    if daemon.insecure_loopback:
        if any(curve):
            raise TcpConfigError("daemon.insecure_loopback and CURVE keys exclude each other")
        if not is_loopback(host):
            raise TcpConfigError(
                f"daemon.insecure_loopback: refused for {ep}: plain TCP only on a loopback "
                "address (127.0.0.1, ::1, localhost); use CURVE keys for any other host"
            )
        return
    secret, authorized = curve
    if not secret or not authorized:
        raise TcpConfigError(
            f"daemon.tcp_endpoint {ep} requires CURVE: set daemon.curve_server_secret_key "
            "and daemon.curve_authorized_dir (`erllama keys DIR` makes key pairs), or "
            "daemon.insecure_loopback = true for a loopback address"
        )
    if not os.path.isfile(secret):
        raise TcpConfigError(f"daemon.curve_server_secret_key: no file {secret}")
    if not os.path.isdir(authorized):
        raise TcpConfigError(f"daemon.curve_authorized_dir: no directory {authorized}")


# ================================================================ key files
def create_key_pair(directory: str | os.PathLike[str], name: str) -> tuple[Path, Path]:
    """Write ``NAME.key`` (public) and ``NAME.key_secret`` (both keys, mode 0600) in
    ``directory`` (created 0700); returns their paths.

    Raises:
        FileExistsError: a key file of that name exists (keys are never overwritten).
    """
    d = Path(directory)
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    public, secret = d / f"{name}.key", d / f"{name}.key_secret"
    for p in (public, secret):
        if p.exists():
            raise FileExistsError(f"{p} exists: keys are never overwritten")
    pub, sec = zmq.auth.create_certificates(str(d), name)
    os.chmod(sec, 0o600)
    return Path(pub), Path(sec)


def load_secret_key(path: str | os.PathLike[str]) -> tuple[bytes, bytes]:
    """``(public, secret)`` z85 keys from a ``.key_secret`` file.

    Raises:
        ValueError: the file holds no secret key.
        OSError: it cannot be read.
    """
    public, secret = zmq.auth.load_certificate(os.fspath(path))
    if not secret:
        raise ValueError(f"{path} holds no secret key (use the .key_secret file)")
    return public, secret


def public_key(value: str | bytes | os.PathLike[str]) -> bytes:
    """A z85 public key given as the key itself (40 characters) or a key file's path."""
    if isinstance(value, bytes | str) and len(value) == Z85_KEY_LEN:
        raw = value.encode() if isinstance(value, str) else value
        if not os.path.exists(os.fsdecode(raw)):
            return raw
    public, _ = zmq.auth.load_certificate(os.fsdecode(os.fspath(value)))
    return public


# ================================================================ client
@dataclass(frozen=True, slots=True)
class ClientCurve:
    """The CURVE options of a client socket (z85 keys)."""

    server_key: bytes
    public_key: bytes
    secret_key: bytes

    def apply(self, sock: zmq.Socket[Any]) -> None:
        """Set before connect."""
        sock.setsockopt(zmq.CURVE_SERVERKEY, self.server_key)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public_key)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret_key)


def client_curve(
    server_key: str | bytes | os.PathLike[str] | None,
    secret_key: str | bytes | os.PathLike[str] | None = None,
    public_key_: str | bytes | None = None,
) -> ClientCurve | None:
    """The client's CURVE options from ``Client(curve_server_key=, curve_secret_key=,
    curve_public_key=)``; None when no server key is given.

    ``secret_key`` is a z85 secret key (then ``public_key_`` is required) or the
    path of a ``.key_secret`` file (which holds both); ``None`` makes a fresh
    ephemeral pair, which a server only accepts if it authorizes any key (it
    does not: erllama's router needs the public key in its authorized dir).

    Raises:
        ValueError: keys are missing or malformed.
        OSError: a key file cannot be read.
    """
    if server_key is None:
        if secret_key is not None or public_key_ is not None:
            raise ValueError("curve_secret_key / curve_public_key need curve_server_key")
        return None
    server = public_key(server_key)
    if secret_key is None:
        pub, sec = zmq.curve_keypair()
    elif (
        isinstance(secret_key, str | bytes)
        and len(secret_key) == Z85_KEY_LEN
        and not os.path.exists(os.fsdecode(secret_key))
    ):
        if public_key_ is None:
            raise ValueError("a z85 curve_secret_key needs curve_public_key")
        sec = secret_key.encode() if isinstance(secret_key, str) else secret_key
        pub = public_key_.encode() if isinstance(public_key_, str) else public_key_
    else:
        pub, sec = load_secret_key(os.fsdecode(os.fspath(secret_key)))
    for name, k in (("server", server), ("public", pub), ("secret", sec)):
        if len(k) != Z85_KEY_LEN:
            raise ValueError(f"CURVE {name} key must be {Z85_KEY_LEN} z85 characters")
    return ClientCurve(server, pub, sec)


# ================================================================ server
class AuthorizedKeys:
    """A ``zmq.auth`` credentials provider: the public keys in a directory.

    The directory is re-read when its mtime changes (a key added or removed
    takes effect on the next handshake).
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self._mtime_ns = -1
        self._keys: frozenset[bytes] = frozenset()
        self._denied_at: dict[bytes, float] = {}
        self.denied = 0
        self._lock = threading.Lock()

    def _refresh(self) -> frozenset[bytes]:
        try:
            mtime = self.directory.stat().st_mtime_ns
        except OSError as exc:
            log.error("event=curve_keys_unreadable dir=%s: %s", self.directory, exc)
            return frozenset()
        if mtime != self._mtime_ns:
            keys = zmq.auth.load_certificates(str(self.directory))
            self._keys = frozenset(k for k, ok in keys.items() if ok)
            self._mtime_ns = mtime
            log.info("event=curve_keys_loaded dir=%s keys=%d", self.directory, len(self._keys))
        return self._keys

    def callback(self, domain: str, key: bytes) -> bool:
        """Called by the authenticator thread for every CURVE handshake."""
        with self._lock:
            if key in self._refresh():
                return True
            self.denied += 1
            now = time.monotonic()
            if now - self._denied_at.get(key, -DENIED_LOG_INTERVAL_S) >= DENIED_LOG_INTERVAL_S:
                self._denied_at[key] = now
                log.warning(
                    "event=curve_denied domain=%s key=%s denied_total=%d",
                    domain,
                    key.decode("ascii", "replace"),
                    self.denied,
                )
            return False


@dataclass(slots=True)
class TcpListener:
    """What ``bind_tcp`` started: stop it when the socket closes."""

    endpoint: str
    authenticator: ThreadAuthenticator | None = None
    keys: AuthorizedKeys | None = None

    def stop(self) -> None:
        if self.authenticator is not None:
            self.authenticator.stop()
            self.authenticator = None


def bind_tcp(ctx: zmq.Context[Any], sock: zmq.Socket[Any], daemon: _TcpSettings) -> TcpListener:
    """Bind ``daemon.tcp_endpoint`` on ``sock`` (after its ipc bind): CURVE server with
    a ZAP authenticator in ``ctx``, or plain TCP on loopback with ``insecure_loopback``.

    Raises:
        TcpConfigError: the settings are invalid (``check_tcp_settings``).
        zmq.ZMQError: the bind failed.
        OSError, ValueError: the server key file cannot be used.
    """
    check_tcp_settings(daemon)
    ep = daemon.tcp_endpoint
    assert ep is not None
    if daemon.insecure_loopback:
        sock.bind(ep)
        ep = _last_endpoint(sock, ep)
        log.warning("event=tcp_insecure endpoint=%s (no CURVE: loopback only)", ep)
        return TcpListener(ep)
    from zmq.auth.thread import ThreadAuthenticator

    assert daemon.curve_server_secret_key and daemon.curve_authorized_dir
    public, secret = load_secret_key(daemon.curve_server_secret_key)
    keys = AuthorizedKeys(daemon.curve_authorized_dir)
    auth = ThreadAuthenticator(ctx, log=logging.getLogger("erllama.auth.zap"))
    auth.start()
    try:
        auth.configure_curve_callback(domain=ZAP_DOMAIN, credentials_provider=keys)
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
        sock.setsockopt_string(zmq.ZAP_DOMAIN, ZAP_DOMAIN)
        sock.bind(ep)
        ep = _last_endpoint(sock, ep)
    except BaseException:
        auth.stop()
        raise
    log.info(
        "event=tcp_curve endpoint=%s server_key=%s authorized_dir=%s",
        ep,
        public.decode("ascii"),
        daemon.curve_authorized_dir,
    )
    return TcpListener(ep, auth, keys)


def _last_endpoint(sock: zmq.Socket[Any], configured: str) -> str:
    """The endpoint really bound (``tcp://127.0.0.1:*`` picks a free port)."""
    last = sock.getsockopt(zmq.LAST_ENDPOINT)
    return last.decode() if isinstance(last, bytes) and last else configured
