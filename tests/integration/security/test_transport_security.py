"""Transport security (DESIGN §2): a private run directory, CURVE on TCP, plain TCP
only on loopback with an explicit flag.

* ipc endpoints live in a 0700 run directory owned by the daemon's user.
* ``daemon.tcp_endpoint`` with CURVE: a client whose public key is in
  ``curve_authorized_dir`` is served over TCP; a client with another key, or
  without CURVE, gets no reply (its request times out) and the router logs
  ``event=curve_denied`` with the refused key. The ipc endpoint on the same
  socket keeps working without keys.
* ``insecure_loopback``: plain TCP on 127.0.0.1 works; on any other address the
  configuration is refused, and a daemon given one does not start.
* ``erllama keys DIR`` writes key pairs (the secret file 0600).
"""

from __future__ import annotations

import re
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import erllama
from erllama.cli import main as cli_main
from erllama.config import DaemonConfig
from erllama.protocol.auth import TcpConfigError, check_tcp_settings, create_key_pair, public_key
from erllama.protocol.messages import ListModels, Reply
from tests.support.daemon import REPO, Daemon, DaemonFactory, stub_model, write_config

pytestmark = pytest.mark.timeout(60)

DENIED = (erllama.DaemonUnavailableError, erllama.RequestTimeoutError)
DENIED_TIMEOUT = erllama.Timeout(request=1.5, connect=1.5, stream_idle=1.5)


def tcp_endpoint_of(d: Daemon, kind: str = "tcp_curve") -> str:
    m = re.search(rf"event={kind} endpoint=(tcp://\S+)", d.log_path.read_text())
    assert m, d.log_tail()
    return m.group(1)


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    kdir = tmp_path / "keys"
    out: dict[str, Path] = {"dir": kdir}
    for name in ("server", "client", "intruder"):
        out[name], out[f"{name}_secret"] = create_key_pair(kdir, name)
    authorized = tmp_path / "authorized"
    authorized.mkdir(mode=0o700)
    (authorized / "client.key").write_bytes(out["client"].read_bytes())
    out["authorized"] = authorized
    return out


def curve_daemon(factory: DaemonFactory, keys: dict[str, Path]) -> Daemon:
    return factory(
        [stub_model("m1")],
        daemon={
            "tcp_endpoint": "tcp://127.0.0.1:*",
            "curve_server_secret_key": str(keys["server_secret"]),
            "curve_authorized_dir": str(keys["authorized"]),
        },
    )


def test_ipc_endpoints_live_in_a_private_run_dir(daemon: Daemon) -> None:
    st = daemon.run_dir.stat()
    assert stat.S_IMODE(st.st_mode) == 0o700
    socks = sorted(p.name for p in daemon.run_dir.iterdir() if p.name.endswith(".sock"))
    assert {"client.sock", "control.sock", "workers.sock", "meta.sock"} <= set(socks)
    for name in socks:
        assert (daemon.run_dir / name).stat().st_uid == st.st_uid


def test_curve_client_is_served_and_others_get_no_reply(
    daemon_factory: DaemonFactory, keys: dict[str, Path]
) -> None:
    d = curve_daemon(daemon_factory, keys)
    ep = tcp_endpoint_of(d)
    assert ep.startswith("tcp://127.0.0.1:")
    with erllama.Client(
        ep,
        timeout=10,
        curve_server_key=keys["server"],
        curve_secret_key=keys["client_secret"],
    ) as c:
        assert [m.id for m in c.list_models()] == ["m1"]
        assert c.complete("m1", "over tcp", response_tokens=4).reply
    # the same keys given as z85 strings
    server_z85 = public_key(keys["server"]).decode()
    pub, sec = erllama_keys(keys["client_secret"])
    with erllama.Client(
        ep, timeout=10, curve_server_key=server_z85, curve_secret_key=sec, curve_public_key=pub
    ) as c:
        assert c.list_models()
    # a key that is not authorized: no reply at all, the client raises (never hangs)
    with (
        erllama.Client(
            ep,
            timeout=DENIED_TIMEOUT,
            curve_server_key=keys["server"],
            curve_secret_key=keys["intruder_secret"],
        ) as bad,
        pytest.raises((erllama.DaemonUnavailableError, erllama.RequestTimeoutError)),
    ):
        bad.list_models()
    # no CURVE at all: the handshake cannot even start
    with erllama.Client(ep, timeout=DENIED_TIMEOUT) as plain, pytest.raises(DENIED):
        plain.list_models()
    intruder = public_key(keys["intruder"]).decode()
    log = d.log_path.read_text()
    assert f"event=curve_denied domain=erllama key={intruder}" in log, d.log_tail()
    # the ipc endpoint on the same socket still needs no keys
    assert isinstance(d.client().call(ListModels()), Reply)


def erllama_keys(secret_file: Path) -> tuple[str, str]:
    import zmq.auth

    pub, sec = zmq.auth.load_certificate(str(secret_file))
    assert sec is not None
    return pub.decode(), sec.decode()


def test_a_key_added_to_the_authorized_dir_works_without_restart(
    daemon_factory: DaemonFactory, keys: dict[str, Path]
) -> None:
    d = curve_daemon(daemon_factory, keys)
    ep = tcp_endpoint_of(d)
    args: dict[str, Any] = {
        "curve_server_key": keys["server"],
        "curve_secret_key": keys["intruder_secret"],
    }
    with erllama.Client(ep, timeout=DENIED_TIMEOUT, **args) as bad, pytest.raises(DENIED):
        bad.list_models()
    (keys["authorized"] / "intruder.key").write_bytes(keys["intruder"].read_bytes())
    with erllama.Client(ep, timeout=10, **args) as ok:
        assert ok.list_models()


def test_plain_tcp_only_with_the_insecure_flag_on_loopback(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    with pytest.raises(TcpConfigError, match="requires CURVE"):
        check_tcp_settings(DaemonConfig(tcp_endpoint="tcp://127.0.0.1:5555"))
    for host in ("0.0.0.0", "*", "10.1.2.3", "[::]", "example.org"):
        with pytest.raises(TcpConfigError, match="insecure_loopback: refused"):
            check_tcp_settings(
                DaemonConfig(tcp_endpoint=f"tcp://{host}:5555", insecure_loopback=True)
            )
    for host in ("127.0.0.1", "127.0.0.2", "[::1]", "localhost"):
        check_tcp_settings(DaemonConfig(tcp_endpoint=f"tcp://{host}:5555", insecure_loopback=True))
    # a daemon given a non-loopback insecure endpoint refuses to start
    cfg = write_config(
        tmp_path / "bad.toml",
        {
            "models": [stub_model("m1")],
            "daemon": {
                "run_dir": str(tmp_path / "run"),
                "tcp_endpoint": "tcp://0.0.0.0:*",
                "insecure_loopback": True,
            },
        },
    )
    proc = subprocess.run(
        [sys.executable, "-m", "erllama.supervisor", "--config", str(cfg)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode != 0
    assert "insecure_loopback: refused" in proc.stdout + proc.stderr
    # on loopback, plain TCP is served
    d = daemon_factory(
        [stub_model("m1")],
        daemon={"tcp_endpoint": "tcp://127.0.0.1:*", "insecure_loopback": True},
    )
    ep = tcp_endpoint_of(d, "tcp_insecure")
    with erllama.Client(ep, timeout=10) as c:
        assert c.complete("m1", "plain", response_tokens=3).reply


def test_keys_verb_and_cli_over_curve(
    daemon_factory: DaemonFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kdir = tmp_path / "k"
    assert cli_main(["keys", str(kdir)]) == 0
    out = capsys.readouterr().out
    assert "server public_key=" in out and "client public_key=" in out
    assert stat.S_IMODE(kdir.stat().st_mode) == 0o700
    assert stat.S_IMODE((kdir / "client.key_secret").stat().st_mode) == 0o600
    assert cli_main(["keys", str(kdir), "--name", "client"]) == 1  # never overwritten
    authorized = tmp_path / "auth"
    authorized.mkdir()
    (authorized / "client.key").write_bytes((kdir / "client.key").read_bytes())
    d = daemon_factory(
        [stub_model("m1")],
        daemon={
            "tcp_endpoint": "tcp://127.0.0.1:*",
            "curve_server_secret_key": str(kdir / "server.key_secret"),
            "curve_authorized_dir": str(authorized),
        },
    )
    ep = tcp_endpoint_of(d)
    capsys.readouterr()
    argv = ["models", "--endpoint", ep, "--timeout", "10"]
    argv += ["--curve-server-key", str(kdir / "server.key")]
    argv += ["--curve-secret-key", str(kdir / "client.key_secret")]
    assert cli_main(argv) == 0
    assert "m1" in capsys.readouterr().out
