"""Plot workload 1 (TTFT against prompt length) to ``bench/results/ttft_vs_length.png``.

matplotlib is not a project dependency. It is looked up in the venv, then in
``bench/.cache/pylib`` (gitignored), where it is installed on first use with
``pip install --target`` (the venv itself is left alone). Without network and
without matplotlib the plot is skipped with a message; the tables do not
need it.

Usage: ``.venv/bin/python bench/plot.py [bench/results/raw/ttft_vs_length.json]``
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
PYLIB = BENCH / ".cache" / "pylib"
RESULTS = BENCH / "results"


def _matplotlib() -> Any:
    try:
        import matplotlib
    except ImportError:
        if not PYLIB.exists():
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "install",
                    "-q",
                    "--target",
                    str(PYLIB),
                    "matplotlib",
                ],
                check=False,
            )
        sys.path.append(str(PYLIB))
        try:
            import matplotlib
        except ImportError:
            return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


LCP, LCPC, SRV, ERL = (
    "llama-cpp-python",
    "llama-cpp-python + LlamaRAMCache",
    "llama-server",
    "erllama",
)
GRAY, BROWN, BLUE, RED, BLACK = "tab:gray", "tab:brown", "tab:blue", "tab:red", "black"

# (peer key in the raw data, measurement, label, color, line style, marker)
SERIES = [
    (LCP, "cold", "llama-cpp-python: cold", GRAY, "-", "o"),
    (LCP, "live", "llama-cpp-python: exact (live KV, kept logits: no decode)", GRAY, ":", "o"),
    (LCPC, "restored", "llama-cpp-python + LlamaRAMCache: exact (restored)", BROWN, "--", "v"),
    (SRV, "cold", "llama-server: cold", BLUE, "-", "s"),
    (SRV, "restored", "llama-server: exact (--cache-ram restore)", BLUE, "--", "s"),
    (SRV, "live", "llama-server: exact (live slot)", BLUE, ":", "s"),
    (SRV, "prefix", "llama-server: prefix +64", BLUE, "-.", "s"),
    (ERL, "cold", "erllama: cold", RED, "-", "D"),
    (ERL, "restored", "erllama: exact (restored from the ram tier)", RED, "--", "D"),
    (ERL, "live", "erllama: exact (live KV)", RED, ":", "D"),
    (ERL, "prefix", "erllama: prefix +64 (trie)", RED, "-.", "D"),
    ("floor", "exact", "floor: set_data + 1 decode (in process)", BLACK, "--", "x"),
    ("floor", "exact_logits", "floor: set_data + stored logits (in process)", BLACK, ":", "+"),
    ("floor", "prefix", "floor: set_data + prefill 64 (in process)", BLACK, "-.", "x"),
]


def plot(raw_path: Path, out: Path) -> Path | None:
    plt = _matplotlib()
    if plt is None:
        print(
            "plot skipped: matplotlib is not installed and could not be installed", file=sys.stderr
        )
        return None
    raw = json.loads(raw_path.read_text())
    peers = raw["peers"]
    fig, ax = plt.subplots(figsize=(13, 6.5), dpi=110)
    for key, kind, label, color, ls, marker in SERIES:
        data = peers.get(key)
        if not data:
            continue
        xs, ys = [], []
        for n in sorted(data, key=int):
            vals = data[n]["samples"].get(kind) or []
            if vals:
                xs.append(int(n))
                ys.append(statistics.median(vals) * 1e3)
        if xs:
            ax.plot(xs, ys, label=label, lw=1.6, ms=5, color=color, ls=ls, marker=marker)
    ax.set_xscale("log", base=2)
    lengths = sorted({int(n) for d in peers.values() for n in d})
    ax.set_xticks(lengths)
    ax.set_xticklabels([str(n) for n in lengths])
    ax.minorticks_off()
    ax.set_yscale("log")
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("time to first token, client side (ms, median)")
    machine = raw.get("machine", {})
    ax.set_title(
        f"{machine.get('model', 'Gemma 3 270M Q4_K_M')} — "
        + f"{machine.get('cpu', '')[:48]}, {machine.get('cores', '?')} cores",
        fontsize=10,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def main() -> int:
    raw = Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS / "raw" / "ttft_vs_length.json"
    out = plot(raw, RESULTS / "ttft_vs_length.png")
    if out:
        print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
