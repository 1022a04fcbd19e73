"""Start and stop a real `erllama serve` for benchmarks (a subprocess with its own run dir)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import erllama


@contextmanager
def running_daemon(
    config_toml: str, *, ready_timeout_s: float = 300.0
) -> Iterator[tuple[str, Path]]:
    """Yield ``(endpoint, run_dir)`` of a daemon started with ``config_toml``; stop it after."""
    with tempfile.TemporaryDirectory(prefix="erllama-bench-") as tmp:
        run_dir = Path(tmp) / "run"
        cfg = Path(tmp) / "erllama.toml"
        cfg.write_text(config_toml)
        env = dict(os.environ, ERLLAMA_RUN_DIR=str(run_dir))
        env.pop("ERLLAMA_ENDPOINT", None)
        log = open(Path(tmp) / "daemon.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "-m", "erllama.cli", "serve", "--config", str(cfg)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        endpoint = f"ipc://{run_dir / 'client.sock'}"
        try:
            deadline = time.monotonic() + ready_timeout_s
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"daemon exited with {proc.returncode}: see {log.name}")
                if (run_dir / "client.sock").exists():
                    try:
                        with erllama.Client(endpoint, timeout=2.0) as c:
                            models = c.list_models()
                        if models and all(m.state == "ready" for m in models):
                            break
                    except erllama.ErllamaError:
                        pass
                if time.monotonic() > deadline:
                    raise TimeoutError("daemon not ready in time")
                time.sleep(0.2)
            yield endpoint, run_dir
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
