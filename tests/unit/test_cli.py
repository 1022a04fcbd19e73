"""``erllama`` CLI: ``main(argv)`` against the fake router (real ZeroMQ sockets)."""

from __future__ import annotations

import gc
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from erllama import __version__
from erllama.cli import main
from erllama.config import Config
from erllama.protocol.messages import Cancel, Complete, LoadModel, Unload
from erllama.protocol.sockets import ENDPOINT_ENV

from .client.fake_router import FakeRouter, short_dir

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    threads = set(threading.enumerate())
    fds = set(os.listdir("/proc/self/fd"))
    yield
    gc.collect()
    assert [t for t in threading.enumerate() if t not in threads] == []
    assert set(os.listdir("/proc/self/fd")) - fds == set()


@pytest.fixture
def endpoint(tmp_path: Path) -> Iterator[str]:
    with short_dir(tmp_path) as d:
        yield f"ipc://{d / 'client.sock'}"


@pytest.fixture
def router(endpoint: str) -> Iterator[FakeRouter]:
    with FakeRouter(endpoint) as r:
        yield r


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ================================================================ usage
def test_no_verb_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys)
    assert code == 2 and "verb is required" in err


def test_bad_arguments_are_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "complete", "m1")[0] == 2
    assert run(capsys, "frobnicate")[0] == 2
    assert run(capsys, "counters", "--timeout", "-1")[0] == 2


def test_version_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--version")
    assert code == 0 and __version__ in out
    code, out, _ = run(capsys, "complete", "--help")
    assert code == 0 and "--max-tokens" in out and "--endpoint" in out


# ================================================================ serve
@pytest.fixture
def fake_serve(monkeypatch: pytest.MonkeyPatch) -> list[Config]:
    import erllama.logs
    import erllama.supervisor.daemon

    seen: list[Config] = []

    def serve(config: Config) -> int:
        seen.append(config)
        return 3

    monkeypatch.setattr(erllama.supervisor.daemon, "serve", serve)
    monkeypatch.setattr(erllama.logs, "setup", lambda *a, **k: None)
    monkeypatch.delenv("ERLLAMA_RUN_DIR", raising=False)
    monkeypatch.delenv(ENDPOINT_ENV, raising=False)
    return seen


def test_serve_without_config_runs_the_bundled_model(
    capsys: pytest.CaptureFixture[str], fake_serve: list[Config]
) -> None:
    code, _, _ = run(capsys, "serve")
    assert code == 3  # the daemon's exit code
    (cfg,) = fake_serve
    assert [m.id for m in cfg.models] == ["default"]


def test_serve_with_config_and_overrides(
    capsys: pytest.CaptureFixture[str], fake_serve: list[Config], tmp_path: Path
) -> None:
    path = tmp_path / "erllama.toml"
    path.write_text('[[models]]\nid = "s"\nbackend = "stub"\n')
    code, _, _ = run(
        capsys,
        "serve",
        "--config",
        str(path),
        "--run-dir",
        str(tmp_path / "run"),
        "--endpoint",
        "ipc:///tmp/x.sock",
    )
    assert code == 3
    (cfg,) = fake_serve
    assert [(m.id, m.backend) for m in cfg.models] == [("s", "stub")]
    assert cfg.daemon.run_dir == str(tmp_path / "run")
    assert cfg.daemon.endpoint == "ipc:///tmp/x.sock"


def test_serve_with_a_bad_config(
    capsys: pytest.CaptureFixture[str], fake_serve: list[Config], tmp_path: Path
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[daemon]\nbogus = 1\n")
    code, _, err = run(capsys, "serve", "--config", str(path))
    assert code == 1 and err.startswith("error: bad_config: ") and "bogus" in err
    code, _, err = run(capsys, "serve", "--config", str(tmp_path / "missing.toml"))
    assert code == 1 and "error: bad_config: " in err
    assert fake_serve == []


# ================================================================ load / unload / models
def test_load_from_a_toml_model_table(
    capsys: pytest.CaptureFixture[str], router: FakeRouter, endpoint: str, tmp_path: Path
) -> None:
    path = tmp_path / "model.toml"
    path.write_text('[model]\nid = "x"\nbackend = "stub"\nmodel_path = "m.gguf"\n')
    code, out, _ = run(capsys, "load", str(path), "--endpoint", endpoint)
    assert (code, out) == (0, "x\n")
    (load,) = router.of_type(LoadModel)
    assert load.model_id == "x"
    assert load.config == {"backend": "stub", "model_path": str(tmp_path / "m.gguf")}


@pytest.mark.parametrize(
    "text",
    ['[[models]]\nbackend = "stub"\n', 'backend = "stub"\n'],
    ids=["models-array", "top-level"],
)
def test_load_accepts_other_toml_shapes(
    capsys: pytest.CaptureFixture[str],
    router: FakeRouter,
    endpoint: str,
    tmp_path: Path,
    text: str,
) -> None:
    path = tmp_path / "model.toml"
    path.write_text(text)
    code, out, _ = run(capsys, "load", str(path), "--id", "y", "--endpoint", endpoint)
    assert (code, out) == (0, "y\n")
    (load,) = router.of_type(LoadModel)
    assert (load.model_id, load.config) == ("y", {"backend": "stub"})


def test_load_from_flags(
    capsys: pytest.CaptureFixture[str],
    router: FakeRouter,
    endpoint: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.chdir(tmp_path)
    argv = ["load", "--backend", "stub", "--model-path", "w.gguf", "--n-ctx", "512"]
    code, out, _ = run(capsys, *argv, "--endpoint", endpoint)
    assert (code, out) == (0, "erllama_model_1\n")
    (load,) = router.of_type(LoadModel)
    assert load.model_id is None
    assert load.config == {
        "backend": "stub",
        "model_path": str(tmp_path / "w.gguf"),
        "context_opts": {"n_ctx": 512},
    }


def test_load_refuses_files_with_several_models(
    capsys: pytest.CaptureFixture[str], router: FakeRouter, endpoint: str, tmp_path: Path
) -> None:
    path = tmp_path / "two.toml"
    path.write_text('[[models]]\nid = "a"\n[[models]]\nid = "b"\n')
    code, _, err = run(capsys, "load", str(path), "--endpoint", endpoint)
    assert code == 1 and err.startswith("error: bad_config: ") and "one model table" in err
    path.write_text("not toml ===")
    assert run(capsys, "load", str(path), "--endpoint", endpoint)[0] == 1
    assert router.of_type(LoadModel) == []


def test_load_conflict_is_reported(
    capsys: pytest.CaptureFixture[str], router: FakeRouter, endpoint: str
) -> None:
    code, out, err = run(capsys, "load", "--backend", "stub", "--id", "m1", "--endpoint", endpoint)
    assert (code, out) == (1, "")
    assert err == "error: already_loaded: model 'm1' is loaded\n"


def test_unload(capsys: pytest.CaptureFixture[str], router: FakeRouter, endpoint: str) -> None:
    assert run(capsys, "unload", "m1", "--endpoint", endpoint) == (0, "", "")
    code, _, err = run(capsys, "unload", "m1", "--endpoint", endpoint)
    assert code == 1 and err.startswith("error: not_found: ")
    assert [u.model for u in router.of_type(Unload)] == ["m1", "m1"]


def test_models_table(
    capsys: pytest.CaptureFixture[str], router: FakeRouter, endpoint: str
) -> None:
    code, out, _ = run(capsys, "models", "--endpoint", endpoint)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == [
        "ID",
        "STATE",
        "PHASE",
        "PENDING",
        "BACKEND",
        "CTX",
        "QUANT",
        "TIER",
        "RESTARTS",
        "LAST",
        "EXIT",
    ]
    assert lines[1].split() == ["m1", "ready", "idle", "0", "stub", "4096", "f16", "ram", "0", "-"]
    assert len(lines) == 5


# ================================================================ complete
def test_complete_streams_tokens_then_stats(
    capsys: pytest.CaptureFixture[str], router: FakeRouter, endpoint: str
) -> None:
    argv = ["complete", "m1", "hi", "--max-tokens", "3", "--temperature", "0.7", "--seed", "5"]
    code, out, err = run(capsys, *argv, "--stop", "END", "STOP", "--endpoint", endpoint)
    assert code == 0
    assert out == "t100 t101 t102 \n"
    assert err == (
        "[cache cold | prompt 2 tok | completion 3 tok | prefill 1.5 ms | 150.0 tok/s"
        " | finish length]\n"
    )
    (req,) = router.of_type(Complete)
    assert req.mode == "stream" and req.prompt == "hi"
    o = req.options
    assert (o.response_tokens, o.temperature, o.seed) == (3, 0.7, 5)
    assert o.stop_sequences == ["END", "STOP"]


def test_complete_error_mid_stream(
    capsys: pytest.CaptureFixture[str], router: FakeRouter, endpoint: str
) -> None:
    code, out, err = run(capsys, "complete", "crash", "hi", "--endpoint", endpoint)
    assert code == 1
    assert out == "a\n"  # what arrived, then a clean line end
    assert err == "error: worker_crashed: the model process died\n"


def test_complete_interrupted_cancels(
    capsys: pytest.CaptureFixture[str],
    router: FakeRouter,
    endpoint: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import erllama.cli

    real_out = erllama.cli._out

    def out_then_interrupt(text: str) -> None:
        real_out(text)
        if text == "a":
            raise KeyboardInterrupt

    monkeypatch.setattr(erllama.cli, "_out", out_then_interrupt)
    code, out, err = run(capsys, "complete", "hold", "hi", "--endpoint", endpoint)
    assert code == 130 and out == "a\n" and "interrupted" in err
    (req,) = router.of_type(Complete)
    router.wait_for(lambda m: isinstance(m, Cancel) and m.target == req.request_id)


# ================================================================ status / counters
def test_status(capsys: pytest.CaptureFixture[str], router: FakeRouter, endpoint: str) -> None:
    code, out, _ = run(capsys, "status", "--endpoint", endpoint)
    assert code == 0
    assert out.startswith("daemon pid 7, run dir /run/x\n")
    assert "m1" in out and "hold" in out
    tier_lines = [line.split() for line in out.splitlines() if line.startswith("ram ")]
    assert tier_lines == [["ram", "10", "B", "100", "B", "10.0%", "1", "/dev/shm/x"]]


def test_counters(capsys: pytest.CaptureFixture[str], router: FakeRouter, endpoint: str) -> None:
    expected = (0, "hits_exact 3\nsaves_cold 1\n", "")
    assert run(capsys, "counters", "--endpoint", endpoint) == expected


def test_endpoint_from_the_environment(
    capsys: pytest.CaptureFixture[str],
    router: FakeRouter,
    endpoint: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(ENDPOINT_ENV, endpoint)
    assert run(capsys, "counters")[0] == 0


def test_unreachable_daemon(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with short_dir(tmp_path) as d:
        code, out, err = run(capsys, "models", "--endpoint", f"ipc://{d / 'none.sock'}")
    assert (code, out) == (1, "")
    assert err.startswith("error: daemon_unavailable: no daemon at ipc://")


def test_timeout_option(
    capsys: pytest.CaptureFixture[str], router: FakeRouter, endpoint: str
) -> None:
    argv = ["complete", "silent", "x", "--timeout", "0.2"]
    code, _, err = run(capsys, *argv, "--endpoint", endpoint)
    assert code == 1 and err.startswith("error: timeout: ")


def test_status_of_several_daemons(
    capsys: pytest.CaptureFixture[str], router: FakeRouter, endpoint: str, tmp_path: Path
) -> None:
    router.handler.counter_values.update({"misses": 2, "remote_hits": 5, "remote_bytes": 9})
    (tmp_path / "b").mkdir()
    with short_dir(tmp_path / "b") as d, FakeRouter(f"ipc://{d / 'b.sock'}") as other:
        code, out, _ = run(capsys, "status", "--endpoint", endpoint, "--endpoint", other.endpoint)
        assert code == 0
        sections = out.split("== ")[1:]
        assert [s.splitlines()[0] for s in sections] == [endpoint, other.endpoint]
        assert "cache: hits_exact=3 misses=2 remote_bytes=9 remote_hits=5\n" in sections[0]
        assert "cache: hits_exact=3\n" in sections[1]
        gone = f"ipc://{d / 'gone.sock'}"
        code, out, _ = run(capsys, "status", "--endpoint", other.endpoint, "--endpoint", gone)
    assert code == 1
    assert f"== {gone}\nunreachable: daemon_unavailable: " in out
    assert out.startswith(f"== {other.endpoint}\ndaemon pid 7")


def test_status_curve_keys_pair_with_tcp_endpoints(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(
        capsys,
        "status",
        "--endpoint", "tcp://127.0.0.1:1",
        "--endpoint", "tcp://127.0.0.1:2",
        "--curve-server-key", "a" * 40,
        "--curve-server-key", "b" * 40,
        "--curve-server-key", "c" * 40,
    )  # fmt: skip
    assert code == 1 and "3 --curve-server-key for 2 tcp:// endpoints" in err
