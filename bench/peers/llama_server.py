"""llama.cpp's ``llama-server`` on loopback, talked to with the standard library only.

The binary comes from ``bench/build_llama_server.sh`` (the llama.cpp vendored
in the llama-cpp-python 0.3.36 sdist, built portable). It runs with the
bundled GGUF and, by default::

    --swa-full --cache-ram 8192 -np 2 -c 8192 --kv-unified -t 2 -tb 2 --no-webui

(``--kv-unified``: the two slots share the 8192 cells, so one slot can hold
an 8k conversation, like an erllama worker with ``n_ctx = 8192``.)

Requests: ``POST /completion`` with ``"prompt": [token ids]``,
``"stream": true``, ``"cache_prompt": true``, ``"n_predict": N``,
``"temperature": 0`` (greedy), ``"return_tokens": true``; the server-sent
events are read line by line with ``http.client`` (the server closes the
connection after a streamed response, so each completion opens a new loopback
connection, inside the timed span, as any HTTP client would).
TTFT is the time from sending the request to the first event that carries a
token. The last event's ``timings.cache_n`` (prompt tokens the server did not
recompute) is reported as the hit.

``stop()`` sends SIGTERM, waits, then SIGKILL: the server never outlives the
benchmark (it is also started in its own session so a stray one is easy to
find by its recorded pid).
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import Gen, Peer, free_port, model_path, now

HERE = Path(__file__).resolve().parent.parent
DEFAULT_BINARY = HERE / ".cache" / "llama-server" / "bin" / "llama-server"


def binary_path() -> Path:
    """The built binary (run ``bench/build_llama_server.sh`` if it is missing)."""
    if not DEFAULT_BINARY.exists():
        subprocess.run([str(HERE / "build_llama_server.sh")], check=True, stdout=subprocess.DEVNULL)
    return DEFAULT_BINARY


def version() -> str:
    """``llama-server --version`` (version and commit of the vendored llama.cpp)."""
    if not DEFAULT_BINARY.exists():
        return "not built yet (bench/build_llama_server.sh)"
    try:
        out = subprocess.run(
            [str(DEFAULT_BINARY), "--version"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unknown ({exc})"
    lines = [ln.strip() for ln in (out.stdout + out.stderr).splitlines() if ln.strip()]
    keep = [ln for ln in lines if ln.startswith("version") or "built with" in ln]
    return "; ".join(keep or lines[-2:])


class LlamaServer(Peer):
    name = "llama-server"

    def __init__(
        self,
        *,
        n_ctx: int = 8192,
        n_parallel: int = 2,
        n_threads: int = 2,
        cache_ram_mib: int = 8192,
        extra_args: list[str] | None = None,
        log_path: Path | None = None,
    ) -> None:
        self.n_ctx = n_ctx
        self.n_parallel = n_parallel
        self.n_threads = n_threads
        self.cache_ram_mib = cache_ram_mib
        self.extra_args = extra_args or []
        self.log_path = log_path or (HERE / ".cache" / "llama-server.log")
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.conn: http.client.HTTPConnection | None = None
        self.slot: int | None = None  # pin requests to a slot (None: the server chooses)

    # ------------------------------------------------------------------ process
    def args(self) -> list[str]:
        return [
            str(binary_path()),
            "-m",
            model_path(),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "-c",
            str(self.n_ctx),
            "-np",
            str(self.n_parallel),
            "--kv-unified",
            "-t",
            str(self.n_threads),
            "-tb",
            str(self.n_threads),
            "--swa-full",
            "--cache-ram",
            str(self.cache_ram_mib),
            "--no-webui",
            *self.extra_args,
        ]

    def start(self, ready_timeout_s: float = 120.0) -> None:
        self.port = free_port()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            self.args(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + ready_timeout_s
        try:
            while True:
                if self.proc.poll() is not None:
                    tail = self.log_path.read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"llama-server exited with {self.proc.returncode}:\n{tail}")
                try:
                    probe = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2.0)
                    probe.request("GET", "/health")
                    status = probe.getresponse().status
                    probe.close()
                    if status == 200:
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError("llama-server not ready in time")
                time.sleep(0.2)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        self._drop_conn()
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    # ------------------------------------------------------------------ http
    def _conn(self) -> http.client.HTTPConnection:
        if self.conn is None:
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        return self.conn

    def _drop_conn(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def _request(self, method: str, path: str, body: dict[str, Any] | None) -> tuple[int, Any]:
        conn = self._conn()
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data else {}
        try:
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
        except (http.client.RemoteDisconnected, ConnectionError):
            self._drop_conn()
            conn = self._conn()
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
        raw = resp.read()
        if resp.will_close:
            self._drop_conn()
        try:
            return resp.status, json.loads(raw) if raw else None
        except json.JSONDecodeError:
            return resp.status, raw

    def tokenize(self, text: str) -> list[int]:
        status, out = self._request("POST", "/tokenize", {"content": text})
        assert status == 200, out
        return list(out["tokens"])

    def gen(
        self,
        tokens: list[int],
        n_tokens: int = 1,
        *,
        extra: dict[str, Any] | None = None,
        on_token: Callable[[], None] | None = None,
    ) -> Gen:
        """One streamed completion; ``extra`` adds body fields, ``on_token`` runs per token."""
        body: dict[str, Any] = {
            "prompt": list(tokens),
            "stream": True,
            "cache_prompt": True,
            "n_predict": n_tokens,
            "temperature": 0.0,
            "return_tokens": True,
        }
        if self.slot is not None:
            body["id_slot"] = self.slot
        body.update(extra or {})
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        for attempt in range(2):
            conn = self._conn()
            t0 = now()
            try:
                conn.request("POST", "/completion", body=data, headers=headers)
                resp = conn.getresponse()
                break
            except (http.client.RemoteDisconnected, ConnectionError):
                self._drop_conn()  # a kept-alive connection the server had closed: retry once
                if attempt:
                    raise
        if resp.status != 200:
            raise RuntimeError(f"llama-server: HTTP {resp.status}: {resp.read()[:500]!r}")
        first = None
        out: list[int] = []
        timings: dict[str, Any] = {}
        while True:
            line = resp.readline()
            if not line:
                break
            if not line.startswith(b"data: "):
                continue
            payload = line[6:].strip()
            if payload == b"[DONE]":
                break
            ev = json.loads(payload)
            toks = ev.get("tokens") or []
            if (toks or ev.get("content")) and first is None:
                first = now() - t0
            out.extend(toks)
            if on_token is not None:
                for _ in toks:
                    on_token()
            if ev.get("stop"):
                timings = ev.get("timings") or {}
                break
        resp.read()  # drain the rest of the chunked body so the connection can be reused
        total = now() - t0
        if resp.will_close:  # the server closes streamed responses: reconnect next time
            self._drop_conn()
        if first is None:
            first = total
        hit = f"cache_n={timings.get('cache_n', '?')}/prompt_n={timings.get('prompt_n', '?')}"
        info = {k: timings[k] for k in ("cache_n", "prompt_n", "prompt_ms") if k in timings}
        return Gen(first, total, out, hit, info)

    def clobber(self, tokens: list[int]) -> None:
        self.gen(tokens, 1)
