"""Prefix routing against round robin: two daemons, multi-session stateless chat.

Two ``erllama serve`` on this machine (two run dirs), one ``ClusterClient`` over both.
``--sessions`` conversations share a system prompt and each has its own opening
document; every turn resends the whole conversation as text (Gemma chat markers,
``parse_special``) and streams ``--reply-tokens`` greedy tokens. Each turn serves the
sessions in a seeded shuffled order (with a fixed order and an even session count,
round robin would put every session on the same daemon each turn by accident).

The same workload runs once per policy (``prefix``, then ``round_robin``), each on a
fresh pair of daemons, and reports per policy: the share of later-turn requests that
were warm (hit kind other than ``cold``), the share of their prompt tokens read from the
cache, and the later-turn median / p90 TTFT (client side, first token event), plus how
the requests split over the daemons.

    .venv/bin/python bench/bench_routing.py --quick          # stub backend, ~1 min
    .venv/bin/python bench/bench_routing.py --turns 3        # the bundled Gemma 3 270M

Writes its section of ``bench/results/routing.md`` (``--out``; the other mode's section
is kept) and the raw samples next to it (``routing-real.json`` / ``routing-quick.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from daemon_proc import running_daemon  # noqa: E402

import erllama  # noqa: E402

WORDS = [
    "river",
    "mountain",
    "cloud",
    "lantern",
    "harbour",
    "meadow",
    "copper",
    "violin",
    "orchard",
    "glacier",
    "compass",
    "ember",
    "signal",
    "quarry",
    "willow",
    "beacon",
    "canyon",
    "falcon",
    "thistle",
    "anchor",
    "saffron",
    "timber",
    "marble",
    "pepper",
    "granite",
    "velvet",
    "prairie",
    "lagoon",
    "cobalt",
    "maple",
    "juniper",
    "walnut",
    "cedar",
    "ivory",
    "onyx",
    "amber",
]

STUB = """
[http]
listen = "off"
[[models]]
id = "m"
backend = "stub"
[models.stub]
prefill_delay_ms_per_token = {prefill_ms}
token_delay_ms = 1.0
[models.policy]
min_tokens = 16
cold_min_tokens = 16
boundary_align_tokens = 16
"""

REAL = """
[http]
listen = "off"
[[models]]
id = "m"
[models.context_opts]
n_ctx = 4096
n_threads = 2
n_threads_batch = 2
[models.policy]
min_tokens = 64
cold_min_tokens = 64
boundary_align_tokens = 64
"""

QUESTIONS = [
    "Summarise the document above in one sentence.",
    "Which word appears most often, and why might that be?",
    "Give the document a short title.",
    "Name three things the document mentions.",
]


def salad(seed: int, n_words: int) -> str:
    rng = random.Random(seed * 7919 + 17)
    out = []
    for i in range(n_words):
        w = rng.choice(WORDS)
        out.append((w.capitalize() if i % 11 == 0 else w) + ("." if i % 11 == 10 else ""))
    return " ".join(out)


def first_prompt(system: str, doc: str) -> str:
    return (
        f"<start_of_turn>user\n{system}\n\nDocument:\n{doc}\n\nQuestion: {QUESTIONS[0]}"
        "<end_of_turn>\n<start_of_turn>model\n"
    )


def next_prompt(history: str, reply: str, turn: int) -> str:
    q = QUESTIONS[turn % len(QUESTIONS)]
    return (
        f"{history}{reply}<end_of_turn>\n<start_of_turn>user\n{q}<end_of_turn>\n"
        "<start_of_turn>model\n"
    )


def run_policy(policy: str, config: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    system = salad(7, args.system_words)
    docs = [salad(1000 + s, args.doc_words) for s in range(args.sessions)]
    history = [first_prompt(system, d) for d in docs]
    samples: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        eps = [stack.enter_context(running_daemon(config))[0] for _ in range(2)]
        names = {ep: f"d{i}" for i, ep in enumerate(eps)}
        c = stack.enter_context(erllama.ClusterClient(eps, timeout=120, policy=policy))  # type: ignore[arg-type]
        rng = random.Random(args.seed)
        for turn in range(args.turns):
            order = list(range(args.sessions))
            rng.shuffle(order)
            for s in order:
                prompt = history[s]
                t0 = time.perf_counter()
                ttft = None
                text = ""
                stats = None
                with c.stream(
                    "m", prompt, response_tokens=args.reply_tokens, parse_special=True
                ) as st:
                    endpoint = st.endpoint
                    for ev in st:
                        if ev.kind == "token":
                            if ttft is None:
                                ttft = time.perf_counter() - t0
                            text += ev.text or ""
                        elif ev.kind == "done":
                            stats = ev.stats
                assert stats is not None
                samples.append(
                    {
                        "policy": policy,
                        "turn": turn,
                        "session": s,
                        "daemon": names[endpoint or ""],
                        "prompt_tokens": stats.prompt_tokens,
                        "read_tokens": stats.cache_delta.read,
                        "hit": stats.cache_hit_kind,
                        "ttft_s": ttft if ttft is not None else time.perf_counter() - t0,
                    }
                )
                print(
                    f"  [{policy}] turn={turn} session={s:2d} {names[endpoint or '']} "
                    f"prompt={stats.prompt_tokens} read={stats.cache_delta.read} "
                    f"hit={stats.cache_hit_kind} ttft={samples[-1]['ttft_s'] * 1e3:.0f}ms",
                    flush=True,
                )
                history[s] = next_prompt(prompt, text, turn + 1)
    return samples


def summary(samples: list[dict[str, Any]]) -> dict[str, Any]:
    later = [x for x in samples if x["turn"] > 0]
    prev = {(x["session"], x["turn"]): x["prompt_tokens"] for x in samples}
    # the conversation's own history came from the cache (not only the system prompt)
    history_hits = sum(x["read_tokens"] >= prev[(x["session"], x["turn"] - 1)] for x in later)
    ttft = sorted(x["ttft_s"] * 1e3 for x in later)
    prompt = sum(x["prompt_tokens"] for x in later)
    split: dict[str, int] = {}
    for x in samples:
        split[x["daemon"]] = split.get(x["daemon"], 0) + 1
    sticky = {
        s: len({x["daemon"] for x in samples if x["session"] == s})
        for s in {x["session"] for x in samples}
    }
    return {
        "warm": sum(x["hit"] != "cold" for x in later) / len(later),
        "history": history_hits / len(later),
        "mean_ms": statistics.fmean(ttft),
        "reused": sum(x["read_tokens"] for x in later) / prompt if prompt else 0.0,
        "median_ms": statistics.median(ttft),
        "p90_ms": ttft[min(len(ttft) - 1, int(0.9 * len(ttft)))],
        "turn0_ms": statistics.median(x["ttft_s"] * 1e3 for x in samples if x["turn"] == 0),
        "split": split,
        "one_daemon": sum(n == 1 for n in sticky.values()),
        "sessions": len(sticky),
        "later": len(later),
    }


def render(args: argparse.Namespace, mode: str, results: dict[str, dict[str, Any]]) -> str:
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=BENCH
    ).stdout.strip()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    lines = [
        f"## {'Quick' if args.quick else 'Real'}: {mode}",
        "",
        f"{platform.machine()}, {os.cpu_count()} cores (shared with other jobs), "
        f"Python {platform.python_version()}; erllama at {commit}; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Load average at the end: {load}.",
        "",
        f"{args.sessions} stateless chat sessions share a system prompt of {args.system_words} "
        f"words; each opens with its own {args.doc_words}-word document; {args.turns} turns, "
        f"the whole conversation resent as text each turn, {args.reply_tokens} greedy tokens "
        "streamed per turn; each turn serves the sessions in a shuffled order. Two "
        "`erllama serve` (two run dirs) behind one `ClusterClient`; every policy runs on a "
        "fresh pair. *Later turns*: turns 1.. (a conversation's own history is cached "
        "somewhere); *history hit*: a later turn read at least its previous turn's whole "
        "prompt from the cache (the conversation's own history, not only the system "
        "prompt); *warm*: hit kind other than cold (a shared system prompt counts); "
        "*reused*: prompt tokens read from the cache over all later-turn prompt tokens.",
        "",
        "| policy | later turns: history hit | warm | prompt tokens reused "
        "| TTFT median (ms) | p90 | mean | turn 0 median (ms) | requests per daemon "
        "| sessions on one daemon |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for policy, r in results.items():
        split = ", ".join(f"{k}: {v}" for k, v in sorted(r["split"].items()))
        lines.append(
            f"| {policy} | {r['history'] * 100:.0f}% | {r['warm'] * 100:.0f}% "
            f"| {r['reused'] * 100:.0f}% | {r['median_ms']:.0f} | {r['p90_ms']:.0f} "
            f"| {r['mean_ms']:.0f} | {r['turn0_ms']:.0f} | {split} "
            f"| {r['one_daemon']}/{r['sessions']} |"
        )
    return "\n".join(lines) + "\n"


TITLE = """# Prefix routing against round robin (two daemons, one machine)

`bench/bench_routing.py` (`--quick`: the stub backend). How to read it: with round robin
a later turn lands on the daemon that holds its conversation only by chance (about half
the time with two daemons); on the other daemon it still reuses the shared system
prompt (so it counts as *warm*) but prefills the conversation's own history again: the
p90 and mean TTFT show those. Prefix routing keeps every conversation on one daemon.
The median moves less because the half of round robin's turns that land right are
as fast. Requests are sequential, so the load tie-breaker never fires: the
split over the daemons is HRW's draw over 16 conversations.
"""


def merge(out: Path, section: str, *, quick: bool) -> str:
    """The results file with this mode's section replaced (the other mode's kept)."""
    old = out.read_text() if out.exists() else ""
    sections = {"quick": "", "real": ""}
    for part in old.split("\n## ")[1:]:
        sections["quick" if part.startswith("Quick") else "real"] = "## " + part.rstrip() + "\n"
    sections["quick" if quick else "real"] = section
    body = "\n".join(x for x in (sections["real"], sections["quick"]) if x)
    return TITLE + "\n" + body


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="stub backend instead of the real model")
    p.add_argument("--sessions", type=int, default=16)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--system-words", type=int, default=120)
    p.add_argument("--doc-words", type=int, default=200)
    p.add_argument("--reply-tokens", type=int, default=16)
    p.add_argument("--prefill-ms", type=float, default=0.5, help="stub: prefill ms per token")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path, default=BENCH / "results" / "routing.md")
    args = p.parse_args(argv)
    mode = (
        f"stub backend, {args.prefill_ms} ms prefill per token"
        if args.quick
        else "Gemma 3 270M Q4_K_M (the bundled model), n_threads = 2"
    )
    config = STUB.format(prefill_ms=args.prefill_ms) if args.quick else REAL
    raw: dict[str, list[dict[str, Any]]] = {}
    results: dict[str, dict[str, Any]] = {}
    for policy in ("prefix", "round_robin"):
        raw[policy] = run_policy(policy, config, args)
        results[policy] = summary(raw[policy])
    text = render(args, mode, results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(merge(args.out, text, quick=args.quick))
    kind = "quick" if args.quick else "real"
    args.out.with_name(f"{args.out.stem}-{kind}.json").write_text(json.dumps(raw, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
