"""GGUF files for the API-extras tests: a LoRA adapter for a base model, and a copy of a
model with a chat template added.

``write_lora`` writes a small valid LoRA GGUF with the ``gguf`` package, the way
llama.cpp's ``convert_lora_to_gguf.py`` lays it out: ``general.type = "adapter"``,
``adapter.type = "lora"``, ``adapter.lora.alpha``, and for each chosen base tensor
``<name>.lora_a`` (ggml shape ``[n_in, rank]``) and ``<name>.lora_b`` (``[rank, n_out]``)
in F32. llama.cpp checks the architecture and that ``lora_a.ne[0]`` / ``lora_b.ne[1]``
match the base tensor, so the shapes are read from the base GGUF. The values are seeded
random numbers, large enough that greedy output changes within a few tokens.

``add_chat_template`` copies a GGUF byte for byte and appends one metadata key,
``tokenizer.chat_template``: header (kv count + 1), the original key/values, the new
one, the original tensor infos, padding to the alignment, the original tensor data
(tensor offsets are relative to the data section, so they stay valid).
"""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import gguf
import numpy as np

from erllama.chat_templates import GEMMA3_CHAT_TEMPLATE

# Gemma 3's chat template is the built-in one (erllama/chat_templates.py); it emits
# ``{{ bos_token }}`` itself and refuses roles that do not alternate.
__all__ = ["GEMMA3_CHAT_TEMPLATE", "add_chat_template", "write_lora"]


_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


class GgufLayout:
    """Where the parts of a GGUF file lie, read with a minimal parser.

    ``gguf.GGUFReader`` builds a numpy view per token string (262k of them in Gemma 3's
    vocabulary) and takes 15-25 s here; walking the bytes takes a fraction of a second.
    """

    def __init__(self, path: str | Path) -> None:
        data = Path(path).read_bytes()[: 64 << 20]  # metadata and tensor infos come first
        magic, version, n_tensors, n_kv = struct.unpack_from("<IIQQ", data)
        assert magic == 0x46554747 and version >= 2, f"{path} is not a GGUF v2+ file"
        self.n_kv = n_kv
        pos = 24
        self.strings: dict[str, str] = {}
        self.alignment = gguf.GGUF_DEFAULT_ALIGNMENT

        def string(at: int) -> tuple[str, int]:
            (n,) = struct.unpack_from("<Q", data, at)
            return data[at + 8 : at + 8 + n].decode("utf-8", "replace"), at + 8 + n

        def skip(vtype: int, at: int) -> int:
            if vtype == _STRING:
                return string(at)[1]
            if vtype == _ARRAY:
                itype, count = (int(x) for x in struct.unpack_from("<IQ", data, at))
                at += 12
                if itype in _SCALAR_SIZES:
                    return at + count * _SCALAR_SIZES[itype]
                for _ in range(count):
                    at = skip(itype, at)
                return at
            return at + _SCALAR_SIZES[vtype]

        for _ in range(n_kv):
            key, pos = string(pos)
            (vtype,) = struct.unpack_from("<I", data, pos)
            pos += 4
            if vtype == _STRING:
                self.strings[key], pos = string(pos)
            elif key == gguf.Keys.General.ALIGNMENT and vtype == 4:
                (self.alignment,) = struct.unpack_from("<I", data, pos)
                pos += 4
            else:
                pos = skip(vtype, pos)
        self.kv_end = pos
        self.shapes: dict[str, list[int]] = {}
        for _ in range(n_tensors):
            name, pos = string(pos)
            (n_dims,) = struct.unpack_from("<I", data, pos)
            dims = list(struct.unpack_from(f"<{n_dims}Q", data, pos + 4))
            pos += 4 + 8 * n_dims + 4 + 8  # dims, type, offset
            self.shapes[name] = dims
        self.ti_end = pos
        self.data_offset = pos + (-pos % self.alignment)


def write_lora(
    path: Path,
    base_gguf: str | Path,
    *,
    rank: int = 4,
    alpha: float = 8.0,
    magnitude: float = 0.1,
    seed: int = 1,
    suffix: str = "attn_q.weight",
) -> Path:
    """Write a LoRA adapter GGUF for ``base_gguf`` touching every ``blk.N.<suffix>``."""
    layout = GgufLayout(base_gguf)
    arch = layout.strings[gguf.Keys.General.ARCHITECTURE]
    targets = [
        (name, int(dims[0]), int(dims[1]))
        for name, dims in layout.shapes.items()
        if name.startswith("blk.") and name.endswith("." + suffix)
    ]
    assert targets, f"no blk.N.{suffix} tensors in {base_gguf}"
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    for name, n_in, n_out in targets:
        # numpy shapes are the reverse of ggml's ne: lora_a ne=[n_in, rank], lora_b ne=[rank, n_out]
        a = (rng.standard_normal((rank, n_in)) * magnitude).astype(np.float32)
        b = (rng.standard_normal((n_out, rank)) * magnitude).astype(np.float32)
        writer.add_tensor(name + ".lora_a", a)
        writer.add_tensor(name + ".lora_b", b)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def add_chat_template(src: str | Path, dst: Path, template: str) -> Path:
    """Copy the GGUF ``src`` to ``dst`` with ``tokenizer.chat_template = template``."""
    layout = GgufLayout(src)
    key = gguf.Keys.Tokenizer.CHAT_TEMPLATE
    assert key not in layout.strings, f"{src} already has a chat template"
    kbytes, vbytes = key.encode(), template.encode("utf-8")
    new_kv = (
        struct.pack("<Q", len(kbytes))
        + kbytes
        + struct.pack("<I", _STRING)
        + struct.pack("<Q", len(vbytes))
        + vbytes
    )
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        head = fin.read(layout.kv_end)
        magic, version, n_tensors, n_kv = struct.unpack_from("<IIQQ", head)
        fout.write(struct.pack("<IIQQ", magic, version, n_tensors, n_kv + 1))
        fout.write(head[24:])
        fout.write(new_kv)
        fout.write(fin.read(layout.ti_end - layout.kv_end))
        pos = layout.ti_end + len(new_kv)
        fout.write(b"\0" * (-pos % layout.alignment))
        fin.seek(layout.data_offset)
        shutil.copyfileobj(fin, fout, 16 << 20)
    return dst
