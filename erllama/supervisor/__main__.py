"""``python -m erllama.supervisor [--config PATH]``: run the daemon in the foreground."""

from __future__ import annotations

import argparse
import sys

from erllama import logs
from erllama.config import ConfigError, load_config
from erllama.supervisor.daemon import serve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m erllama.supervisor", description=__doc__)
    parser.add_argument(
        "--config", "-c", help="TOML configuration file (default: built-in defaults)"
    )
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config)
    except (ConfigError, OSError) as exc:
        print(f"erllama: bad configuration: {exc}", file=sys.stderr)
        return 2
    logs.setup("root", "root", level=cfg.daemon.log_level, log_file=cfg.daemon.log_file)
    return serve(cfg)


if __name__ == "__main__":
    sys.exit(main())
