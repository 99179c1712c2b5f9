"""The environment tunekit runs in holds exactly the locked versions (requirements/lock.txt).

Walks tunekit's requirements (with every extra whose packages are installed) and theirs, transitively,
and compares each installed distribution with the lock. Runs in the repo's .venv (what the README
commands and CI build); elsewhere it skips, since another environment is not made from the lock.
"""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements" / "lock.txt"


def read_lock() -> dict[str, str]:
    pins = {}
    for raw in LOCK.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"lock line without an exact pin: {raw!r}"
            pins[canonicalize_name(name)] = version
    return pins


def installed(name: str) -> metadata.Distribution | None:
    try:
        return metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return None


def requirement_closure() -> dict[str, str]:
    """name -> installed version, for tunekit's requirements (installed extras included), transitively."""
    tunekit = metadata.distribution("tunekit")
    extras = tunekit.metadata.get_all("Provides-Extra") or []
    todo = [Requirement(r) for r in tunekit.requires or []]
    found: dict[str, str] = {}
    while todo:
        req = todo.pop()
        if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in ["", *extras]):
            continue  # another platform or Python version
        name = canonicalize_name(req.name)
        dist = installed(req.name)
        if name in found or dist is None:
            continue  # already walked, or an extra (or optional dependency) that is not installed
        found[name] = dist.version
        todo += [Requirement(r) for r in dist.requires or [] if "extra ==" not in r]
        todo += [Requirement(r) for r in dist.requires or []
                 if "extra ==" in r and any(Requirement(r).marker.evaluate({"extra": e}) for e in req.extras)]
    return found


def test_lock_pins_every_line_exactly_and_torch_is_the_plain_release():
    pins = read_lock()
    assert {"torch", "transformers", "peft", "tokenizers", "pydantic", "pytest"} <= set(pins)
    assert "+" not in pins["torch"], "the lock names torch's release, not a local build (+cpu / +cu...)"
    assert all(Version(v) for v in pins.values())


@pytest.mark.skipif(Path(sys.prefix).resolve() != (REPO / ".venv").resolve(),
                    reason="runs in the repo's .venv, the environment scripts/setup.sh builds from the lock")
def test_installed_versions_equal_the_lock():
    pins = read_lock()
    closure = requirement_closure()
    assert {"torch", "transformers", "peft", "pydantic", "typer"} <= set(closure)
    missing = sorted(name for name in closure if name not in pins)
    assert not missing, f"installed but not in the lock (run scripts/lock.sh): {missing}"
    differ = {name: (version, pins[name]) for name, version in closure.items()
              if Version(version).public != Version(pins[name]).public}
    assert not differ, f"installed (left) differs from the lock (right): {differ}"
