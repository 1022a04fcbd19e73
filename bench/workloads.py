"""The five workloads of the side-by-side benchmarks (issue 6).

Each function takes already-built prompt material and peers (see
``bench/peers``), runs one workload, and returns a JSON-able dict of raw
samples; ``bench/run_all.py`` turns those into tables and the plot.

Every prompt is a list of token ids built once in this process with the
model's tokenizer, BOS included, and every peer gets the very same ids. One
peer runs at a time (never two model processes computing at once).

1. ``ttft_vs_length``: cold vs warm time to first token against prompt length.
2. ``multi_session_chat``: 8 stateless chat sessions sharing a system prompt.
3. ``daemon_overhead``: round trip of a small request, streaming tokens/s.
4. ``cache_scale``: meta exact lookup and longest-prefix latency vs rows.
5. ``recovery``: worker SIGKILL -> model answering again, and the first TTFT.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
for p in (str(BENCH), str(REPO)):
    if p not in sys.path:
        sys.path.insert(0, p)

from peers import Gen, Peer, Tokenizer  # noqa: E402

log = logging.getLogger("bench")

# ---------------------------------------------------------------- prompt material

_WORDS_TEXT = """
river mountain cloud lantern harbour meadow copper violin orchard glacier compass ember
falcon quarry saddle thistle walnut beacon canyon dune library baker kite morning
letter market stars teacup remembers watches carries describes repairs follows paints
quietly slowly north winter green broken empty forgotten old red paper seven bridge
station engine garden window silver forest island tower valley shadow feather thunder
marble pepper candle ladder mirror basket anchor pocket ribbon signal tunnel velvet
wagon
"""
_WORDS = _WORDS_TEXT.split()


def text(seed: int, n_words: int) -> str:
    """Deterministic word salad (with punctuation) from ``seed``; no two seeds share a start."""
    rng = random.Random(seed * 7919 + 17)
    out = []
    for i in range(n_words):
        w = rng.choice(_WORDS)
        if i % 11 == 0:
            w = w.capitalize()
        out.append(w + ("." if i % 11 == 10 else ("," if i % 7 == 6 else "")))
    return " ".join(out)


def body_tokens(tok: Tokenizer, seed: int, n: int) -> list[int]:
    """Exactly ``n`` tokens of text (no BOS)."""
    out: list[int] = []
    k = 0
    while len(out) < n:
        out += tok(("" if not out else " ") + text(seed * 1000 + k, max(16, n)))
        k += 1
    return out[:n]


def prompt_tokens(tok: Tokenizer, seed: int, n: int) -> list[int]:
    """BOS + ``n - 1`` tokens of text: a prompt of exactly ``n`` tokens."""
    return [tok.bos(), *body_tokens(tok, seed, n - 1)]


class QuietGate:
    """Wait (bounded) until other processes leave the CPU alone before a timed step.

    The benchmark shares its cores with other jobs; a 2-thread llama.cpp decode next to a
    busy process stalls on its thread barriers (seconds instead of milliseconds). Before a
    step, with every peer idle, ``wait()`` samples ``/proc/stat`` for ``window_s``: if more
    than ``threshold`` cores were busy, it sleeps and samples again, up to ``max_wait_s``
    per call and ``budget_s`` in all. It returns the busy cores it last saw (recorded with
    the samples), so a disturbed measurement can be told from a clean one.
    """

    def __init__(
        self,
        threshold: float = 0.3,
        window_s: float = 0.5,
        max_wait_s: float = 60.0,
        budget_s: float = 480.0,
        enabled: bool = True,
    ) -> None:
        self.threshold = threshold
        self.window_s = window_s
        self.max_wait_s = max_wait_s
        self.budget_s = budget_s
        self.enabled = enabled
        self.waited_s = 0.0

    @staticmethod
    def _stat() -> tuple[int, int]:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
        return sum(vals), idle

    def busy_cores(self) -> float:
        t0, i0 = self._stat()
        time.sleep(self.window_s)
        t1, i1 = self._stat()
        total = max(1, t1 - t0)
        return (total - (i1 - i0)) / total * (os.cpu_count() or 1)

    def wait(self) -> float:
        if not self.enabled:
            return float("nan")
        start = time.monotonic()
        busy = self.busy_cores()
        while (
            busy > self.threshold
            and time.monotonic() - start < self.max_wait_s
            and self.waited_s + (time.monotonic() - start) < self.budget_s
        ):
            time.sleep(2.0)
            busy = self.busy_cores()
        self.waited_s += time.monotonic() - start
        return busy


GATE = QuietGate()


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


# ---------------------------------------------------------------- 1. ttft vs length


def w1_peer(
    peer: Peer,
    tok: Tokenizer,
    lengths: list[int],
    runs: int,
    *,
    hit_reps: int = 3,
    measure_restored: bool = True,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Cold, exact hit (live KV and restored from the peer's cache), prefix hit, per length.

    Per (length, run) a prompt P unique to them: ``cold`` = P, then ``hit_reps`` times:
    ``live`` = P again; clobber (an unrelated 48-token prompt); ``restored`` = P (from the
    peer's cache, not its live KV); clobber; ``prefix`` = P + 64 new tokens (a different 64
    each time, so it is never an exact hit of an earlier rep). A peer without a cache
    (``measure_restored=False``) skips ``restored`` (it would be a cold run).
    """
    out: dict[str, Any] = {}
    for n in lengths:
        rec: dict[str, list[Any]] = {k: [] for k in ("cold", "live", "restored", "prefix")}
        hits: dict[str, list[str]] = {k: [] for k in rec}
        infos: dict[str, list[dict[str, Any]]] = {k: [] for k in rec}
        busy: list[float] = []
        for r in range(runs):
            p = prompt_tokens(tok, 100_000 + 100 * n + r, n)
            busy.append(GATE.wait())
            steps: list[tuple[str, list[int]]] = [("cold", p)]
            for k in range(hit_reps):
                x = body_tokens(tok, 200_000 + 100 * n + 10 * r + k, 64)
                clob = [
                    prompt_tokens(tok, 300_000 + 1000 * n + 100 * r + 10 * k + i, 48)
                    for i in range(2)
                ]
                steps.append(("live", p))
                if measure_restored:
                    steps += [("clobber", clob[0]), ("restored", p)]
                steps += [("clobber", clob[1]), ("prefix", p + x)]
            for name, toks in steps:
                g: Gen = peer.gen(toks, 1)
                if name != "clobber":
                    rec[name].append(g.ttft_s)
                    hits[name].append(g.hit)
                    infos[name].append(g.info)
            progress(
                f"  [{peer.name}] n={n} run={r}: "
                + ", ".join(f"{k}={median(v[-hit_reps:]) * 1e3:.0f}ms" for k, v in rec.items() if v)
            )
        out[str(n)] = {"samples": rec, "hits": hits, "info": infos, "busy_before": busy}
    return out


def w1_floor(
    floor: Any,
    tok: Tokenizer,
    lengths: list[int],
    runs: int,
    repeats: int = 5,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """In-process floor: cold prefill, restore + replay (exact), restore + 64 tokens (prefix)."""
    out: dict[str, Any] = {}
    for n in lengths:
        rec: dict[str, list[float]] = {
            k: [] for k in ("cold", "exact", "exact_logits", "prefix", "set_data", "get_data")
        }
        size = 0
        busy: list[float] = []
        for r in range(runs):
            p = prompt_tokens(tok, 100_000 + 100 * n + r, n)
            x = body_tokens(tok, 200_000 + 100 * n + 10 * r, 64)
            busy.append(GATE.wait())
            rec["cold"].append(floor.prepare(p))
            rec["get_data"].append(floor.snapshot_s)
            size = floor.snapshot_bytes
            rec["exact"].append(floor.exact(repeats))
            rec["exact_logits"].append(floor.exact_logits(repeats))
            rec["prefix"].append(floor.prefix(x, repeats))
            rec["set_data"].append(floor.restore_only(repeats))
            progress(
                f"  [floor] n={n} run={r}: cold={rec['cold'][-1] * 1e3:.0f}ms "
                f"exact={rec['exact'][-1] * 1e3:.1f}ms prefix={rec['prefix'][-1] * 1e3:.1f}ms"
            )
        out[str(n)] = {"samples": rec, "state_bytes": size, "busy_before": busy}
    return out


# ---------------------------------------------------------------- 2. multi-session chat


class ChatMaterial:
    """8 sessions: a shared ~400-token system prompt, a ~1,000-token document each."""

    QUESTIONS = [
        "Summarise the document above in one sentence.",
        "Which word appears most often, and why might that be?",
        "Give the document a short title.",
    ]

    def __init__(
        self, tok: Tokenizer, sessions: int = 8, system_tokens: int = 400, doc_tokens: int = 1000
    ) -> None:
        self.tok = tok
        head = tok("<start_of_turn>user\n")
        sys_text = body_tokens(tok, 7, system_tokens - len(head) - 1)
        self.system = [tok.bos(), *head, *sys_text]  # the shared prefix, token-exact
        self.docs = [body_tokens(tok, 1000 + s, doc_tokens) for s in range(sessions)]
        self.sessions = sessions

    def first_prompt(self, s: int) -> list[int]:
        t = self.tok
        q = t(f"\n\nQuestion: {self.QUESTIONS[0]}<end_of_turn>\n<start_of_turn>model\n")
        return [*self.system, *t("\n\nDocument:\n"), *self.docs[s], *q]

    def next_prompt(self, history: list[int], reply: list[int], turn: int) -> list[int]:
        t = self.tok
        q = self.QUESTIONS[turn % len(self.QUESTIONS)]
        return [
            *history,
            *reply,
            *t(f"<end_of_turn>\n<start_of_turn>user\n{q}<end_of_turn>\n<start_of_turn>model\n"),
        ]


def w2_chat(
    peer: Peer,
    mat: ChatMaterial,
    turns: int = 3,
    reply_tokens: int = 16,
    *,
    eog: set[int] | None = None,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Round-robin over the sessions for ``turns`` turns; every turn resends everything."""
    eog = eog or {1, 106}  # <eos>, <end_of_turn>
    history = [mat.first_prompt(s) for s in range(mat.sessions)]
    samples: list[dict[str, Any]] = []
    for turn in range(turns):
        for s in range(mat.sessions):
            prompt = history[s]
            g = peer.gen(prompt, reply_tokens)
            reply = []
            for t in g.tokens:
                if t in eog:
                    break
                reply.append(t)
            samples.append(
                {
                    "turn": turn,
                    "session": s,
                    "prompt_tokens": len(prompt),
                    "ttft_s": g.ttft_s,
                    "total_s": g.total_s,
                    "generated": len(g.tokens),
                    "hit": g.hit,
                    "info": g.info,
                }
            )
            progress(
                f"  [{peer.name}] turn={turn} session={s} prompt={len(prompt)} "
                f"ttft={g.ttft_s * 1e3:.0f}ms hit={g.hit} {g.info}"
            )
            history[s] = mat.next_prompt(prompt, reply, turn + 1)
    return {"samples": samples}


def w2_turn_medians(raw: dict[str, Any]) -> dict[int, float]:
    s = raw["samples"]
    turns = sorted({x["turn"] for x in s})
    return {
        t: median([x["ttft_s"] for x in s if x["turn"] == t and (t > 0 or x["session"] > 0)])
        for t in turns
    }


def w2_summary(raw: dict[str, Any]) -> dict[str, float]:
    s = raw["samples"]
    first = [x["ttft_s"] for x in s if x["turn"] == 0 and x["session"] == 0]
    t0_rest = [x["ttft_s"] for x in s if x["turn"] == 0 and x["session"] > 0]
    later = [x["ttft_s"] for x in s if x["turn"] > 0]
    return {
        "turn0_first": median(first),
        "turn0_others": median(t0_rest),
        "later": median(later),
        "later_p90": pct(later, 0.9),
        "later_mean": statistics.fmean(later) if later else float("nan"),
        "total": sum(x["total_s"] for x in s),
    }


# ---------------------------------------------------------------- 3. daemon overhead

COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,"  # greedy keeps counting: no early EOS


def w3_roundtrip(call: Callable[[], object], n: int, warmup: int = 50) -> dict[str, float]:
    for _ in range(warmup):
        call()
    lat = []
    for _ in range(n):
        t0 = time.perf_counter()
        call()
        lat.append(time.perf_counter() - t0)
    return {"p50": pct(lat, 0.5), "p99": pct(lat, 0.99), "n": n}


def stream_rate(run_once: Callable[[], list[float]], runs: int) -> dict[str, float]:
    """Tokens/s between the first and the last token of a stream (median of ``runs``)."""
    rates = []
    counts = []
    for _ in range(runs):
        stamps = run_once()
        counts.append(len(stamps))
        if len(stamps) > 1:
            rates.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    return {"tok_s": median(rates), "tokens": min(counts) if counts else 0, "runs": runs}


def w3_stream_erllama(d: Any, prompt: list[int], n: int, runs: int) -> dict[str, float]:
    def once() -> list[float]:
        st = []
        for ev in d.client.infer("default", prompt, response_tokens=n, temperature=0.0):
            if ev.kind == "token":
                st.append(time.perf_counter())
        return st

    return stream_rate(once, runs)


def w3_stream_server(srv: Any, prompt: list[int], n: int, runs: int) -> dict[str, float]:
    def once() -> list[float]:
        st: list[float] = []
        srv.gen(
            prompt, n, extra={"ignore_eos": True}, on_token=lambda: st.append(time.perf_counter())
        )
        return st

    return stream_rate(once, runs)


def w3_stream_llama_cpp(lcp: Any, prompt: list[int], n: int, runs: int) -> dict[str, float]:
    def once() -> list[float]:
        st = []
        for _ in lcp.llm.create_completion(
            prompt=list(prompt), max_tokens=n, temperature=0.0, stream=True
        ):
            st.append(time.perf_counter())
        return st

    return stream_rate(once, runs)


def w3_stream_floor(floor: Any, prompt: list[int], n: int, runs: int) -> dict[str, float]:
    """The worker's own decode loop in process: decode_one + greedy sample per token."""
    be = floor.be
    from erllama.workers.backend import SamplerOptions

    def once() -> list[float]:
        be.seq_clear(0)
        be.prefill(0, prompt, 0)
        s = be.new_sampler(0, SamplerOptions(temperature=0.0))
        st = []
        tok = int(s.sample())
        st.append(time.perf_counter())
        pos = len(prompt)
        for _ in range(n - 1):
            be.decode_one(0, tok, pos)
            pos += 1
            tok = int(s.sample())
            st.append(time.perf_counter())
        s.close()
        return st

    return stream_rate(once, runs)


# ---------------------------------------------------------------- 4. cache scale


def w4_cache_scale(
    rows_list: list[int], n: int, progress: Callable[[str], None] = print
) -> dict[str, Any]:
    """Meta round trips (real meta process) and in-process trie lookups per index size.

    Meta: ``bench/bench_cache.bench_meta`` (rows written as KVC files into a ram tier, loaded
    by meta's startup scan; exact lookup and longest_prefix_checkout of a 32k-token prompt).
    Trie: ``erllama.cache.trie.TokenTrie`` with the same row shape (a shared 1,000-token
    system prompt, each row its own continuation), longest_prefix_packed of a 32k prompt.
    """
    import bench_cache

    out: dict[str, Any] = {}
    for rows in rows_list:
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="erllama-bench-", dir="/dev/shm") as tmp:
            meta_rows = bench_cache.bench_meta(Path(tmp), rows, n)
        trie = w4_trie(rows, n)
        out[str(rows)] = {"meta": meta_rows, "trie": trie}
        progress(
            f"  [cache_scale] rows={rows}: {meta_rows} {trie} ({time.perf_counter() - t0:.0f}s)"
        )
    return out


def w4_trie(rows: int, n: int, prompt_tokens_n: int = 32_768) -> dict[str, float]:
    from erllama.cache.trie import TokenTrie

    r = random.Random(1)
    system = [r.randrange(32_000) for _ in range(1000)]
    trie = TokenTrie()
    saved = []
    t0 = time.perf_counter()
    for i in range(rows):
        tail = [r.randrange(32_000) for _ in range(r.randrange(10, 1500))]
        toks = [*system, i, *tail]
        trie.insert(toks, i.to_bytes(32, "big"))
        if i % max(1, rows // 64) == 0:
            saved.append(toks)
    insert_s = time.perf_counter() - t0
    import array as _array

    lat = []
    for k in range(n):
        base = saved[k % len(saved)]
        q = base + [r.randrange(32_000) for _ in range(prompt_tokens_n - len(base))]
        packed = _array.array("I", q).tobytes()
        t1 = time.perf_counter()
        hit = trie.longest_prefix_packed(packed)
        lat.append(time.perf_counter() - t1)
        assert hit is not None and hit[0] == len(base)
    return {
        "insert_us_per_row": insert_s / rows * 1e6,
        "p50_us": pct(lat, 0.5) * 1e6,
        "p99_us": pct(lat, 0.99) * 1e6,
    }


# ---------------------------------------------------------------- 5. recovery


def w5_recovery(
    d: Any,
    tok: Tokenizer,
    runs: int,
    n: int = 2048,
    *,
    progress: Callable[[str], None] = print,
    ready_timeout_s: float = 120.0,
) -> dict[str, Any]:
    """SIGKILL the worker; time until the model is ready again and the first TTFT after it.

    Per run: a fresh prompt P of ``n`` tokens is answered cold (its state is saved to the ram
    tier), the save is given time to land, the worker gets SIGKILL, the model's state is
    polled (``model_info``, every 10 ms) until it is ready under a new pid, then P is sent
    again: its TTFT and hit kind (expected: a warm hit restored from the ram tier).
    """
    import erllama

    samples = []
    for r in range(runs):
        p = prompt_tokens(tok, 900_000 + r, n)
        cold = d.gen(p, 1)
        wait_rows(d, 10.0)
        old = d.worker_pid()
        t_kill = time.perf_counter()
        os.kill(old, signal.SIGKILL)
        t_ready = None
        while time.perf_counter() - t_kill < ready_timeout_s:
            try:
                info = d.client.model_info("default")
                if info.state == "ready" and info.pid and info.pid != old:
                    t_ready = time.perf_counter() - t_kill
                    break
            except erllama.ErllamaError:
                pass
            time.sleep(0.01)
        if t_ready is None:
            raise TimeoutError("model not ready again after the SIGKILL")
        g = d.gen(p, 1)
        samples.append(
            {
                "cold_s": cold.ttft_s,
                "ready_s": t_ready,
                "ttft_after_s": g.ttft_s,
                "answer_s": t_ready + g.ttft_s,
                "hit": g.hit,
            }
        )
        progress(
            f"  [recovery] run={r}: cold={cold.ttft_s * 1e3:.0f}ms ready after {t_ready:.2f}s, "
            f"first ttft={g.ttft_s * 1e3:.0f}ms hit={g.hit}"
        )
        time.sleep(6.0)  # past the worker's startsecs, so the next kill is not a failed start
    return {"samples": samples}


def wait_rows(d: Any, timeout_s: float) -> None:
    """Wait until the daemon's cache row count stops growing (the async save landed)."""
    deadline = time.monotonic() + timeout_s
    last = -1
    stable = 0
    while time.monotonic() < deadline:
        rows = sum(t.rows for t in d.client.daemon_status().tiers)
        if rows == last and rows > 0:
            stable += 1
            if stable >= 3:
                return
        else:
            stable = 0
        last = rows
        time.sleep(0.1)
