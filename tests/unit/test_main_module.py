"""``python -m erllama`` is the ``erllama`` console script: same output, same exit status."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[2]


def _entry_point() -> tuple[str, str]:
    """``module, function`` of ``[project.scripts] erllama``."""
    with open(REPO / "pyproject.toml", "rb") as f:
        target = tomllib.load(f)["project"]["scripts"]["erllama"]
    module, _, function = target.partition(":")
    return module, function


def _run(argv: list[str]) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ERLLAMA_")}
    env.update({"PYTHONPATH": str(REPO), "COLUMNS": "100"})  # argparse wraps to COLUMNS
    p = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=REPO, timeout=30)
    return p.returncode, p.stdout, p.stderr


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["--help"], 0),
        (["chat", "--help"], 0),
        (["complete", "--help"], 0),
        (["--version"], 0),
        ([], 2),
        (["nope"], 2),
    ],
    ids=["help", "chat-help", "complete-help", "version", "no-verb", "bad-verb"],
)
def test_python_m_erllama_is_the_console_script(args: list[str], code: int) -> None:
    module, function = _entry_point()
    # what a console script does: import the entry point, sys.exit() with its result
    script = f"import sys; from {module} import {function} as f; sys.exit(f())"
    want = _run([sys.executable, "-c", script, *args])
    got = _run([sys.executable, "-m", "erllama", *args])
    assert got == want
    assert want[0] == code
    if "--help" in args:
        assert want[1].startswith("usage: erllama")
