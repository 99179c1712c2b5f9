"""User-facing errors: each problem names a place (file:line, field path) and a fix.

The CLI catches `TunekitError` and prints its problems without a traceback (exit code 1).
Library callers get the same object and can read `.problems`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    where: str  # "config.yaml:12 train.lr", "data.jsonl:7 messages[2].content", "model.base"
    message: str
    hint: str | None = None

    def __str__(self) -> str:
        text = f"{self.where}: {self.message}" if self.where else self.message
        return f"{text}\n    hint: {self.hint}" if self.hint else text


def install_command(extra: str) -> str:
    """The one way to add an optional extra, as the README gives it: scripts/setup.sh installs it into the
    clone's .venv with every version from requirements/lock.txt (a bare `pip install` would take the registry's
    newest, or replace the editable install)."""
    return f"TUNEKIT_EXTRAS={extra} bash scripts/setup.sh"


class TunekitError(Exception):
    """One or more problems the user can fix. Never raised for bugs in tunekit itself."""

    def __init__(self, problems: list[Problem] | Problem | str, *, title: str | None = None):
        if isinstance(problems, str):
            problems = [Problem("", problems)]
        elif isinstance(problems, Problem):
            problems = [problems]
        self.problems: list[Problem] = list(problems)
        self.title = title
        super().__init__(self.render())

    def render(self) -> str:
        head = [self.title] if self.title else []
        return "\n".join(head + [str(p) for p in self.problems])


class ConfigError(TunekitError):
    """The run config is invalid: every problem is listed, before any weight loads."""


class DataError(TunekitError):
    """A data file cannot be read or used (missing file, wrong format)."""


class TemplateError(TunekitError):
    """A chat template cannot be rendered or masked safely for an example."""


# The environment variable naming a file where the CLI also writes the error it reports, as JSON ({title,
# problems: [{where, message, hint}]}): `tunekit serve`'s worker sets it for the training it starts.
ERROR_FILE_ENV = "TUNEKIT_ERROR_FILE"
