"""`tunekit` command line: each command is glue over a library function of the same name.

User errors (`TunekitError`) are printed without a traceback and exit with code 1.
"""

from __future__ import annotations

import json
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


@app.command("eval")
def eval_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A tunekit run dir (config.yaml + final/) or a model dir")],
    data: Annotated[Path | None, typer.Option("--data", help="Held-out JSONL chat examples "
                                                             "(default: the run's eval.data / data.validation)")] = None,
    baseline: Annotated[list[str] | None, typer.Option("--baseline", help="base | few-shot:K | a model dir; "
                                                                          "repeatable (default: base)")] = None,
    model: Annotated[list[Path] | None, typer.Option("--model", help="Another model dir or run to compare")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Report folder (default: RUN_DIR/eval)")] = None,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="Evaluate the first N examples")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1)] = 256,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 8,
    scorer: Annotated[str | None, typer.Option("--scorer", help="module:function(prediction, reference, "
                                                                "example) -> float | dict")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed for choosing few-shot examples")] = 0,
) -> None:
    """Compare the fine-tuned run with baselines on held-out data; write report.md/.html + results.json."""
    from tunekit.evaluate import evaluate
    from tunekit.report import write_report

    try:
        result = evaluate(run_dir, data, baselines=baseline, models=model or [], max_new_tokens=max_new_tokens,
                          batch_size=batch_size, limit=limit, scorer=scorer, seed=seed,
                          log=lambda message: err_console.print(f"[dim]{message}[/]", highlight=False))
        files = write_report(result.to_dict(), out or run_dir / "eval", metrics_path=run_dir / "metrics.jsonl")
    except TunekitError as exc:
        fail(exc)
    verdict = json.loads(files["results"].read_text(encoding="utf-8"))["verdict"]
    for line in verdict:
        console.print(f"• {line}", highlight=False)
    console.print(f"[green]✓[/] report: {files['html']}  ({files['markdown'].name}, {files['results'].name})")


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
