"""`tunekit` command line: each command is glue over a library function of the same name.

User errors (`TunekitError`) are printed without a traceback and exit with code 1.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

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


@app.command("chat")
def chat(
    run_dir: Annotated[Path, typer.Argument(help="A run dir (or its final/), or a model dir")],
    prompt: Annotated[str | None, typer.Argument(help="One message; without it: read stdin, or talk on a terminal")] = None,
    system: Annotated[str | None, typer.Option(help="A system message put before the conversation")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 256,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy")] = 0.0,
) -> None:
    """Talk to a trained model. Replies stop at the chat template's end of turn."""
    from tunekit.chat import load_chat, reply

    history = [{"role": "system", "content": system}] if system else []
    interactive = prompt is None and sys.stdin.isatty()
    if prompt is None and not interactive:
        prompt = sys.stdin.read().strip()  # `echo "..." | tunekit chat RUN_DIR`
        if not prompt:
            fail(TunekitError("nothing to say: stdin was empty", title="chat"))
    try:
        model, tokenizer = load_chat(run_dir)
        if not interactive:
            messages = history + [{"role": "user", "content": prompt}]
            sys.stdout.write(reply(model, tokenizer, messages, max_new_tokens=max_new_tokens,
                                   temperature=temperature) + "\n")
            return
        console.print("[dim]Talking to[/] " + escape(str(run_dir)) + "[dim]. /reset clears the conversation; "
                      "an empty line or Ctrl-D quits.[/]")
        while True:
            try:
                text = console.input("[bold green]you>[/] ")
            except (EOFError, KeyboardInterrupt):
                break
            if not text.strip():
                break
            if text.strip() == "/reset":
                history = history[:1] if system else []
                continue
            history.append({"role": "user", "content": text})
            answer = reply(model, tokenizer, history, max_new_tokens=max_new_tokens, temperature=temperature)
            history.append({"role": "assistant", "content": answer})
            console.print("[bold cyan]model>[/] " + escape(answer), highlight=False)
    except TunekitError as exc:
        fail(exc)


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
