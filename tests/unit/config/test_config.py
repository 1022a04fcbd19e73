"""The typed config tree: the documented example loads, bad values name their field."""

from __future__ import annotations

from pathlib import Path

import pytest

from erllama.config import (
    ConfigError,
    ModelSpec,
    PolicyConfig,
    default_config,
    effective_policy,
    load_config,
)

ROOT = Path(__file__).resolve().parents[3]


def test_example_config_loads_and_matches_defaults() -> None:
    cfg = load_config(ROOT / "examples" / "erllama.toml")
    assert [m.id for m in cfg.models] == ["default"]
    default = default_config()
    # the example documents the defaults: same values as the code
    assert cfg.cache == default.cache
    assert cfg.supervisor == default.supervisor
    assert cfg.scheduler == default.scheduler
    assert cfg.models[0] == default.models[0]


def test_no_config_is_the_bundled_model() -> None:
    cfg = load_config(None)
    assert cfg.models[0].id == "default" and cfg.models[0].backend == "llama"
    assert cfg.models[0].model_path is None


@pytest.mark.parametrize(
    ("toml", "needle"),
    [
        ("[supervisor]\nheartbeat_interval_s = 'x'\n", "heartbeat_interval_s"),
        ("[daemon]\nnope = 1\n", "nope"),
        ("[[models]]\nid='a'\ntier='disk'\n", "tier"),
        ("[scheduler]\nhigh_watermark=0.5\nlow_watermark=0.6\n", "watermark"),
        ("[cache.policy]\nmin_tokens=0\n", "min_tokens"),
        ("[cache]\nevict_save_timeout_ms=-1\n", "evict_save_timeout_ms"),
        ("[[models]]\nid='a'\nfingerprint='zz'\n", "fingerprint"),
        ("[[models]]\nid='a'\nkeep_alive_s=nan\n", "keep_alive_s"),
        ("[[models]]\nid='a'\n[models.context_opts]\nn_seq_max=4\nn_batch=4\n", "n_batch"),
        ("[[models]]\nid='a'\n[[models]]\nid='a'\n", "duplicate"),
        ("this is not toml", "erllama.toml"),
    ],
)
def test_bad_values_name_the_field(tmp_path: Path, toml: str, needle: str) -> None:
    p = tmp_path / "erllama.toml"
    p.write_text(toml)
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    assert needle in str(ei.value)


def test_keep_alive_defaults_to_300_and_negative_means_never(tmp_path: Path) -> None:
    assert ModelSpec().keep_alive_s == 300.0
    p = tmp_path / "erllama.toml"
    p.write_text("[[models]]\nid='a'\nkeep_alive_s=-1\n[[models]]\nid='b'\nkeep_alive_s=0\n")
    assert [m.keep_alive_s for m in load_config(p).models] == [-1.0, 0.0]


def test_env_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ERLLAMA_RUN_DIR", str(tmp_path))
    monkeypatch.setenv("ERLLAMA_ENDPOINT", "ipc:///x/y.sock")
    cfg = load_config(None)
    assert cfg.daemon.run_dir == str(tmp_path)
    assert cfg.daemon.endpoint == "ipc:///x/y.sock"


def test_effective_policy_merges_and_validates() -> None:
    spec = ModelSpec(id="m", policy={"min_tokens": 64, "cold_min_tokens": 64})
    p = effective_policy(PolicyConfig(), spec)
    assert p.min_tokens == 64 and p.prefill_chunk_size == 128
    with pytest.raises(ConfigError):
        effective_policy(PolicyConfig(), ModelSpec(id="m", policy={"cold_max_tokens": 1}))
    with pytest.raises(ConfigError):
        effective_policy(PolicyConfig(), ModelSpec(id="m", policy={"bogus": 1}))


@pytest.mark.parametrize(
    ("http", "needle"),
    [
        ("upstreams = ['tcp://10.0.0.2:7100']", "not loopback"),
        ("upstreams = ['udp://x']", "ipc://PATH or tcp://host:port"),
        ("upstreams = ['ipc:///a', 'ipc:///a']", "once"),
        ("upstream_server_keys = { 'tcp://h:1' = 'k' }", "not in upstreams"),
        (
            "upstreams = ['tcp://10.0.0.2:7100']\n"
            "upstream_server_keys = { 'tcp://10.0.0.2:7100' = 'b.key' }",
            "upstream_secret_key",
        ),
        ("upstreams = ['ipc:///a']\nupstream_connect_timeout_s = 0", "connect_timeout"),
        ("routing_policy = 'random'", "routing_policy"),
    ],
)
def test_bad_upstreams_are_refused(tmp_path: Path, http: str, needle: str) -> None:
    p = tmp_path / "erllama.toml"
    p.write_text(f"[http]\n{http}\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    assert needle in str(ei.value)


def test_upstreams_load(tmp_path: Path) -> None:
    p = tmp_path / "erllama.toml"
    p.write_text(
        "[http]\nupstreams = ['tcp://127.0.0.1:7100', 'tcp://10.0.0.2:7100', 'ipc:///r/c.sock']\n"
        "upstream_server_keys = { 'tcp://10.0.0.2:7100' = 'b.key' }\n"
        "upstream_secret_key = 'me.key_secret'\nrouting_policy = 'round_robin'\n"
    )
    http = load_config(p).http
    assert http.upstreams[1] == "tcp://10.0.0.2:7100" and http.routing_policy == "round_robin"
    assert http.upstream_server_keys == {"tcp://10.0.0.2:7100": "b.key"}
