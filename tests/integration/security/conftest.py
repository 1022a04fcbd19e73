"""The daemon fixtures for the security tests (tests/support/daemon.py)."""

from tests.support.daemon import daemon, daemon_factory

__all__ = ["daemon", "daemon_factory"]
