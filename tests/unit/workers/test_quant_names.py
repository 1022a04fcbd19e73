"""Every file type llama.cpp loads gets a cache namespace of its own, and its saves encode and
validate (REFERENCE §3.2, §11 D20): the names come from llama-cpp-python's ``LLAMA_FTYPE_*``.
"""

from __future__ import annotations

import time

import llama_cpp
import pytest

from erllama.cache.keys import OTHER_QUANT_BYTE, QUANT_TABLE, make_key, quant_namespace
from erllama.cache.kvc import KvcMeta, SaveReason, build_prefix, validate_full
from erllama.protocol.tokens import pack_tokens
from erllama.workers.llama import FTYPE_NAMES, quant_bits_for

FP = bytes(range(32))
CTX = bytes(range(100, 132))
TOKENS = list(range(1, 65))


def llama_ftypes() -> dict[int, str]:
    """``{ftype: name}`` from the installed llama-cpp-python (``MOSTLY_Q4_K_M`` -> ``q4_k_m``)."""
    out = {}
    for const, value in vars(llama_cpp).items():
        if const.startswith("LLAMA_FTYPE_") and const != "LLAMA_FTYPE_GUESSED":
            name = const.removeprefix("LLAMA_FTYPE_")
            out[int(value)] = name.removeprefix("MOSTLY_").removeprefix("ALL_").lower()
    return out


LLAMA_FTYPES = llama_ftypes()
# what a GGUF reports beyond that list: a newer llama.cpp's ftype, a configured name with a typo
QUANT_NAMES = sorted({*LLAMA_FTYPES.values(), "ftype_99", "q4_k_n"})


def test_the_ftype_list_is_read() -> None:
    assert len(LLAMA_FTYPES) >= 30
    assert LLAMA_FTYPES[15] == "q4_k_m" and LLAMA_FTYPES[0] == "f32"


def test_ftype_names_are_llama_cpps() -> None:
    assert {code: FTYPE_NAMES.get(code) for code in LLAMA_FTYPES} == LLAMA_FTYPES


def test_every_quant_keys_apart() -> None:
    spaces = {name: quant_namespace(FP, name) for name in QUANT_NAMES}
    keys = {make_key(fp, byte, CTX, TOKENS) for fp, byte in spaces.values()}
    assert len(keys) == len(QUANT_NAMES)
    for name, (fp, byte) in spaces.items():
        if name in QUANT_TABLE:
            assert (fp, byte) == (FP, QUANT_TABLE[name])  # upstream's key, unchanged
        else:
            assert byte == OTHER_QUANT_BYTE and fp != FP


@pytest.mark.parametrize("name", QUANT_NAMES)
def test_a_save_under_every_quant_encodes_and_validates(name: str) -> None:
    fp, byte = quant_namespace(FP, name)
    meta = KvcMeta(
        save_reason=SaveReason.FINISH,
        quant_bits=quant_bits_for(name),
        context_size=4096,
        fingerprint=fp,
        fingerprint_mode=0,
        quant=byte,
        ctx_hash=CTX,
        tokens=pack_tokens(TOKENS),
        creation_time=int(time.time()),
    )
    payload = bytes(range(256)) * 16
    key = make_key(fp, byte, CTX, TOKENS)
    assert meta.key() == key
    parsed, view = validate_full(build_prefix(meta, payload) + payload, key)
    assert bytes(view) == payload
    assert (parsed.meta.fingerprint, parsed.meta.quant) == (fp, byte)
