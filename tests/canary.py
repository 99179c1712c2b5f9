"""Canaries: tests that watch a third-party bug tunekit works around.

A canary tells the news without failing: while the library still has the bug, the canary passes (the
workaround is needed); when an upgrade fixes it, the canary skips with a message naming the package and
version, so CI stays green and the skip reason (shown by `pytest -ra`) says the workaround can be
reconsidered. tunekit's own behaviour is checked by separate tests that hold either way.
"""

from __future__ import annotations

from importlib.metadata import version

import pytest


def still_broken(broken: bool, package: str, what: str) -> None:
    """Pass while `broken`; otherwise skip with the news that `package` (at its installed version) changed."""
    if not broken:
        pytest.skip(f"canary: {package} {version(package)} no longer shows this bug: {what}")
