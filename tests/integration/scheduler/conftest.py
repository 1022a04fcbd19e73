from tests.support.daemon import daemon_factory

__all__ = ["daemon_factory"]
