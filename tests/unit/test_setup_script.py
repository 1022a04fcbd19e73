"""scripts/setup's build flags: portable by default, the user's ERLLAMA_CMAKE_ARGS appended and
remembered in the venv, the wheel cache and the venv stamp keyed by them.

Each test runs ``--print-build`` (which touches nothing) of a copy of the script in a scratch
repository, so the shared venv is never read or changed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PORTABLE = (
    "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
)


def scratch_setup(tmp_path: Path) -> Path:
    """``tmp_path/repo/scripts/setup`` (with the pyproject.toml its stamp reads)."""
    repo = tmp_path / "repo"
    if not repo.exists():
        (repo / "scripts").mkdir(parents=True)
        shutil.copy2(ROOT / "scripts" / "setup", repo / "scripts" / "setup")
        shutil.copy2(ROOT / "pyproject.toml", repo / "pyproject.toml")
    return repo / "scripts" / "setup"


def print_build(tmp_path: Path, **env: str) -> tuple[dict[str, str], str]:
    base = {k: v for k, v in os.environ.items() if "CMAKE_ARGS" not in k}
    base.pop("ERLLAMA_WHEEL_CACHE", None)
    proc = subprocess.run(
        ["bash", str(scratch_setup(tmp_path)), "--print-build"],
        env={**base, "HOME": str(tmp_path), **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    fields = dict(line.split("=", 1) for line in proc.stdout.splitlines())
    return fields, proc.stderr


def test_default_is_the_portable_cpu_build(tmp_path: Path) -> None:
    out, err = print_build(tmp_path)
    assert out["CMAKE_ARGS"] == PORTABLE
    # the hash of the default build is unchanged, so existing wheel caches are still used
    assert out["flags_hash"] == hashlib.sha256(f"0.3.36 {PORTABLE}".encode()).hexdigest()[:16]
    assert out["wheels"] == f"{tmp_path}/.cache/erllama/wheels/{out['flags_hash']}"
    assert err == ""


def test_user_flags_are_taken_and_key_the_wheel_cache_and_the_stamp(tmp_path: Path) -> None:
    default, _ = print_build(tmp_path)
    cuda, err = print_build(tmp_path, ERLLAMA_CMAKE_ARGS="-DGGML_CUDA=on")
    metal, _ = print_build(tmp_path, ERLLAMA_CMAKE_ARGS="-DGGML_METAL=on")
    assert cuda["CMAKE_ARGS"] == f"{PORTABLE} -DGGML_CUDA=on"  # later -D values win in CMake
    assert metal["CMAKE_ARGS"] == f"{PORTABLE} -DGGML_METAL=on"
    assert len({default["flags_hash"], cuda["flags_hash"], metal["flags_hash"]}) == 3
    assert len({default["wheels"], cuda["wheels"], metal["wheels"]}) == 3
    # a venv set up with other flags is not taken as ready
    assert len({default["stamp"], cuda["stamp"], metal["stamp"]}) == 3
    assert err == ""
    again, _ = print_build(tmp_path, ERLLAMA_CMAKE_ARGS="-DGGML_CUDA=on")
    assert again == cuda


def test_plain_cmake_args_are_ignored_loudly(tmp_path: Path) -> None:
    out, err = print_build(tmp_path, CMAKE_ARGS="-DGGML_CUDA=on")
    assert out["CMAKE_ARGS"] == PORTABLE
    assert "CMAKE_ARGS is ignored" in err and "ERLLAMA_CMAKE_ARGS" in err


def test_wheel_cache_location_and_bad_arguments(tmp_path: Path) -> None:
    out, _ = print_build(tmp_path, ERLLAMA_WHEEL_CACHE=str(tmp_path / "w"))
    assert out["wheels"] == f"{tmp_path}/w/{out['flags_hash']}"
    proc = subprocess.run(
        ["bash", str(scratch_setup(tmp_path)), "--rebuild"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert "usage" in proc.stderr


def test_the_user_flags_are_remembered_by_the_venv(tmp_path: Path) -> None:
    cuda, _ = print_build(tmp_path, ERLLAMA_CMAKE_ARGS="-DGGML_CUDA=on")
    venv = tmp_path / "repo" / ".venv"
    venv.mkdir()
    (venv / ".erllama-cmake-args").write_text("-DGGML_CUDA=on")  # what a CUDA set-up records
    # scripts/test and scripts/serve run the set-up with the variable unset: CUDA is kept
    kept, _ = print_build(tmp_path)
    assert kept == cuda
    # set and empty: back to the portable default
    back, _ = print_build(tmp_path, ERLLAMA_CMAKE_ARGS="")
    assert back["CMAKE_ARGS"] == PORTABLE
