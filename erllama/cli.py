"""The ``erllama`` command: run the daemon, and talk to it from a terminal.

Verbs::

    erllama serve [--config PATH] [--run-dir DIR] [--http HOST:PORT|off]
                                                       run the daemon in the foreground
    erllama load [CONFIG.toml] [--backend B] [--model-path P] [--n-ctx N] [--id ID]
    erllama unload ID
    erllama models                                     one line per model
    erllama complete ID PROMPT [--max-tokens N] [--temperature T] [--seed S] [--stop STR ...]
    erllama chat [MODEL] [--system TEXT] [--response-tokens N]   interactive chat (chat_cli.py)
    erllama status                                     models, phases, cache tiers and budgets
    erllama counters                                   one "name value" line per counter
    erllama scheduler status|enable|disable|check      the memory-pressure scheduler
    erllama scheduler set-thresholds --high X --low Y  (cli_scheduler.py)
    erllama keys DIR [--name NAME ...]                 CURVE key pairs for TCP endpoints

Every verb takes ``--endpoint`` (for ``serve``, the endpoint to bind; for the
others, the one to reach: default ``$ERLLAMA_ENDPOINT``, else the endpoint a
plain ``erllama serve`` binds); the client verbs also take ``--timeout`` and,
for a ``tcp://`` endpoint with CURVE, ``--curve-server-key`` and
``--curve-secret-key`` (key files written by ``erllama keys``).

Output is the product here, so this module writes to stdout/stderr
directly. Errors print ``error: <code>: <message>`` on stderr and exit 1;
usage errors exit 2; an interrupted ``complete`` cancels its request and
exits 130.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from erllama import __version__, chat_cli, cli_scheduler
from erllama.client import Client, Timeout
from erllama.protocol.errors import ErllamaError
from erllama.protocol.messages import DaemonStatus, ModelInfo, Stats

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class CliError(Exception):
    """An error found by the CLI itself (printed as ``error: <code>: <message>``)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# ================================================================ output helpers
def _out(text: str) -> None:
    sys.stdout.write(text)


def _err(text: str) -> None:
    sys.stderr.write(text)


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]], out: TextIO) -> None:
    cells = [[str(h) for h in headers], *[["-" if c is None else str(c) for c in r] for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n")


def _bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # pragma: no cover - unreachable


def stats_line(stats: Stats) -> str:
    """One human line about a finished completion."""
    tok_s = (
        stats.completion_tokens / (stats.generation_ms / 1000.0) if stats.generation_ms > 0 else 0.0
    )
    parts = [
        f"cache {stats.cache_hit_kind}",
        f"prompt {stats.prompt_tokens} tok",
        f"completion {stats.completion_tokens} tok",
        f"prefill {stats.prefill_ms:.1f} ms",
        f"{tok_s:.1f} tok/s",
        f"finish {stats.finish_reason}",
    ]
    return "[" + " | ".join(parts) + "]"


# ================================================================ serve
def cmd_serve(args: argparse.Namespace) -> int:
    import msgspec

    from erllama import logs
    from erllama.config import ConfigError, load_config, validate_http

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        raise CliError("bad_config", str(exc)) from None
    except OSError as exc:
        raise CliError("bad_config", f"{args.config}: {exc.strerror or exc}") from None
    overrides: dict[str, str] = {}
    if args.run_dir is not None:
        overrides["run_dir"] = str(Path(args.run_dir).absolute())
    if args.endpoint is not None:
        overrides["endpoint"] = args.endpoint
    if overrides:
        daemon = msgspec.structs.replace(config.daemon, **overrides)
        config = msgspec.structs.replace(config, daemon=daemon)
    if args.http is not None:
        http = msgspec.structs.replace(config.http, listen=args.http)
        config = msgspec.structs.replace(config, http=http)
        try:
            validate_http(config.http)
        except ConfigError as exc:
            raise CliError("bad_config", str(exc)) from None
    logs.setup("root", "root", level=config.daemon.log_level, log_file=config.daemon.log_file)
    # imported here: only `serve` needs the daemon side
    from erllama.supervisor.daemon import serve

    return serve(config)


# ================================================================ client verbs
def _client(args: argparse.Namespace) -> Client:
    try:
        return Client(
            args.endpoint,
            timeout=args.timeout,
            curve_server_key=args.curve_server_key,
            curve_secret_key=args.curve_secret_key,
        )
    except (OSError, ValueError) as exc:
        raise CliError("bad_key", str(exc)) from None


def _model_table(path: Path) -> dict[str, Any]:
    """The one model table of a TOML file: ``[model]``, one ``[[models]]``, or the top level."""
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as exc:
        raise CliError("bad_config", f"{path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise CliError("bad_config", f"{path}: {exc}") from None
    if isinstance(doc.get("model"), dict) and len(doc) == 1:
        table: dict[str, Any] = doc["model"]
    elif isinstance(doc.get("models"), list) and len(doc) == 1:
        if len(doc["models"]) != 1:
            raise CliError(
                "bad_config", f"{path}: expected one model table, found {len(doc['models'])}"
            )
        table = doc["models"][0]
    elif not any(isinstance(v, dict | list) and k in ("model", "models") for k, v in doc.items()):
        table = doc
    else:
        raise CliError("bad_config", f"{path}: expected one model table ([model] or [[models]])")
    model_path = table.get("model_path")
    if isinstance(model_path, str) and not os.path.isabs(model_path):
        # the daemon runs elsewhere: a relative path is relative to the TOML file
        table = {**table, "model_path": str((path.parent / model_path).absolute())}
    return table


def cmd_load(args: argparse.Namespace) -> int:
    spec: dict[str, Any] = _model_table(Path(args.config)) if args.config else {}
    if args.backend is not None:
        spec["backend"] = args.backend
    if args.model_path is not None:
        spec["model_path"] = str(Path(args.model_path).absolute())
    if args.n_ctx is not None:
        spec["context_opts"] = {**spec.get("context_opts", {}), "n_ctx": args.n_ctx}
    model_id = args.id if args.id is not None else spec.pop("id", None)
    spec.pop("id", None)
    with _client(args) as c:
        _out(c.load_model(spec, model_id) + "\n")
    return EXIT_OK


def cmd_unload(args: argparse.Namespace) -> int:
    with _client(args) as c:
        c.unload(args.id)
    return EXIT_OK


def _model_rows(models: Sequence[ModelInfo]) -> list[list[object]]:
    return [
        [
            m.id,
            m.state,
            m.phase,
            m.pending_len,
            m.backend,
            m.context_size,
            m.quant_tag or m.quant_type,
            m.tier,
            m.restarts,
            m.last_exit,
        ]
        for m in models
    ]


MODEL_HEADERS = (
    "ID",
    "STATE",
    "PHASE",
    "PENDING",
    "BACKEND",
    "CTX",
    "QUANT",
    "TIER",
    "RESTARTS",
    "LAST EXIT",
)


def cmd_models(args: argparse.Namespace) -> int:
    with _client(args) as c:
        models = c.list_models()
    if not models:
        _out("no models loaded\n")
        return EXIT_OK
    _table(MODEL_HEADERS, _model_rows(models), sys.stdout)
    return EXIT_OK


def cmd_complete(args: argparse.Namespace) -> int:
    opts: dict[str, Any] = {
        "response_tokens": args.max_tokens,
        "temperature": args.temperature,
        "seed": args.seed,
        "stop_sequences": args.stop,
    }
    ended_with_newline = True
    stats: Stats | None = None
    with _client(args) as c, c.stream(args.id, args.prompt, **opts) as stream:
        try:
            for event in stream:
                if event.kind in ("token", "tool_call_delta") and event.text:
                    ended_with_newline = event.text.endswith("\n")
                    _out(event.text)
                    sys.stdout.flush()
                elif event.kind == "done":
                    stats = event.stats
        finally:
            if not ended_with_newline:
                _out("\n")
                sys.stdout.flush()
    if stats is not None:
        _err(stats_line(stats) + "\n")
    return EXIT_OK


def cmd_chat(args: argparse.Namespace) -> int:
    with contextlib.ExitStack() as stack:
        stack.enter_context(chat_cli.sigint_blocked())  # Ctrl-C only where the chat waits
        c = stack.enter_context(_client(args))
        return chat_cli.run_chat(c, args)


def _status_text(st: DaemonStatus, out: TextIO) -> None:
    out.write(f"daemon pid {st.pid}, run dir {st.run_dir}\n\n")
    if st.models:
        _table(MODEL_HEADERS, _model_rows(st.models), out)
    else:
        out.write("no models loaded\n")
    out.write("\n")
    if st.tiers:
        rows = []
        for t in st.tiers:
            pct = f"{100.0 * t.used_bytes / t.budget_bytes:.1f}%" if t.budget_bytes else "-"
            rows.append([t.name, _bytes(t.used_bytes), _bytes(t.budget_bytes), pct, t.rows, t.path])
        _table(("TIER", "USED", "BUDGET", "USE", "ROWS", "PATH"), rows, out)
    else:
        out.write("no cache tiers reported\n")
    sched = st.scheduler
    if sched is not None:  # the memory-pressure scheduler's last sample and action
        ratio = sched.get("last_ratio")
        action = sched.get("last_action") or {}
        out.write(
            f"\nscheduler: enabled={sched.get('enabled')} source={sched.get('pressure_source')} "
            f"ratio={'-' if ratio is None else f'{ratio:.3f}'} "
            f"high={sched.get('high_watermark')} low={sched.get('low_watermark')} "
            f"decision={sched.get('last_decision')} plans={sched.get('plans')} "
            f"last_freed={action.get('bytes_freed', 0)}\n"
        )


REMOTE_STATUS_COUNTERS = ("remote_hits", "remote_misses", "remote_errors", "remote_skipped",
                          "remote_corrupt", "remote_uploads", "remote_bytes_up",
                          "remote_bytes_down")  # fmt: skip


def _remote_text(counters: dict[str, int], out: TextIO) -> None:
    """One line of the shared remote tier's counters (under the tier table)."""
    fields = " ".join(
        f"{n.removeprefix('remote_')}={counters.get(n, 0)}" for n in REMOTE_STATUS_COUNTERS
    )
    fetch_ms = counters.get("remote_fetch_ns", 0) / 1e6
    out.write(f"\nremote tier: {fields} fetch_ms={fetch_ms:.1f}\n")


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as c:
        st = c.daemon_status()
        counters = c.counters() if any(t.name == "remote" for t in st.tiers) else None
    _status_text(st, sys.stdout)
    if counters is not None:
        _remote_text(counters, sys.stdout)
    return EXIT_OK


def cmd_counters(args: argparse.Namespace) -> int:
    with _client(args) as c:
        counters = c.counters()
    for name in sorted(counters):
        _out(f"{name} {counters[name]}\n")
    return EXIT_OK


def cmd_keys(args: argparse.Namespace) -> int:
    from erllama.protocol.auth import create_key_pair, public_key

    for name in args.name or ["server", "client"]:
        try:
            public, secret = create_key_pair(args.dir, name)
        except OSError as exc:
            raise CliError("bad_key", str(exc)) from None
        key = public_key(str(public)).decode("ascii")
        _out(f"{name} public_key={key} public={public} secret={secret}\n")
    return EXIT_OK


# ================================================================ parser
def _timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("the timeout must be > 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="erllama",
        description="A supervised llama.cpp daemon with a token-exact KV cache.",
    )
    parser.add_argument("--version", action="version", version=f"erllama {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")

    endpoint = argparse.ArgumentParser(add_help=False)
    endpoint.add_argument(
        "--endpoint",
        help="the daemon's client endpoint (default: $ERLLAMA_ENDPOINT, "
        "else ipc://<run dir>/client.sock)",
    )
    conn = argparse.ArgumentParser(add_help=False, parents=[endpoint])
    conn.add_argument(
        "--timeout",
        type=_timeout,
        default=None,
        metavar="SECONDS",
        help="give up after this many seconds (default: wait for the answer)",
    )
    conn.add_argument(
        "--curve-server-key",
        metavar="KEY",
        help="tcp:// with CURVE: the server's public key (z85) or its .key file",
    )
    conn.add_argument(
        "--curve-secret-key",
        metavar="FILE",
        help="tcp:// with CURVE: this client's .key_secret file (its public key must be "
        "in the daemon's curve_authorized_dir)",
    )

    p = sub.add_parser("serve", help="run the daemon in the foreground", parents=[endpoint])
    p.add_argument("--config", "-c", help="TOML configuration (default: the bundled model)")
    p.add_argument("--run-dir", help="the private run directory (sockets, lock)")
    p.add_argument(
        "--http",
        metavar="HOST:PORT|off",
        help="the HTTP gateway's address (default [http] listen, 127.0.0.1:11480); off: none",
    )
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("load", help="load a model", parents=[conn])
    p.add_argument(
        "config",
        nargs="?",
        metavar="CONFIG.toml",
        help="a TOML file with one model table ([model], one [[models]], or top-level keys)",
    )
    p.add_argument("--backend", choices=("llama", "stub"), help="the backend")
    p.add_argument("--model-path", help="the GGUF file (default: the bundled model)")
    p.add_argument("--n-ctx", type=int, help="the context size in tokens")
    p.add_argument("--id", help="the model id (default: from the file, else generated)")
    p.set_defaults(fn=cmd_load)

    p = sub.add_parser("unload", help="unload a model", parents=[conn])
    p.add_argument("id", metavar="ID")
    p.set_defaults(fn=cmd_unload)

    p = sub.add_parser("models", help="list the models", parents=[conn])
    p.set_defaults(fn=cmd_models)

    p = sub.add_parser("complete", help="stream a completion to the terminal", parents=[conn])
    p.add_argument("id", metavar="ID")
    p.add_argument("prompt", metavar="PROMPT")
    p.add_argument("--max-tokens", type=int, help="cap on generated tokens")
    p.add_argument("--temperature", type=float, help="sampling temperature (default: greedy)")
    p.add_argument("--seed", type=int, help="sampling seed (with --temperature)")
    p.add_argument("--stop", nargs="+", metavar="STR", help="stop sequences")
    p.set_defaults(fn=cmd_complete)

    p = sub.add_parser("chat", help="chat with a model in the terminal", parents=[conn])
    chat_cli.add_arguments(p)
    p.set_defaults(fn=cmd_chat)

    p = sub.add_parser("status", help="models, phases, cache tiers and budgets", parents=[conn])
    p.set_defaults(fn=cmd_status)

    p = sub.add_parser("counters", help="the cache counters", parents=[conn])
    p.set_defaults(fn=cmd_counters)

    cli_scheduler.add_parser(sub, conn, _client)

    p = sub.add_parser(
        "keys",
        help="make CURVE key pairs (NAME.key public, NAME.key_secret secret) in DIR",
    )
    p.add_argument("dir", metavar="DIR", help="where to write them (created 0700)")
    p.add_argument(
        "--name",
        action="append",
        help="a key pair's name (repeatable; default: server and client)",
    )
    p.set_defaults(fn=cmd_keys)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``erllama`` command.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 ok, 1 error, 2 usage error, 130 interrupted.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help/--version (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    fn: Callable[[argparse.Namespace], int] | None = getattr(args, "fn", None)
    if fn is None:
        parser.print_usage(sys.stderr)
        _err("erllama: error: a verb is required\n")
        return EXIT_USAGE
    if getattr(args, "timeout", None) is not None:
        args.timeout = Timeout(request=args.timeout, connect=args.timeout, stream_idle=args.timeout)
    try:
        return fn(args)
    except (ErllamaError, CliError) as exc:
        _err(f"error: {exc.code}: {exc.message}\n")
        return EXIT_ERROR
    except KeyboardInterrupt:
        _err("interrupted\n")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
