"""`tunekit` command line: each command is glue over a library function of the same name.

User errors (`TunekitError`) are printed without a traceback and exit with code 1.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from tunekit.errors import TunekitError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Check, see, train and evaluate fine-tunes of open LLMs on OpenAI-format chat data.")
config_app = typer.Typer(no_args_is_help=True, help="Validate and show run configs.")
data_app = typer.Typer(no_args_is_help=True, help="Check, preview and convert data files.")
app.add_typer(config_app, name="config")
app.add_typer(data_app, name="data")

console = Console()
err_console = Console(stderr=True)

Overrides = Annotated[list[str] | None, typer.Argument(help="Dotted overrides, e.g. train.lr=2e-4")]


def fail(exc: TunekitError) -> None:
    if exc.title:
        err_console.print(f"[bold red]error:[/] {exc.title}", highlight=False)
    for problem in exc.problems:
        where = f"[bold]{problem.where}[/]: " if problem.where else ""
        err_console.print(f"  [red]✗[/] {where}{problem.message}", highlight=False, markup=True)
        if problem.hint:
            err_console.print(f"      [dim]hint:[/] {problem.hint}", highlight=False)
    raise typer.Exit(1)


@config_app.command("validate")
def config_validate(file: Path, overrides: Overrides = None) -> None:
    """Validate a run config (every problem at once, nothing loaded)."""
    from tunekit.config import load_config

    try:
        load_config(file, overrides or [])
    except TunekitError as exc:
        fail(exc)
    console.print(f"[green]✓[/] {file} is valid")


@config_app.command("show")
def config_show(file: Path, overrides: Overrides = None) -> None:
    """Print the resolved config (defaults filled in, paths resolved)."""
    from tunekit.config import load_config

    try:
        cfg = load_config(file, overrides or [])
    except TunekitError as exc:
        fail(exc)
    sys.stdout.write(cfg.to_yaml())


@app.command("train")
def train_cmd(
    file: Path,
    overrides: Overrides = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the run dir's last checkpoint")] = False,
) -> None:
    """Train as the config says (full, LoRA or QLoRA); writes the run dir named by output.dir."""
    from tunekit.config import load_config
    from tunekit.train import train

    try:
        result = train(load_config(file, overrides or []), resume=resume, console=err_console)
    except TunekitError as exc:
        fail(exc)
    console.print(f"[green]✓[/] run dir: {result.run_dir}", highlight=False)


def main() -> None:
    try:
        app()
    except TunekitError as exc:  # a library call outside a command's own handler
        try:
            fail(exc)
        except typer.Exit as done:
            sys.exit(done.exit_code)


if __name__ == "__main__":
    main()
