"""Test-only helpers shared by the suites (a fake root, child process targets)."""
