"""Probe: what makes a sequence's logits differ on this llama.cpp CPU build (issue 10).

Several sequences per context must not change what one sequence computes, or a
warm path cannot be compared token for token with a cold run. This probe measures,
on the default model through the raw bindings (no erllama code in the path), the
max |logit difference| of one sequence's next-token row in four experiments:

1. **Batch size classes.** Sequences 0..k-1 each hold the same KV; one
   ``llama_decode`` carries one row per sequence. Row 0 against k = 1 and k = 2.
   Per-sequence KV streams (``kv_unified = false``), weight repacking on and off.
2. **Cell placement.** The same 256-token prompt in a one-sequence context and in a
   4-sequence context where another sequence's freed cells sit below it (so new
   cells land before the old ones), unified KV and per-sequence streams.
3. **Restore, then decode.** A whole-context snapshot (``llama_state_get_data``)
   and a one-sequence snapshot (``llama_state_seq_get_data``) of an L-token prefill,
   restored into a fresh context: the next decode against the live context's.
4. **Prefill chunk size.** The last logits of a 1600-token prefill in chunks of
   512, 128, 64, 37, 16.

Usage::

    .venv/bin/python bench/probe_exactness.py [--threads 2] [--out bench/results/exactness_probe.md]

Every number is deterministic (a repeat gives 0.0); 0.0 means bit-identical.
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import llama_cpp.llama_cpp as lc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from erllama.bundled import bundled_model_path

Item = tuple[int, int, int, bool]  # token, pos, seq, logits
_QUIET = lc.llama_log_callback(lambda *_: None)  # kept referenced: llama.cpp calls it


class Probe:
    def __init__(self, threads: int, repack: bool) -> None:
        mp = lc.llama_model_default_params()
        mp.use_extra_bufts = repack
        self.model = lc.llama_model_load_from_file(str(bundled_model_path()).encode(), mp)
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        self.threads = threads
        self.batch = lc.llama_batch_init(512, 0, 1)
        words = [" ".join(f"word{(k * 7 + j) % 97}" for j in range(150)) for k in range(4)]
        self.prompts = [self.tokenize(f"Document {k}. {w}") for k, w in enumerate(words)]

    def tokenize(self, text: str) -> list[int]:
        raw = text.encode()
        buf = (lc.llama_token * 4096)()
        vocab = lc.llama_model_get_vocab(self.model)
        n = lc.llama_tokenize(vocab, raw, len(raw), buf, 4096, True, False)
        return list(buf[:n])

    @contextmanager
    def context(self, n_seq: int, unified: bool, n_ubatch: int = 512) -> Iterator[Any]:
        p = lc.llama_context_default_params()
        p.n_ctx, p.n_batch, p.n_ubatch, p.n_seq_max = 4096 * n_seq, 512, n_ubatch, n_seq
        p.n_threads = p.n_threads_batch = self.threads
        p.swa_full, p.kv_unified, p.no_perf = True, unified, True
        ctx = lc.llama_init_from_model(self.model, p)
        try:
            yield ctx
        finally:
            lc.llama_free(ctx)

    def decode(self, ctx: Any, items: list[Item]) -> None:
        b = self.batch
        for i, (tok, pos, seq, want) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i] = tok, pos, 1
            b.seq_id[i][0], b.logits[i] = seq, int(want)
        b.n_tokens = len(items)
        rc = lc.llama_decode(ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def prefill(self, ctx: Any, seq: int, toks: list[int], chunk: int = 128, at: int = 0) -> None:
        for off in range(0, len(toks), chunk):
            part = toks[off : off + chunk]
            last = len(part) - 1
            self.decode(ctx, [(t, at + off + i, seq, i == last) for i, t in enumerate(part)])

    def row(self, ctx: Any, i: int) -> Any:
        ptr = lc.llama_get_logits_ith(ctx, i)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()


def diff(a: Any, b: Any) -> float:
    return round(float(np.max(np.abs(a - b))), 3)


def snapshot(ctx: Any, seq: int | None) -> Any:
    """``None``: ``llama_state_get_data``; ``-1``: the whole cache through the sequence API
    (what the worker stores with one sequence); ``>= 0``: one sequence."""
    if seq is None:
        n = lc.llama_state_get_size(ctx)
        buf = (ctypes.c_uint8 * n)()
        lc.llama_state_get_data(ctx, buf, n)
    else:
        n = lc.llama_state_seq_get_size(ctx, seq)
        buf = (ctypes.c_uint8 * n)()
        lc.llama_state_seq_get_data(ctx, buf, n, seq)
    return buf


def batch_classes(p: Probe, ks: list[int]) -> dict[int, tuple[float, float]]:
    out: dict[int, Any] = {}
    prompt = p.prompts[0][:300]
    with p.context(8, unified=False) as ctx:
        for s in range(8):
            p.prefill(ctx, s, prompt)
        state = snapshot(ctx, None)
        for k in ks:
            lc.llama_state_set_data(ctx, state, len(state))
            p.decode(ctx, [(p.prompts[0][300], 300, s, True) for s in range(k)])
            out[k] = p.row(ctx, 0)
    return {k: (diff(v, out[1]), diff(v, out[2])) for k, v in out.items()}


def placement(p: Probe) -> dict[str, list[float]]:
    prompt, other = p.prompts[0][:256], p.prompts[1][:128]

    def steps(ctx: Any) -> list[Any]:
        rows, tok = [], p.prompts[0][256]
        for i in range(6):
            p.decode(ctx, [(tok, 256 + i, 0, True)])
            rows.append(p.row(ctx, 0))
            tok = int(np.argmax(rows[-1]))
        return rows

    with p.context(1, unified=False) as ctx:
        p.prefill(ctx, 0, prompt, chunk=256)
        ref = steps(ctx)
    out = {}
    for unified in (True, False):
        with p.context(4, unified) as ctx:
            p.prefill(ctx, 1, other, chunk=128)  # cells 0..127 of a unified cache
            p.prefill(ctx, 0, prompt, chunk=256)
            lc.llama_memory_seq_rm(lc.llama_get_memory(ctx), 1, -1, -1)  # free them
            got = steps(ctx)
        out["unified" if unified else "per-sequence streams"] = [
            diff(a, b) for a, b in zip(got, ref, strict=True)
        ]
    return out


def restore(p: Probe, lengths: list[int]) -> dict[int, tuple[float, float, float, float]]:
    """Per length: the whole-context API, the whole cache through the sequence API (the
    worker's form), one sequence; then the one-sequence snapshot's MB."""
    text = (p.prompts[0] + p.prompts[1] + p.prompts[2] + p.prompts[3] + p.prompts[0])[:2100]
    out = {}
    for n in lengths:
        res = []
        for seq in (None, -1, 0):
            with p.context(1, unified=False) as live:
                p.prefill(live, 0, text[:n])
                buf = snapshot(live, seq)
                p.decode(live, [(text[n], n, 0, True)])
                ref = p.row(live, 0)
            with p.context(1, unified=False) as ctx:
                if seq is None:
                    lc.llama_state_set_data(ctx, buf, len(buf))
                else:
                    lc.llama_state_seq_set_data(ctx, buf, len(buf), 0)
                p.decode(ctx, [(text[n], n, 0, True)])
                res.append(diff(p.row(ctx, 0), ref))
        out[n] = (res[0], res[1], res[2], round(len(buf) / 1e6, 1))
    return out


def chunk_sizes(p: Probe, chunks: list[int]) -> dict[int, float]:
    text = (p.prompts[0] * 4)[:1600]
    out: dict[int, Any] = {}
    with p.context(1, unified=False) as ctx:
        for c in chunks:
            lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
            p.prefill(ctx, 0, text, chunk=c)
            out[c] = p.row(ctx, -1)
    return {c: diff(v, out[chunks[0]]) for c, v in out.items()}


def one_chunk_recipe(p: Probe) -> dict[str, float]:
    """Repacking off, every ubatch at most 63 rows, a lone decode given a dummy row: is a
    sequence then independent of batch, cells and restores? (``p`` built with repack off.)"""
    text = (p.prompts[0] + p.prompts[1] + p.prompts[2] + p.prompts[3] + p.prompts[0])[:2100]
    out: dict[str, float] = {}
    cold: dict[int, Any] = {}
    with p.context(2, unified=False, n_ubatch=63) as ctx:
        for c in (63, 48, 37, 16, 9, 5):
            lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
            p.prefill(ctx, 0, text[:1600], chunk=c)
            cold[c] = p.row(ctx, -1)
    for c, v in cold.items():
        out[f"prefill of 1600 in chunks of {c} vs 63"] = diff(v, cold[63])
    for n in (513, 1024, 2048):
        with p.context(4, unified=False, n_ubatch=63) as live:
            p.prefill(live, 1, text[:n], chunk=48)
            buf = snapshot(live, 1)
            p.decode(live, [(1, 0, 0, False), (text[n], n, 1, True)])  # seq 0: the dummy row
            ref = p.row(live, 1)
        with p.context(4, unified=False, n_ubatch=63) as ctx:
            p.prefill(ctx, 3, text[:200], chunk=48)  # another sequence generating beside it
            lc.llama_state_seq_set_data(ctx, buf, len(buf), 2)
            p.decode(ctx, [(text[n], n, 2, True), (text[200], 200, 3, True)])
            out[f"L={n}: one-sequence snapshot restored into seq 2, co-batched"] = diff(
                p.row(ctx, 0), ref
            )
    with p.context(2, unified=False, n_ubatch=63) as live:
        p.prefill(live, 0, text[:1024], chunk=48)
        buf = snapshot(live, 0)
    with p.context(2, unified=False, n_ubatch=63) as ctx:
        lc.llama_state_seq_set_data(ctx, buf, len(buf), 0)
        p.prefill(ctx, 0, text[1024:1600], chunk=48, at=1024)
        out["1024-token row restored, 576 more in chunks of 48, vs cold"] = diff(
            p.row(ctx, -1), cold[63]
        )
    return out


def cpu_cost(repack: bool, n_ubatch: int) -> tuple[float, float, float]:
    """One thread, CPU time (steady under load): prefill of 320 tokens (s), a decode step
    (ms), a decode step with a dummy row (ms); the median of 3."""
    p = Probe(1, repack)
    text = p.prompts[0] + p.prompts[1]
    runs = []
    with p.context(2, unified=False, n_ubatch=n_ubatch) as ctx:
        mem = lc.llama_get_memory(ctx)
        for _ in range(3):
            lc.llama_memory_clear(mem, True)
            t = time.thread_time()
            p.prefill(ctx, 0, text[:320], chunk=min(n_ubatch, 512))
            tp = time.thread_time() - t
            t = time.thread_time()
            for i in range(20):
                p.decode(ctx, [(text[320], 320 + i, 0, True)])
            t1 = (time.thread_time() - t) / 20
            t = time.thread_time()
            for i in range(20):
                lc.llama_memory_seq_rm(mem, 1, -1, -1)
                p.decode(ctx, [(text[320], 340 + i, 0, True), (1, 0, 1, False)])
            t2 = (time.thread_time() - t) / 20
            runs.append((tp, t1 * 1000, t2 * 1000))
    runs.sort()
    return tuple(round(x, 2) for x in runs[1])  # type: ignore[return-value]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    lc.llama_log_set(_QUIET, ctypes.c_void_p(0))
    lc.llama_backend_init()
    lines = [f"# Exactness probe ({args.threads} threads, default model)", ""]
    ks = [1, 2, 3, 4, 5, 8]
    lines += ["## 1. Batch size classes (row 0 of one decode, k rows)", ""]
    lines += ["| repack | " + " | ".join(f"k={k} vs 1 / vs 2" for k in ks) + " |"]
    lines += ["|---" * (len(ks) + 1) + "|"]
    for repack in (True, False):
        p = Probe(args.threads, repack)
        cls = batch_classes(p, ks)
        lines += [f"| {repack} | " + " | ".join(f"{a} / {b}" for a, b in cls.values()) + " |"]
        if repack:
            default = p
    lines += ["", "## 2. Cell placement (6 greedy steps against a one-sequence context)", ""]
    for name, ds in placement(default).items():
        lines += [f"- {name}: {ds}"]
    lines += ["", "## 3. Restore into a fresh context, then one decode (against the live one)", ""]
    lines += [
        "| L | whole-context API | whole cache, sequence API (the worker's) "
        "| one-sequence snapshot | sequence MB |",
        "|---|---|---|---|---|",
    ]
    for n, (whole, wseq, seq, mb) in restore(default, [300, 511, 512, 513, 1024, 2048]).items():
        lines += [f"| {n} | {whole} | {wseq} | {seq} | {mb} |"]
    lines += [
        "",
        "## 4. Prefill chunk size (last logits of 1600 tokens against 512-token chunks)",
        "",
    ]
    for c, d in chunk_sizes(default, [512, 128, 64, 37, 16]).items():
        lines += [f"- chunk {c}: {d}"]
    lines += ["", "## 5. The one-chunk recipe (repack off, ubatch <= 63, dummy row)", ""]
    for name, d in one_chunk_recipe(Probe(args.threads, repack=False)).items():
        lines += [f"- {name}: {d}"]
    lines += [
        "",
        "## 6. Cost (1 thread, CPU time, median of 3)",
        "",
        "| repack | ubatch | prefill 320 (s) | decode (ms) | decode + dummy row (ms) |",
        "|---|---|---|---|---|",
    ]
    for repack, ub in ((True, 512), (False, 512), (True, 63), (False, 63)):
        tp, t1, t2 = cpu_cost(repack, ub)
        lines += [f"| {repack} | {ub} | {tp} | {t1} | {t2} |"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
