"""The remote tier's options: a good URL loads, a bad one is a ConfigError naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from erllama.cache.remote_io import redact
from erllama.cache.tiers import TierLayout
from erllama.config import ConfigError, load_config

RAM = '[[cache.tiers]]\nname = "ram"\n'


def load(tmp_path: Path, remote: str, local: str = RAM) -> object:
    p = tmp_path / "erllama.toml"
    p.write_text(f'{local}[[cache.tiers]]\nname = "remote"\n{remote}')
    return load_config(p)


@pytest.mark.parametrize(
    "url",
    ["redis://127.0.0.1:6379/0", "rediss://:secret@cache.example:6380/2", "redis://valkey"],
)
def test_good_urls_load(tmp_path: Path, url: str) -> None:
    cfg = load(tmp_path, f'url = "{url}"\n')
    remote = [t for t in cfg.cache.tiers if t.name == "remote"]  # type: ignore[attr-defined]
    assert remote[0].url == url and remote[0].timeout_ms == 50
    # the remote tier is no directory: the layout has the local tiers only
    assert TierLayout(cfg.cache.tiers, "x").tiers == ["ram"]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("remote", "needle"),
    [
        ("", "url is required"),
        ('url = "http://h:6379"\n', "redis:// or rediss://"),
        ('url = "redis://:6379/0"\n', "names no host"),
        ('url = "redis://h:notaport/0"\n', "url"),
        ('url = "redis://h:6379/zero"\n', "database number"),
        ('url = "redis://h:6379/0?x=1"\n', "no query"),
        ('url = "redis://h"\npath = "/tmp/x"\n', "not a path"),
        ('url = "redis://h"\ntimeout_ms = 0\n', "timeout_ms"),
        ('url = "redis://h"\nlookup_deadline_ms = 5000\n', "lookup_deadline_ms"),
        ('url = "redis://h"\nchunk_bytes = 10\n', "chunk_bytes"),
        ('url = "redis://h"\nupload_queue_rows = 0\n', "upload_queue_rows"),
    ],
)
def test_bad_remote_options_name_the_field(tmp_path: Path, remote: str, needle: str) -> None:
    with pytest.raises(ConfigError) as ei:
        load(tmp_path, remote)
    assert needle in str(ei.value)


def test_url_only_on_the_remote_tier_and_never_alone(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="only the remote tier has a url"):
        load(tmp_path, 'url = "redis://h"\n', local=RAM + 'url = "redis://h"\n')
    p = tmp_path / "alone.toml"
    p.write_text('[[cache.tiers]]\nname = "remote"\nurl = "redis://h"\n')
    with pytest.raises(ConfigError, match="needs a local tier"):
        load_config(p)


def test_models_cannot_save_to_the_remote_tier(tmp_path: Path) -> None:
    p = tmp_path / "erllama.toml"
    p.write_text(f'[[models]]\nid = "a"\ntier = "remote"\n{RAM}')
    with pytest.raises(ConfigError, match="tier"):
        load_config(p)


def test_passwords_never_reach_logs_or_status() -> None:
    assert redact("rediss://:hunter2@h:6380/1") == "rediss://:***@h:6380/1"
    assert redact("redis://u:pw@h/0") == "redis://u:***@h/0"
    assert redact("redis://h:6379/0") == "redis://h:6379/0"
