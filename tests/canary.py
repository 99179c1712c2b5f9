"""Canaries: tests that watch a third-party bug tunekit works around.

A canary tells the news without failing: while the library still has the bug, the canary passes (the
workaround is needed); when an upgrade fixes it, the canary skips with a message naming the package and
version, so CI stays green and the skip reason (shown by `pytest -ra`) says the workaround can be
reconsidered. A bug that shows only on some CPUs skips, where it cannot show, saying it cannot be checked
there (`only_on_cpu_with`), never that it is fixed. tunekit's own behaviour is checked by separate tests that
hold either way.
"""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import pytest


def still_broken(broken: bool, package: str, what: str) -> None:
    """Pass while `broken`; otherwise skip with the news that `package` (at its installed version) changed."""
    if not broken:
        pytest.skip(f"canary: {package} {version(package)} no longer shows this bug: {what}")


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    info = Path("/proc/cpuinfo")
    text = info.read_text(encoding="utf-8", errors="replace") if info.is_file() else ""
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


def only_on_cpu_with(flag: str, package: str, what: str) -> None:
    """Skip, saying so, where the bug cannot show: it needs a CPU with `flag` (as /proc/cpuinfo names it)."""
    if flag not in cpu_flags():
        pytest.skip(f"canary: {package} {version(package)}: {what}: cannot be checked on this CPU (needs {flag})")
