"""`tunekit` command line: each command is glue over a library function of the same name.

User errors (`TunekitError`) are printed without a traceback and exit with code 1.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from tunekit.errors import ERROR_FILE_ENV, Problem, TunekitError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Check, see, train and evaluate fine-tunes of open LLMs on OpenAI-format chat data.")
config_app = typer.Typer(no_args_is_help=True, help="Validate and show run configs.")
data_app = typer.Typer(no_args_is_help=True, help="Check, preview and convert data files.")
app.add_typer(config_app, name="config")
app.add_typer(data_app, name="data")

console = Console()
err_console = Console(stderr=True)

Overrides = Annotated[list[str] | None, typer.Argument(help="Dotted overrides, e.g. train.lr=2e-4")]


def fail(exc: TunekitError, code: int = 1) -> None:
    if os.environ.get("RANK", "0") != "0":  # several processes: the main one (rank 0) reports
        raise typer.Exit(code)
    if os.environ.get(ERROR_FILE_ENV):  # a job's training: its worker reads the error from there
        import json

        from tunekit.fsio import write_text_atomic

        write_text_atomic(Path(os.environ[ERROR_FILE_ENV]), json.dumps(
            {"title": exc.title, "problems": [{"where": p.where, "message": p.message, "hint": p.hint}
                                              for p in exc.problems]}))
    if exc.title:
        err_console.print(f"[bold red]error:[/] {escape(exc.title)}", highlight=False)
    for problem in exc.problems:
        # the texts are plain: a `[gguf]` in a hint or `[0]` in a field is shown, not read as console markup
        where = f"[bold]{escape(problem.where)}[/]: " if problem.where else ""
        err_console.print(f"  [red]✗[/] {where}{escape(problem.message)}", highlight=False)
        if problem.hint:
            err_console.print(f"      [dim]hint:[/] {escape(problem.hint)}", highlight=False)
    raise typer.Exit(code)


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


SHOWN_PER_SEVERITY = 30  # rows per severity in the human output; --show all lists every stored one
NOTE_LINES = 5  # line numbers named per note code


def _print_check_report(report, show_all: bool = False) -> None:
    """Human report of a data.check.CheckReport, readable at 80 columns: errors first (line, field,
    message, hint), then warnings, then notes summarised per code; statistics and token estimates."""
    from rich.table import Table

    colors = {"error": "red", "warning": "yellow", "info": "blue"}
    main = report.path

    def place(p) -> str:
        where = "file" if p.line is None else f"line {p.line}" + (f":{p.column}" if p.column else "")
        return where if (p.file or main) == main else f"{Path(p.file).name} {where}"

    noun = "pairs" if report.format == "preference" else "examples"
    head = f"[bold]{escape(main)}[/]: {report.lines:,} lines, {report.examples:,} valid {noun}"
    if report.validation is not None:
        head += f"; validation [bold]{escape(report.validation)}[/]: {report.validation_examples:,} valid {noun}"
    console.print(head, highlight=False)
    for severity, title in (("error", "Errors"), ("warning", "Warnings")):
        total = report.count(severity)
        if not total:
            continue
        rows = [p for p in report.problems if p.severity == severity]
        shown = rows if show_all else rows[:SHOWN_PER_SEVERITY]
        table = Table(title=f"{title} ({total:,})", title_justify="left", title_style=f"bold {colors[severity]}")
        table.add_column("where", no_wrap=True)
        table.add_column("field, problem and hint", overflow="fold", ratio=1)
        for p in shown:
            table.add_row(place(p), (f"[bold]{escape(p.path)}[/]\n" if p.path else "")
                          + f"[{colors[severity]}]{p.code}[/]: {escape(p.message)}"
                          + (f"\n[dim]hint: {escape(p.hint)}[/]" if p.hint else ""))
        console.print(table)
        if len(shown) < total:
            console.print(f"[dim]{len(shown):,} of {total:,} {title.lower()} shown: --show all lists "
                          f"{len(rows):,}, --json gives them as data[/]")
    notes = [code for code, sev in report.severities.items() if sev == "info" and report.counts.get(code)]
    if notes:
        console.print("[bold blue]Notes[/]")
    for code in sorted(notes, key=lambda c: -report.counts[c]):
        stored = [p for p in report.problems if p.code == code]
        lines = [place(p).removeprefix("line ") for p in (stored if show_all else stored[:NOTE_LINES])]
        more = ", ..." if report.counts[code] > len(lines) else ""
        console.print(f"  [blue]{code}[/]: {report.counts[code]:,}, line{'s' if len(lines) > 1 else ''} "
                      f"{', '.join(lines)}{more}", highlight=False)
        if stored and stored[0].hint:
            console.print(f"    [dim]{escape(stored[0].message)}: {escape(stored[0].hint)}[/]", highlight=False)
    s = report.stats
    if s is not None:
        table = Table(title=f"{report.examples:,} examples ({report.format}), lengths in {s.unit}",
                      title_justify="left")
        for col in ("per example", "min", "p5", "median", "mean", "p95", "max", "total"):
            table.add_column(col, justify="left" if col == "per example" else "right")
        for name, summ in (("messages", s.messages), (s.unit, s.length), (f"trained {s.unit}", s.trained)):
            if summ is not None:
                table.add_row(name, *(f"{v:,.0f}" if float(v).is_integer() else f"{v:,.1f}"
                                      for v in (summ.min, summ.p5, summ.median, summ.mean, summ.p95, summ.max,
                                                summ.total)))
        console.print(table)
        if s.without_system_message is not None:
            console.print(f"examples without a system message: {s.without_system_message:,}; "
                          f"without a user message: {s.without_user_message:,}")
        console.print(f"recommended epochs: {s.epochs}")
        if s.max_len is not None:
            fate = "dropped" if s.truncation == "drop" else "cut"
            console.print(f"examples longer than {s.max_len} tokens: {s.over_max_len:,} ({fate}; "
                          f"{s.trained_lost:,} trained tokens lost)")
        if s.tokens_per_epoch is not None:
            console.print(f"tokens per epoch: {s.tokens_per_epoch:,} processed, {s.trained_tokens_per_epoch:,} trained")
            console.print(f"estimated for {s.epochs} epochs: {s.estimated_tokens:,} tokens processed "
                          f"(compute and cost follow these), {s.estimated_trained_tokens:,} trained")
    if report.preference is not None:
        _print_pair_stats(report.preference)
    for note in report.notes:
        console.print(f"[dim]note: {escape(note)}[/]")
    verdict = "[green]✓ no errors[/]" if report.ok else f"[red]✗ {report.errors:,} error(s)[/]"
    console.print(f"{verdict}, {report.warnings:,} warning(s), {report.count('info'):,} note(s)")


def _print_pair_stats(s) -> None:
    """The statistics of a preference file (data.check.PreferenceStats)."""
    from rich.table import Table

    forms = ", ".join(f"{form} {n:,}" for form, n in sorted(s.forms.items()))
    table = Table(title=f"{s.pairs:,} pairs ({forms}), lengths in {s.unit}", title_justify="left")
    for col in ("per pair", "min", "p5", "median", "mean", "p95", "max", "total"):
        table.add_column(col, justify="left" if col == "per pair" else "right")
    for name, summ in (("prompt", s.prompt), ("chosen", s.chosen), ("rejected", s.rejected)):
        table.add_row(name, *(f"{v:,.0f}" if float(v).is_integer() else f"{v:,.1f}"
                              for v in (summ.min, summ.p5, summ.median, summ.mean, summ.p95, summ.max, summ.total)))
    console.print(table)
    console.print(f"pairs whose replies differ only in whitespace: {s.whitespace_only:,} "
                  f"({s.whitespace_only_share:.1%})")
    console.print(f"recommended epochs: {s.epochs}")
    if s.max_len is not None:
        fate = ("dropped: a reply is never cut" if s.truncation == "drop" else
                f"{s.prompt_cut:,} kept with the prompt's start cut, {s.completion_cut:,} refused: a reply alone "
                "does not fit")
        console.print(f"pairs longer than {s.max_len} tokens: {s.over_max_len:,} ({fate})")


@data_app.command("check")
def data_check(
    file: Path,
    validation: Annotated[Path | None, typer.Option("--validation", help="Validation JSONL (checked for overlap)")] = None,
    model: Annotated[str | None, typer.Option("--model", help="Local model dir or hub id: token statistics")] = None,
    max_len: Annotated[int | None, typer.Option("--max-len", min=1, help="Count examples longer than this")] = None,
    fmt: Annotated[str, typer.Option("--format", help="auto, chat, completion, text or preference")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON")] = False,
    max_line_bytes: Annotated[int, typer.Option("--max-line-bytes", min=1,
                                                help="Longer lines are reported, not loaded")] = 16 * 2**20,
    truncation: Annotated[str, typer.Option("--truncation", help="What training does past --max-len: "
                                                                 "drop (the default) or truncate")] = "drop",
    show: Annotated[str, typer.Option("--show", help="summary (30 rows per severity) or all")] = "summary",
    cache: Annotated[bool, typer.Option("--cache/--no-cache", help="With --model: read (or write) the rendered "
                                        "data cache that training uses")] = True,
) -> None:
    """Check a data file: every problem with its line and JSON path, length statistics, epoch estimate.
    A preference file (DPO pairs: OpenAI's or TRL's) is checked as pairs."""
    from tunekit.data.check import check_file
    from tunekit.model import load_tokenizer

    if fmt not in ("auto", "chat", "completion", "text", "preference"):
        fail(TunekitError(Problem("--format", f"unknown format {fmt!r}",
                                  "use auto, chat, completion, text or preference")))
    if truncation not in ("drop", "truncate"):
        fail(TunekitError(Problem("--truncation", f"unknown mode {truncation!r}", "use drop or truncate")))
    if show not in ("summary", "all"):
        fail(TunekitError(Problem("--show", f"unknown value {show!r}", "use summary or all")))
    try:
        tokenizer = load_tokenizer(model, where="--model") if model else None
        report = check_file(file, validation=validation, tokenizer=tokenizer, max_len=max_len, fmt=fmt,
                            max_line_bytes=max_line_bytes, truncation=truncation,  # type: ignore[arg-type]
                            cache=cache)
    except TunekitError as exc:
        fail(exc)
    if as_json:
        sys.stdout.write(json.dumps(report.to_dict(), indent=2, ensure_ascii=False) + "\n")
    else:
        _print_check_report(report, show_all=show == "all")
    raise typer.Exit(0 if report.ok else 1)


@data_app.command("preview")
def data_preview(
    file: Path,
    model: Annotated[str, typer.Option("--model", help="Local model dir or hub id (its tokenizer and template)")],
    n: Annotated[int, typer.Option("-n", min=1, help="How many examples")] = 3,
) -> None:
    """Print examples as the model's chat template renders them, trained tokens highlighted (a preference pair:
    the prompt once, then both replies)."""
    from tunekit.data.formats import load_examples
    from tunekit.data.preference import preference_form
    from tunekit.data.preview import (
        MARK_STYLE,
        TRAINED_CLOSE,
        TRAINED_OPEN,
        TRAINED_STYLE,
        preview_example,
        preview_pair,
    )
    from tunekit.data.render import template_warnings
    from tunekit.model import load_tokenizer

    try:
        tokenizer = load_tokenizer(model, where="--model")
        _, examples = load_examples(file)
        if getattr(tokenizer, "chat_template", None):
            for warning in template_warnings(tokenizer):
                err_console.print(f"[yellow]note:[/] {escape(warning)}", highlight=False)
        console.print(f"legend: [{MARK_STYLE}]{TRAINED_OPEN}[/][{TRAINED_STYLE}]trained[/][{MARK_STYLE}]"
                      f"{TRAINED_CLOSE}[/] [dim]not trained[/]", highlight=False)
        for line, example in examples[:n]:
            try:
                shown = (preview_pair(example, tokenizer) if preference_form(example)
                         else preview_example(example, tokenizer))
            except TunekitError as exc:
                raise type(exc)([Problem(f"{file}:{line} {p.where}".strip(), p.message, p.hint)
                                 for p in exc.problems]) from None
            console.rule(f"{file}:{line}  {shown.tokens} tokens, {shown.trained} trained"
                         + (f", {shown.sequences} sequences" if shown.sequences > 1 else ""))
            console.print(shown.text, highlight=False, markup=False)
    except TunekitError as exc:
        fail(exc)


@data_app.command("convert")
def data_convert(
    src: Path,
    dst: Path,
    source: Annotated[str | None, typer.Option("--from", help="Input format: sharegpt or alpaca (to chat)")] = None,
    to: Annotated[str | None, typer.Option("--to", help="Preference pairs (OpenAI's or TRL's, detected per line) "
                                                        "to openai-dpo or trl")] = None,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Leave bad records out instead of failing")] = False,
) -> None:
    """Convert ShareGPT or Alpaca JSONL to OpenAI chat JSONL, or preference pairs between OpenAI's DPO lines
    and TRL's chosen / rejected (written atomically)."""
    from tunekit.data.convert import convert_file

    if source is None and to is None:
        fail(TunekitError(Problem("--from", "say what to convert", "--from sharegpt|alpaca converts to chat, "
                                                                   "--to openai-dpo|trl converts preference pairs")))
    if source is not None and to is not None:
        fail(TunekitError(Problem("--to", "--from and --to cannot be combined", "--from sharegpt|alpaca converts to "
                                  "chat; --to openai-dpo|trl reads preference pairs of either form")))
    if source is not None and source not in ("sharegpt", "alpaca"):
        fail(TunekitError(Problem("--from", f"unknown input format {source!r}", "use sharegpt or alpaca")))
    if to is not None and to not in ("openai-dpo", "trl"):
        fail(TunekitError(Problem("--to", f"unknown preference format {to!r}", "use openai-dpo or trl")))
    try:
        result = convert_file(src, dst, source, to=to, skip_bad=skip_bad)  # type: ignore[arg-type]
    except TunekitError as exc:
        fail(exc)
    for issue in result.skipped:
        err_console.print(f"  [yellow]skipped[/] [bold]{issue.where}[/]: {issue.message}", highlight=False)
    left_out = len({issue.line for issue in result.skipped})
    console.print(f"[green]✓[/] wrote {result.written} {'pairs' if to else 'examples'} to {dst}"
                  + (f" ({left_out} bad records left out)" if result.skipped else ""))


# ------------------------------------------------------------------------------------------- data cache

cache_app = typer.Typer(no_args_is_help=True, help="Show or clear the on-disk cache of rendered data.")
data_app.add_typer(cache_app, name="cache")
CacheDir = Annotated[Path | None, typer.Option("--dir", help="Cache folder (default: $TUNEKIT_DATA_CACHE or "
                                                             "~/.cache/tunekit/data)")]


@cache_app.command("info")
def data_cache_info(cache_dir: CacheDir = None) -> None:
    """List the cached renders: data file, examples, tokens, size, when written."""
    from tunekit.data import cache

    folder = cache_dir or cache.default_dir()
    found = cache.entries(folder)
    console.print(f"{folder}: {len(found)} entr{'y' if len(found) == 1 else 'ies'}, "
                  f"{sum(e.size_bytes for e in found) / 2**20:.1f} MiB", highlight=False)
    for e in found:
        m = e.meta
        console.print(f"  {e.key}  {m.get('data_file')}  {m.get('examples')} examples, {m.get('tokens')} tokens "
                      f"({m.get('trained_tokens')} trained), {e.size_bytes / 2**20:.1f} MiB, {m.get('created')}",
                      highlight=False, markup=False)


@cache_app.command("clear")
def data_cache_clear(cache_dir: CacheDir = None) -> None:
    """Remove every cached render (the next run renders its data again)."""
    from tunekit.data import cache

    folder = cache_dir or cache.default_dir()
    console.print(f"[green]✓[/] removed {cache.clear(folder)} entries from {folder}", highlight=False)


keys_app = typer.Typer(no_args_is_help=True, help="Make, list and revoke the API keys `tunekit serve --data-dir "
                                                  "DIR` accepts (kept hashed in DIR/tunekit.db; a running server "
                                                  "sees changes at once).")
app.add_typer(keys_app, name="keys")
KeysDataDir = Annotated[Path, typer.Option("--data-dir", help="The server's --data-dir")]


def _key_store(data_dir: Path, *, create: bool = False):
    """The data dir's store, closed when the command ends."""
    from contextlib import closing

    from tunekit.serve.store import Store

    if not create and not (data_dir / "tunekit.db").is_file():
        fail(TunekitError(Problem("--data-dir", f"{data_dir / 'tunekit.db'} does not exist",
                                  "give the folder `tunekit serve --data-dir` uses")))
    return closing(Store(data_dir))


@keys_app.command("create")
def keys_create(project: Annotated[str, typer.Option("--project", help="The project the key's requests belong to")],
                data_dir: KeysDataDir = Path("serve-data")) -> None:
    """Make a key of PROJECT and print it (once: only its hash is kept)."""
    from tunekit.serve.keys import create_key

    try:
        with _key_store(data_dir, create=True) as store:
            row, key = create_key(store, project)
    except TunekitError as exc:
        fail(exc)
    sys.stdout.write(key + "\n")
    err_console.print(f"[green]✓[/] {row['id']} of project {escape(project)} in {escape(str(data_dir))}: "
                      "keep the key now, it is not shown again", highlight=False)


@keys_app.command("list")
def keys_list(data_dir: KeysDataDir = Path("serve-data")) -> None:
    """Every key: id, project, created, last 4 characters, revoked."""
    import time

    from tunekit.serve.keys import PREFIX, list_keys

    def utc(t: int) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(t))

    console.print(f"{'ID':<17} {'PROJECT':<16} {'CREATED':<20} {'KEY':<10} REVOKED", highlight=False, markup=False)
    with _key_store(data_dir) as store:
        keys = list_keys(store)
    for k in keys:
        revoked = utc(k["revoked_at"]) if k["revoked_at"] else "no"
        console.print(f"{k['id']:<17} {k['project']:<16} {utc(k['created_at']):<20} {PREFIX + '…' + k['last4']:<10} "
                      f"{revoked}", highlight=False, markup=False, soft_wrap=True)


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(metavar="ID", help="A key's id (key_...)")],
                data_dir: KeysDataDir = Path("serve-data")) -> None:
    """Revoke a key: requests with it get a 401 from now on, also on a running server."""
    from tunekit.serve.keys import revoke_key

    try:
        with _key_store(data_dir) as store:
            row = revoke_key(store, key_id)
    except TunekitError as exc:
        fail(exc)
    console.print(f"[green]✓[/] {row['id']} (project {escape(row['project'])}) is revoked", highlight=False)


@app.command("eval")
def eval_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A tunekit run dir (config.yaml + final/) or a model dir")],
    data: Annotated[Path | None, typer.Option("--data", help="Held-out JSONL chat examples "
                                                             "(default: the run's eval.data / data.validation)")] = None,
    baseline: Annotated[list[str] | None, typer.Option("--baseline", help="base | few-shot:K | rag:K | a model dir; "
                                                                          "repeatable (default: base)")] = None,
    model: Annotated[list[Path] | None, typer.Option("--model", help="Another model dir or run to compare")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Report folder (default: RUN_DIR/eval)")] = None,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="Evaluate the first N examples")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1)] = 256,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 8,
    scorer: Annotated[str | None, typer.Option("--scorer", help="module:function(prediction, reference, "
                                                                "example) -> float | dict")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed for choosing few-shot examples")] = 0,
    device: Annotated[str, typer.Option("--device", help="auto (cuda when available) | cpu | cuda")] = "auto",
    grader: Annotated[list[Path] | None, typer.Option("--grader", help="An OpenAI grader file (JSON or YAML; one "
                                                                       "grader or a list) scoring every candidate's "
                                                                       "replies; repeatable (docs/graders.md)")] = None,
) -> None:
    """Compare the fine-tuned run with baselines on held-out data; write report.md/.html + results.json."""
    from tunekit.eval.evaluate import evaluate
    from tunekit.eval.report import write_report

    try:
        result = evaluate(run_dir, data, baselines=baseline, models=model or [], max_new_tokens=max_new_tokens,
                          batch_size=batch_size, limit=limit, scorer=scorer, seed=seed, device=device,
                          graders=grader or [],
                          log=lambda message: err_console.print(f"[dim]{escape(message)}[/]", highlight=False))
        files = write_report(result.to_dict(), out or run_dir / "eval", metrics_path=run_dir / "metrics.jsonl")
    except TunekitError as exc:
        fail(exc)
    verdict = json.loads(files["results"].read_text(encoding="utf-8"))["verdict"]
    for line in verdict:
        console.print(f"• {line}", highlight=False)
    console.print(f"[green]✓[/] report: {files['html']}  ({files['markdown'].name}, {files['results'].name})")


@app.command("train")
def train_cmd(
    file: Path,
    overrides: Overrides = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the run dir's last checkpoint")] = False,
    nproc: Annotated[int, typer.Option("--nproc", min=1, help="Processes to train on (one per GPU; on CPU they "
                                                              "share the cores); see docs/distributed.md")] = 1,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan and the memory estimate per process, "
                                                            "then stop (no weights load, nothing is written)")] = False,
) -> None:
    """Train as the config says (full, LoRA or QLoRA); writes the run dir named by output.dir."""
    from tunekit.config import load_config
    from tunekit.errors import ConfigError
    from tunekit.train import distributed
    from tunekit.train.loop import STOPPED_EXIT_CODE, TrainingStopped, check_setup, train

    try:
        cfg = load_config(file, overrides or [])
        if dry_run:
            train(cfg, resume=resume, console=err_console, dry_run=True, processes=nproc)
            return
        if nproc > 1 and distributed.launched_world_size() == 1:
            problems = check_setup(cfg, resume=resume, world_size=nproc)  # once, before any process starts
            if problems:
                raise ConfigError(problems, title="cannot start training")
            code = distributed.launch(nproc, ["train", str(file), *(overrides or []),
                                              *(["--resume"] if resume else [])], stopped_exit_code=STOPPED_EXIT_CODE)
            raise typer.Exit(code)
        result = train(cfg, resume=resume, console=err_console)
    except TrainingStopped as exc:  # a pause (the STOP file), not a failure
        fail(exc, STOPPED_EXIT_CODE)
    except TunekitError as exc:
        fail(exc)
    if distributed.launched_world_size() == 1 or os.environ.get("RANK") == "0":
        run_dir, here = Path(result.run_dir).resolve(), Path.cwd().resolve()  # examples/x/../../runs/y -> runs/y
        shown = run_dir.relative_to(here) if run_dir.is_relative_to(here) else run_dir
        console.print(f"[green]✓[/] run dir: {escape(str(shown))}", highlight=False)


@app.command("chat")
def chat(
    run_dir: Annotated[Path, typer.Argument(help="A run dir (or its final/), or a model dir")],
    prompt: Annotated[str | None, typer.Argument(help="One message; without it: read stdin, or talk on a terminal")] = None,
    system: Annotated[str | None, typer.Option(help="A system message put before the conversation")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 256,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy")] = 0.0,
) -> None:
    """Talk to a trained model. Replies stop at the chat template's end of turn."""
    from tunekit.generate.chat import load_chat, reply

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


@app.command("serve")
def serve(
    models: Annotated[list[str] | None, typer.Argument(help="Model dir, hub id, run dir, or NAME=PATH; repeatable")] = None,
    host: Annotated[str, typer.Option("--host", help="Address to bind (other than loopback needs --api-key)")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535)] = 8000,
    api_key: Annotated[list[str] | None, typer.Option("--api-key", help="Accepted bearer key, KEY or PROJECT:KEY; "
                                                                          "repeatable (also TUNEKIT_API_KEYS=K1,K2)")] = None,
    data_dir: Annotated[Path | None, typer.Option("--data-dir", help="Folder for files and fine-tuning jobs "
                                                                     "(turns on /v1/files and /v1/fine_tuning)")] = None,
    api_keys_file: Annotated[Path | None, typer.Option("--api-keys-file", help="A file of keys, one KEY or "
                                                                              "PROJECT:KEY a line (# comments)")] = None,
    workers: Annotated[int, typer.Option("--workers", min=1, help="Fine-tuning jobs trained at once")] = 1,
    train_processes: Annotated[int, typer.Option("--train-processes", min=1, help="Processes each fine-tuning job "
                                                 "trains on (tunekit train --nproc; one per GPU)")] = 1,
    device: Annotated[str, typer.Option("--device", help="auto (cuda when available) | cpu | cuda")] = "auto",
    max_adapters: Annotated[int, typer.Option("--max-adapters", min=1, help="Adapters kept loaded per base")] = 4,
    prefix_cache_mib: Annotated[int, typer.Option("--prefix-cache-mib", min=0, help="Memory for the keys and "
                                                  "values of earlier prompts, reused by prompts that start the "
                                                  "same way (0: off)")] = 256,
    threads: Annotated[int | None, typer.Option("--threads", min=1, help="torch CPU threads "
                                                                          "(default: all cores but one)")] = None,
) -> None:
    """Serve models, runs and their adapters behind an OpenAI-compatible API (/v1/chat/completions)."""

    import uvicorn
    from pydantic import ValidationError

    from tunekit.serve.app import ServeSettings, check_exposure, create_app

    keys = list(api_key or []) + [k.strip() for k in os.environ.get("TUNEKIT_API_KEYS", "").split(",") if k.strip()]
    if api_keys_file is not None:
        try:
            lines = api_keys_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            fail(TunekitError(Problem("--api-keys-file", f"cannot read {api_keys_file}: {exc}",
                                      "give a UTF-8 text file with one KEY or PROJECT:KEY a line")))
        keys += [line.split("#", 1)[0].strip() for line in lines if line.split("#", 1)[0].strip()]
    if not models:
        fail(TunekitError(Problem("MODEL", "no model to serve", "give a model dir, a run dir or NAME=PATH")))
    try:
        settings = ServeSettings(models=models, host=host, port=port, api_keys=keys, data_dir=data_dir,
                                 workers=workers, train_processes=train_processes, device=device,
                                 max_adapters=max_adapters, prefix_cache_mib=prefix_cache_mib, threads=threads)
    except ValidationError as exc:
        fail(TunekitError([Problem(f"--{'.'.join(map(str, e['loc'])).replace('_', '-')}", e["msg"])
                           for e in exc.errors()]))
    try:
        check_exposure(settings)  # before any weight loads
        if data_dir is not None:
            data_dir.mkdir(parents=True, exist_ok=True)
        application = create_app(settings)
    except TunekitError as exc:
        fail(exc)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    names = ", ".join(application.state.models)
    from tunekit.serve.store import stored_keys_exist

    guarded = keys or (data_dir is not None and stored_keys_exist(data_dir))
    err_console.print(f"[green]✓[/] serving {names} at http://{host}:{port}/v1"
                      + ("" if guarded else " (no API key: loopback only)"), highlight=False)
    uvicorn.run(application, host=host, port=port, access_log=False, log_level="warning",
                timeout_graceful_shutdown=30)


@app.command("export")
def export_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A tunekit run dir (config.yaml + final/)")],
    fmt: Annotated[str, typer.Option("--format", help="merged | adapter | gguf | ollama")],
    checkpoint: Annotated[str | None, typer.Option("--checkpoint", help="step-N: export that checkpoint")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Output folder (default: RUN_DIR/export/FORMAT)")] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="merged weights: auto (the run's) | fp32 | bf16 | fp16")] = "auto",
    quant: Annotated[str, typer.Option("--quant", help="GGUF tensor type: f32 | f16 | bf16 | q8_0")] = "f16",
    name: Annotated[str | None, typer.Option("--name", help="Model name (default: the run dir's name)")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output folder")] = False,
    converter: Annotated[Path | None, typer.Option("--converter", help="llama.cpp source tree with "
                                                                       "convert_hf_to_gguf.py (gguf, ollama)")] = None,
    allow_mismatch: Annotated[bool, typer.Option("--allow-mismatch", help="gguf, ollama: write the GGUF even when "
                                                 "llama.cpp is known or measured to answer differently from the "
                                                 "trained model (a warning with the numbers)")] = False,
) -> None:
    """Export a run: merged weights, the LoRA adapter, a GGUF file, or GGUF + an Ollama Modelfile."""
    from tunekit.export.export import export

    try:
        result = export(run_dir, fmt=fmt, out=out, checkpoint=checkpoint, dtype=dtype, quant=quant, name=name,
                        overwrite=overwrite, converter=converter, allow_mismatch=allow_mismatch,
                        log=lambda message: err_console.print(f"[dim]{escape(message)}[/]", highlight=False))
    except TunekitError as exc:
        fail(exc)
    for note in result.notes:
        console.print(f"note: {note}", highlight=False, markup=False)
    for file, size in result.files.items():
        console.print(f"  {file}  {size / 1024 / 1024:.1f} MiB", highlight=False)
    console.print(f"[green]✓[/] {result.fmt} export in {result.out} ({result.seconds:.1f} s)", highlight=False)
    if result.command:
        console.print(f"run it: {result.command}", highlight=False, markup=False)


@app.command("migrate")
def migrate_cmd(
    from_base_url: Annotated[str, typer.Option("--from-base-url", help="The source API")] = "https://api.openai.com/v1",
    api_key: Annotated[str | None, typer.Option("--api-key", envvar="OPENAI_API_KEY", show_default=False,
                                                help="The source account's key (default: $OPENAI_API_KEY)")] = None,
    model_map: Annotated[list[str] | None, typer.Option("--model-map", help="SOURCE_MODEL=BASE, repeatable: the open "
                                                        "base each source model trains on here (a folder: a model "
                                                        "dir, run dir or hub id; a server: a model it serves)")] = None,
    to: Annotated[str, typer.Option("--to", help="A folder (a run config per job) or a tunekit server's "
                                                 "http://HOST:PORT/v1 (queued jobs)")] = "migrated",
    to_api_key: Annotated[str | None, typer.Option("--to-api-key", help="The destination server's key")] = None,
    values: Annotated[list[str] | None, typer.Option("--set", help="KEY=VALUE tunekit config values every job gets "
                                                     "(a job's `tunekit` object), e.g. lora.r=32; repeatable")] = None,
    job: Annotated[list[str] | None, typer.Option("--job", help="Only this source job (repeatable; failed and "
                                                                "cancelled jobs are carried only so)")] = None,
    state_dir: Annotated[Path | None, typer.Option("--state-dir", help="A server destination: where the fetched "
                                                   "files and the state are kept (default: tunekit-migrate)")] = None,
    run: Annotated[bool, typer.Option("--run", help="Carry it out (default: print the plan, write nothing)")] = False,
) -> None:
    """Bring an OpenAI account's fine-tuning jobs and their files over: a folder of run configs, or queued jobs on a
    tunekit server. Prints the plan and writes nothing without --run; resumable, nothing fetched twice."""
    try:
        from tunekit.migrate import describe, migrate

        plan = migrate(source=from_base_url, api_key=api_key, model_map=model_map or [], to=to, to_api_key=to_api_key,
                       values=values or [], jobs=job or [], state_dir=state_dir, run=run,
                       log=lambda message: err_console.print(f"[dim]{escape(message)}[/]", highlight=False))
    except ImportError as exc:
        from tunekit.errors import install_command

        fail(TunekitError(Problem("tunekit migrate", f"needs the serve extra ({exc.name} is not installed)",
                                  install_command("serve"))))
    except TunekitError as exc:
        fail(exc)
    for line in describe(plan):
        console.print(line, highlight=False, markup=False, soft_wrap=True)
    raise typer.Exit(1 if plan.failed else 0)


def main() -> None:
    # Set for the command-line process only (importing tunekit.cli changes nothing): third-party
    # notices that tell a tunekit user nothing they can act on. peft 0.18-0.21 reads transformers 5's
    # deprecated `is_gradient_checkpointing`; bitsandbytes on AVX512-BF16 CPUs logs at import that an
    # optional 4-bit kernel package is not installed.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        app()
    except TunekitError as exc:  # a library call outside a command's own handler
        try:
            fail(exc)
        except typer.Exit as done:
            sys.exit(done.exit_code)


if __name__ == "__main__":
    main()
