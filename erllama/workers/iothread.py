"""The worker's IO thread: it alone owns the worker's control and workers sockets.

The main thread does the handshake (``lifecycle.run``) and hands the control
link over to this thread before the model loads; it polls three sockets:

* control DEALER (``ControlLink``): ``Ping`` is answered here with
  ``progress = (active, tokens_total)`` read from the engine, so a hang
  (active, progress frozen) is visible to the supervisor while the compute
  thread is stuck; ``Stop`` becomes a ``StopRequest`` on the inbox.
* workers DEALER (connected once the model is loaded): frames
  ``[client_id, ERL1, body]``. Bad bodies are answered with ``ErrorReply``
  (``malformed`` / ``unsupported_version`` / ``too_large``) at once;
  ``ModelStatus`` is answered from the engine's phase; ``Tokenize`` /
  ``Detokenize`` are answered here when the backend's tokenizer is
  thread-safe (``thread_safe_tokenizer``; llama.cpp tokenization only reads
  the vocab), which keeps the tokenize round trip short even while a request
  is generating; ``Cancel`` is marked in the ``CancelSet`` immediately,
  answered ``ok`` and also queued (the engine then drops queued targets);
  everything else is queued for the engine.
* inproc PAIR from the main thread, frames tagged by their first frame:
  ``REPLY`` ``[client_id, ERL1, body]`` -> workers socket; ``CONTROL``
  ``[ERL1, body]`` -> control socket (Ready / StartFailed); ``CONNECT``
  ``[model_id]`` -> connect the workers socket and push a first
  ``WorkerStatus``; ``QUIT`` -> close the sockets (linger lets the last
  replies out) and end the thread.
"""

from __future__ import annotations

import logging
import threading
from queue import SimpleQueue
from typing import Any

import zmq

from erllama.lifecycle import ControlLink
from erllama.protocol.codec import Decoder, encode, error_reply, peek_request_id, reply
from erllama.protocol.errors import ProtocolError
from erllama.protocol.messages import (
    Cancel,
    ClientRequest,
    Detokenize,
    ModelStatus,
    Msg,
    Stop,
    Tokenize,
    WorkerStatus,
)
from erllama.protocol.sockets import WORKERS_SOCK, ipc_endpoint, make_socket
from erllama.workers import tokenizer_ops
from erllama.workers.backend import ModelBackend
from erllama.workers.engine import CancelSet, Inbound, InboxItem, StopRequest

log = logging.getLogger(__name__)

_BATCH = 256  # messages taken from one socket before looking at the others


class IoThread(threading.Thread):
    """See the module docstring."""

    REPLY = b"R"
    CONTROL = b"C"
    CONNECT = b"W"
    QUIT = b"Q"

    def __init__(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        link: ControlLink,
        run_dir: str,
        pair_endpoint: str,
        inbox: SimpleQueue[InboxItem],
        cancels: CancelSet,
    ) -> None:
        super().__init__(name="erllama-io", daemon=True)
        self._ctx = ctx
        self._link = link
        link.progress = self._progress  # pings are answered here, with the engine's counters
        self._run_dir = run_dir
        self._pair_endpoint = pair_endpoint
        self._inbox = inbox
        self._cancels = cancels
        self._engine: Any = None  # engine.Engine once loaded (phase, active, tokens_total)
        self._backend: ModelBackend | None = None
        self._fast_tokenize = False
        self._decoder: Decoder[ClientRequest] = Decoder(ClientRequest)
        self._workers: zmq.Socket[bytes] | None = None
        self._model_id = ""
        self.bad_messages = 0
        self.crashed = False

    # ------------------------------------------------------------ main-thread API
    def attach(self, engine: Any, backend: ModelBackend) -> None:
        """Share the engine's counters and (if thread-safe) the tokenizer with this thread."""
        self._backend = backend
        self._fast_tokenize = backend.thread_safe_tokenizer
        self._engine = engine

    def detach(self) -> None:
        self._engine = None
        self._fast_tokenize = False
        self._backend = None

    def _progress(self) -> tuple[int, int]:
        eng = self._engine
        if eng is None:
            return 0, 0
        return int(eng.active), int(eng.tokens_total)

    # ------------------------------------------------------------ thread
    def run(self) -> None:
        pair = self._ctx.socket(zmq.PAIR)
        pair.connect(self._pair_endpoint)
        try:
            self._loop(self._link, pair)
        except Exception:
            log.exception("event=io_thread_crashed")
            self.crashed = True  # the worker is deaf: stop now and exit non-zero
            self._inbox.put(StopRequest(drain=False, reason="io_thread_crashed"))
        finally:
            if self._workers is not None:
                self._workers.close()
            self._link.close()
            pair.close(linger=0)

    def _loop(self, link: ControlLink, pair: zmq.Socket[bytes]) -> None:
        poller = zmq.Poller()
        poller.register(link.socket, zmq.POLLIN)
        poller.register(pair, zmq.POLLIN)
        while True:
            for sock, _ in poller.poll():
                if sock is pair:
                    if not self._drain_pair(pair, link, poller):
                        return
                elif sock is link.socket:
                    self._drain_control(link)
                else:
                    self._drain_workers()

    def _drain_pair(self, pair: zmq.Socket[bytes], link: ControlLink, poller: zmq.Poller) -> bool:
        for _ in range(_BATCH):
            try:
                frames = pair.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return True
            tag = frames[0]
            if tag == self.REPLY:
                if self._workers is not None:
                    self._send(frames[1], frames[2:])
            elif tag == self.CONTROL:
                link.socket.send_multipart(frames[1:])
            elif tag == self.CONNECT:
                self._connect(frames[1].decode(), poller)
            elif tag == self.QUIT:
                return False
        return True

    def _connect(self, model_id: str, poller: zmq.Poller) -> None:
        self._model_id = model_id
        self._workers = make_socket(
            self._ctx,
            zmq.DEALER,
            connect=ipc_endpoint(self._run_dir, WORKERS_SOCK),
            identity=model_id.encode(),
        )
        poller.register(self._workers, zmq.POLLIN)
        self._send(b"", encode(WorkerStatus(model=model_id)))

    def _drain_control(self, link: ControlLink) -> None:
        for _ in range(_BATCH):
            try:
                frames = link.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            msg = link.handle(frames)
            if isinstance(msg, Stop):
                self._inbox.put(StopRequest(drain=msg.drain, reason="stop"))
            elif msg is not None:
                log.debug("control message %s ignored", type(msg).__name__)

    def _send(self, client_id: bytes, frames: list[bytes] | list[bytes | memoryview]) -> None:
        assert self._workers is not None
        try:
            self._workers.send_multipart([client_id, *frames], flags=zmq.NOBLOCK)
        except zmq.Again:
            log.warning("event=reply_dropped workers socket full (router gone?)")

    def _answer(self, client_id: bytes, msg: Msg) -> None:
        self._send(client_id, encode(msg))

    def _drain_workers(self) -> None:
        assert self._workers is not None
        for _ in range(_BATCH):
            try:
                frames = self._workers.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                self._on_request(frames)
            except Exception:  # a bad message must never take the IO thread down
                log.exception("request handling failed")

    def _on_request(self, frames: list[bytes]) -> None:
        if len(frames) < 3:
            self.bad_messages += 1
            log.warning("event=bad_frames n=%d dropped (no client id and body)", len(frames))
            return
        cid = frames[0]
        try:
            msg = self._decoder.decode(frames[1:])
        except ProtocolError as exc:
            self.bad_messages += 1
            log.info("event=bad_request code=%s %s", exc.code, exc.message)
            self._answer(cid, error_reply(peek_request_id(frames[2]), exc.code, exc.message))
            return
        if isinstance(msg, ModelStatus):
            eng = self._engine
            self._answer(cid, reply(msg.request_id, eng.phase if eng is not None else "idle"))
        elif isinstance(msg, Tokenize | Detokenize) and self._fast_tokenize:
            self._tokenizer_op(cid, msg)
        elif isinstance(msg, Cancel):
            self._cancels.mark(cid, msg.target)
            self._inbox.put(Inbound(cid, msg))
            if msg.request_id:
                self._answer(cid, reply(msg.request_id, None))
        else:
            self._inbox.put(Inbound(cid, msg))

    def _tokenizer_op(self, cid: bytes, msg: Tokenize | Detokenize) -> None:
        backend = self._backend
        if backend is None:  # detached between the check and here: the engine answers
            self._inbox.put(Inbound(cid, msg))
            return
        self._answer(cid, tokenizer_ops.answer(backend, msg))
