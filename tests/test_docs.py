"""Every shell command and Python snippet in README.md, docs/*.md and examples/*/README.md, run as written.

Where they run: a copy of this working tree (its files that git tracks or would track: no .venv, no runs/) in
a temporary folder, with its own .venv layered over this one (a .pth naming this venv's site-packages) and set
up by the project's own `scripts/setup.sh`. So every command runs from the repository root as a user's would,
`tunekit` and `python` are the copy's, and nothing the commands write (runs/, serve-data/, example data
regenerated) touches this checkout.

How a document is read:
- ```bash blocks: each command (a line with its `\\` continuations) runs on its own in bash from the root and
  must exit 0. A command ending in `&` runs in the background; its block waits for it at the end (it must
  exit 0 too).
- `tunekit serve ...` (with or without `&`) starts in the background on a free port (`--port N` or `--port
  PORT` replaced), must answer /health, and stays up until its document ends or the next server starts; `:N`
  and `:PORT` in the later commands and snippets of that document name the free port.
- ```python blocks run as one script with the copy's python from the root.
- Other blocks (yaml, json, output) are not run.
- A `<!-- doctest: {...} -->` comment on the line before a block changes how it runs, in the document where a
  reader sees it: `"skip": REASON` (the block is not run), `"skip_commands": {PREFIX: REASON}` (commands that
  start with PREFIX are not run), `"append": {PREFIX: ARGS}` (ARGS appended to commands that start with
  PREFIX, e.g. a step limit for a command that trains for minutes), `"replace": {OLD: NEW}` (text replaced in
  the block), `"why"`: why it was shortened.

Each command is one test, named FILE:LINE and the command; skipped ones skip with their reason, so `pytest -ra`
lists every documented command that did not run and why. The tests of one document depend on the earlier ones
(a run trained, a server started): run the module whole.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import REPO
from live_server import free_port

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "examples").glob("*/README.md"))]
MARKER = re.compile(r"^<!--\s*doctest:\s*(\{.*\})\s*-->\s*$")
FENCE = re.compile(r"^```(\w*)\s*$")
COMMAND_TIMEOUT_S = 900
COPY_IGNORE = (".venv", ".git", "runs", "serve-data", "__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache",
               "build", "dist", ".whl", ".gl", ".hypothesis")


@dataclass
class Command:
    doc: str  # the document, relative to the repository
    line: int  # where the command starts in it
    lang: str  # bash | python
    text: str  # as written (python: the whole block)
    last_in_block: bool
    marker: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        first = self.text.strip().splitlines()[0] if self.text.strip() else ""
        return f"{self.doc}:{self.line} {first[:70]}"


def read_blocks(path: Path) -> list[tuple[int, str, str, dict]]:
    """(line of the first body line, language, body, doctest marker) of every fenced block."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        marker = {}
        if i > 0 and (found := MARKER.match(lines[i - 1].strip())):
            marker = json.loads(found.group(1))
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        blocks.append((i + 2, opening.group(1), "\n".join(lines[i + 1:end]), marker))
        i = end + 1
    return blocks


def bash_commands(body: str, first_line: int) -> list[tuple[int, str]]:
    """(line, command) for each command of a bash block; continuation lines are joined, blank lines and
    comment-only lines dropped."""
    out, pending, start = [], [], 0
    for k, line in enumerate(body.splitlines()):
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if not pending:
            start = first_line + k
        pending.append(line)
        if not line.rstrip().endswith("\\"):
            out.append((start, "\n".join(pending)))
            pending = []
    return out


def collect() -> list[Command]:
    commands = []
    for path in DOCS:
        doc = str(path.relative_to(REPO))
        for first_line, lang, body, marker in read_blocks(path):
            for old, new in marker.get("replace", {}).items():
                assert old in body, f"{doc}:{first_line}: the doctest marker replaces {old!r}, which is not there"
                body = body.replace(old, new)
            if lang in ("bash", "sh", "shell"):
                found = bash_commands(body, first_line)
                commands += [Command(doc, line, "bash", text, k == len(found) - 1, marker)
                             for k, (line, text) in enumerate(found)]
            elif lang == "python":
                commands.append(Command(doc, first_line, "python", body, True, marker))
    return commands


COMMANDS = collect()


# --------------------------------------------------------------------------------------------------
# The copy of the repository the commands run in


@dataclass
class Sandbox:
    root: Path
    env: dict
    servers: list = field(default_factory=list)  # (doc, Popen, log path)
    background: list = field(default_factory=list)  # (command id, Popen, log path) of the current block
    ports: dict = field(default_factory=dict)  # "8000" / "PORT" -> the free port, for the current document
    port_doc: str = ""

    def stop_servers(self) -> None:
        for _, proc, _ in self.servers:  # the whole process group: what the command started goes too
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(30)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self.servers.clear()


def copy_tree(dest: Path) -> None:
    """The files of this working tree that git tracks or would track (ignored build outputs left out)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True) if (REPO / ".git").exists() else None
    if listed is None or listed.returncode != 0:
        shutil.copytree(REPO, dest, ignore=shutil.ignore_patterns(*COPY_IGNORE), symlinks=True)
        return
    for name in listed.stdout.decode().split("\0"):
        source = REPO / name
        if name and source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name, follow_symlinks=False)


def copy_scripts(source: Path, dest: Path) -> None:
    """The console scripts of this venv (torchrun, ...) as the layered venv's own: run by its python."""
    python = dest / "python"
    for script in source.iterdir():
        target = dest / script.name
        if target.exists() or not script.is_file():
            continue
        head = script.read_bytes()[:200]
        if head.startswith(b"#!") and b"python" in head.split(b"\n", 1)[0]:
            body = script.read_text(encoding="utf-8").split("\n", 1)[1]
            target.write_text(f"#!{python}\n{body}", encoding="utf-8")
            target.chmod(0o755)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    root = tmp_path_factory.mktemp("docs") / "tunekit"
    root.mkdir()
    copy_tree(root)
    # its own venv, seeing every package of this one; setup.sh then installs the copy's tunekit into it
    subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(root / ".venv")], check=True)
    site = Path(subprocess.run([str(root / ".venv" / "bin" / "python"), "-c",
                                "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "tunekit-parent-venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n", encoding="utf-8")
    copy_scripts(Path(sys.executable).parent, root / ".venv" / "bin")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(PATH=f"{root / '.venv' / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}", VIRTUAL_ENV=str(root / ".venv"),
               PYTHONUNBUFFERED="1", TUNEKIT_EXTRAS="dev,serve,rag,gguf")
    setup = subprocess.run(["bash", "scripts/setup.sh"], cwd=root, env=env, capture_output=True, text=True,
                           timeout=COMMAND_TIMEOUT_S)
    assert setup.returncode == 0, setup.stdout[-3000:] + setup.stderr[-3000:]
    box = Sandbox(root, env)
    yield box
    box.stop_servers()
    for _, proc, _ in box.background:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


# --------------------------------------------------------------------------------------------------
# Running one command


def without_comment(text: str) -> str:
    """The command without a trailing `# comment` (one with no quote in it), so arguments can follow."""
    return re.sub(r"\s+#[^'\"\n]*$", "", text)


def is_server(text: str) -> bool:
    return text.strip().startswith("tunekit serve")


def with_ports(text: str, box: Sandbox) -> str:
    for written, port in box.ports.items():
        text = re.sub(rf"(127\.0\.0\.1|localhost):{written}\b", rf"\g<1>:{port}", text)
    return text


def wait_healthy(proc: subprocess.Popen, port: int, log: Path) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the server exited with code {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"the server did not answer /health in 180 s:\n{log.read_text(errors='replace')[-3000:]}")


def finish_block(box: Sandbox) -> None:
    """Wait for the block's background commands; each must exit 0."""
    waiting, box.background = box.background, []
    for command_id, proc, log in waiting:
        try:
            code = proc.wait(COMMAND_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"{command_id} (in the background) did not end in {COMMAND_TIMEOUT_S} s")
        assert code == 0, f"{command_id} (in the background) exited with {code}:\n" \
                          f"{log.read_text(errors='replace')[-4000:]}"


def run_command(cmd: Command, box: Sandbox) -> None:
    if box.port_doc != cmd.doc:  # a new document: its servers are its own
        box.stop_servers()
        box.ports, box.port_doc = {}, cmd.doc
    logs = box.root.parent / "logs"
    logs.mkdir(exist_ok=True)
    log = logs / f"{len(list(logs.iterdir())):03d}.log"
    if cmd.lang == "python":
        script = logs / f"snippet-{cmd.line}.py"
        script.write_text(with_ports(cmd.text, box), encoding="utf-8")
        done = subprocess.run([str(box.root / ".venv" / "bin" / "python"), str(script)], cwd=box.root, env=box.env,
                              capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
        assert done.returncode == 0, f"exit {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-4000:]}"
        return
    text = without_comment(cmd.text.strip())
    background = text.endswith("&") and not text.endswith("&&")
    text = text.rstrip("&").rstrip() if background else text
    for prefix, args in cmd.marker.get("append", {}).items():
        if text.startswith(prefix):
            text = f"{without_comment(text)} {args}"
    if is_server(text):
        port = free_port()
        found = re.search(r"--port[ =](\S+)", text)
        if found:
            box.ports[found.group(1)] = port
            text = text[:found.start()] + f"--port {port}" + text[found.end():]
        else:
            box.ports["8000"] = port
            text += f" --port {port}"
        proc = subprocess.Popen(["bash", "-c", text], cwd=box.root, env=box.env, stdout=log.open("w"),
                                stderr=subprocess.STDOUT, start_new_session=True)
        box.servers.append((cmd.doc, proc, log))
        wait_healthy(proc, port, log)
        return
    text = with_ports(text, box)
    if background:
        proc = subprocess.Popen(["bash", "-c", text], cwd=box.root, env=box.env, stdout=log.open("w"),
                                stderr=subprocess.STDOUT, start_new_session=True)
        box.background.append((cmd.id, proc, log))
        return
    done = subprocess.run(["bash", "-c", text], cwd=box.root, env=box.env, capture_output=True, text=True,
                          timeout=COMMAND_TIMEOUT_S)
    assert done.returncode == 0, f"{text}\nexit {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-4000:]}"


def skip_reason(cmd: Command) -> str | None:
    if "skip" in cmd.marker:
        return cmd.marker["skip"]
    for prefix, reason in cmd.marker.get("skip_commands", {}).items():
        if cmd.text.strip().startswith(prefix):
            return reason
    return None


@pytest.mark.parametrize("cmd", COMMANDS, ids=[c.id for c in COMMANDS])
def test_documented_command_runs_as_written(cmd: Command, sandbox: Sandbox):
    try:
        reason = skip_reason(cmd)
        if reason is not None:
            pytest.skip(f"{cmd.id}: {reason}")
        run_command(cmd, sandbox)
    finally:
        if cmd.last_in_block:
            finish_block(sandbox)


# --------------------------------------------------------------------------------------------------
# The reader itself


def test_every_doc_is_read_and_markers_parse():
    assert {"README.md", "docs/dashboard.md", "examples/quickstart/README.md"} <= {c.doc for c in COMMANDS}
    assert any(c.lang == "python" for c in COMMANDS) and any(is_server(c.text) for c in COMMANDS)
    for c in COMMANDS:
        assert set(c.marker) <= {"skip", "skip_commands", "append", "replace", "why"}, c.id
        if c.marker.get("append") or c.marker.get("replace"):
            assert c.marker.get("why"), f"{c.id}: say why the command is shortened"


def test_bash_commands_join_continuations_and_drop_comments():
    body = "# a comment\ntunekit train run.yaml \\\n    --nproc 2   # two\n\npython x.py &\n"
    assert bash_commands(body, 10) == [(11, "tunekit train run.yaml \\\n    --nproc 2   # two"), (14, "python x.py &")]
    assert without_comment("tunekit train a.yaml   # -> runs/a/") == "tunekit train a.yaml"
    assert without_comment("tunekit chat r \"a # b\"") == "tunekit chat r \"a # b\""


# --------------------------------------------------------------------------------------------------
# What running the documents as written cannot see: checks of their text against the code


PIP_INSTALL = re.compile(r"pip install((?:[ \t]+[^\s`'\"(),;]+|[ \t]+'[^']*'|[ \t]+\"[^\"]*\")+)")
# install hints in files whose owners have yet to move them to tunekit.errors.install_command: each entry must
# still hold a bare `pip install` (the test fails once it is gone, so the entry goes too)

def bypasses_the_lock(text: str) -> list[str]:
    """The `pip install ...` commands in `text` that neither take the lock as constraints (-c) nor pin each
    requirement (==): they install whatever the registry holds today."""
    bad = []
    for found in PIP_INSTALL.finditer(text):
        args = found.group(1).split()
        if "-c" in args or "--constraint" in args:
            continue
        wanted = [a.strip("'\"") for a in args if not a.startswith("-") and not a.startswith("$")]
        if not wanted or all("==" in a for a in wanted):
            continue
        bad.append(found.group(0))
    return bad


def test_no_documented_install_bypasses_the_lock():
    """README, docs and example READMEs, the scripts and tunekit's own hints install through
    scripts/setup.sh (`TUNEKIT_EXTRAS=EXTRA bash scripts/setup.sh`), every version from requirements/lock.txt."""
    assert bypasses_the_lock("`pip install -e '.[serve]'`, `pip install '.[gguf]'`\n(pip install tunekit[rag])") == [
        "pip install -e '.[serve]'", "pip install '.[gguf]'", "pip install tunekit[rag]"]
    assert bypasses_the_lock('a bare `pip install` would; pip install -q -c "$LOCK" -e ".[dev]"; '
                             'pip install -q torch==2.13.0') == []
    files = [*DOCS, *sorted((REPO / "scripts").glob("*.sh")), *sorted((REPO / "src" / "tunekit").rglob("*.py"))]
    found = {}
    for path in files:
        name = str(path.relative_to(REPO))
        if name == "scripts/lock.sh":  # makes the lock: installs the registry's newest on purpose
            continue
        if bad := bypasses_the_lock(path.read_text(encoding="utf-8")):
            found[name] = bad
    assert found == {}


def test_the_install_hint_is_the_readmes_and_keeps_its_extra():
    """The CLI prints hints as plain text: `[gguf]` or `[0]` are not eaten as console markup, and the GGUF
    export's hint is the README's install line for the gguf extra."""
    from tunekit import cli
    from tunekit.errors import Problem, TunekitError, install_command
    from tunekit.export.export import INSTALL_GGUF

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert INSTALL_GGUF == install_command("gguf") and f"`{INSTALL_GGUF}`" in readme
    for extra in ("serve", "rag", "trackers", "qlora"):
        assert f"`{install_command(extra)}`" in readme, extra
    with cli.err_console.capture() as captured, pytest.raises(cli.typer.Exit) as stopped:
        cli.fail(TunekitError(Problem("messages[0].content", "needs [gguf]", "pip install 'x[gguf]'"),
                              title="[bold]title[/]"))
    assert stopped.value.exit_code == 1
    text = captured.get()
    assert "[bold]title[/]" in text and "messages[0].content: needs [gguf]" in text
    assert "hint: pip install 'x[gguf]'" in text


def _script_commands(script: Path) -> list[list[str]]:
    """The tunekit and python commands a run script runs, its variables ($T, $E, $Q, .venv/bin/) expanded."""
    text = script.read_text(encoding="utf-8")
    names = dict(re.findall(r"^(\w+)=(\S+)$", text, re.M))
    out = []
    for line in text.splitlines():
        line = line.strip()
        for var, value in names.items():
            line = line.replace(f"${var}/", f"{value}/").replace(f"${var} ", f"{value} ")
        line = line.replace(".venv/bin/", "")
        if line.startswith(("tunekit ", "python ")):
            out.append(line.split())
    return out


def _doc_commands(doc: str) -> list[list[str]]:
    return [without_comment(c.text.replace("\\\n", " ")).split() for c in COMMANDS
            if c.doc == doc and c.lang == "bash" and c.text.startswith(("tunekit ", "python "))]


@pytest.mark.parametrize(("script", "doc"), [("examples/rag/run.sh", "examples/rag/README.md"),
                                             ("scripts/quickstart.sh", "examples/quickstart/README.md")])
def test_an_examples_readme_lists_what_its_script_runs(script, doc):
    """The README's "it runs:" block: the script's commands in its order, each with the same options (values
    compared where neither side stands for one: `$VAR` in the script, `...` in the README)."""
    ran, listed = _script_commands(REPO / script), _doc_commands(doc)
    assert [c[:3] for c in ran] == [c[:3] for c in listed[-len(ran):]], (ran, listed)
    for mine, theirs in zip(ran, listed[-len(ran):], strict=True):
        ours, documented = _options(mine), _options(theirs)
        assert list(ours) == list(documented), (mine, theirs)
        for option, value in ours.items():
            if not any(mark in value + documented[option] for mark in ("$", "...", '"', "'")):
                assert value == documented[option], (option, mine, theirs)


def _options(command: list[str]) -> dict[str, str]:
    """--option -> the word after it ("" for a flag)."""
    return {a: (command[k + 1] if k + 1 < len(command) and not command[k + 1].startswith("--") else "")
            for k, a in enumerate(command) if a.startswith("--")}


def test_a_run_scripts_steps_name_the_method_its_config_trains():
    """A step that says "LoRA" trains a LoRA, one that says "full" a full fine-tune (config.yaml's method)."""
    import yaml

    for script, config in [("examples/rag/run.sh", "examples/rag/config.yaml"),
                           ("scripts/quickstart.sh", "examples/quickstart/config.yaml")]:
        method = yaml.safe_load((REPO / config).read_text(encoding="utf-8"))["method"]
        steps = re.findall(r'^step "([^"]*)"', (REPO / script).read_text(encoding="utf-8"), re.M)
        training = [s for s in steps if "fine-tune" in s]
        assert training, script
        for step in training:
            assert ("LoRA" in step) == (method in ("lora", "qlora")) and ("full" in step) == (method == "full"), \
                (script, step, method)


def test_the_example_configs_take_threads_from_the_free_cores():
    """A fixed `train.threads: 2` ran ~7x slower per step on a machine other work keeps busy (quickstart
    README): the examples the README runs choose from the free cores, and say so."""
    import yaml

    for config in ("examples/quickstart/config.yaml", "examples/rag/config.yaml"):
        assert yaml.safe_load((REPO / config).read_text(encoding="utf-8"))["train"]["threads"] == "auto", config
    assert "`train.threads: auto`" in (REPO / "examples/quickstart/README.md").read_text(encoding="utf-8")


def test_the_screenshot_script_refuses_a_blank_image():
    """scripts/screenshots.py stops (non-zero) rather than publish a frame that did not paint."""
    import importlib.util

    from PIL import Image, ImageDraw

    spec = importlib.util.spec_from_file_location("screenshots", REPO / "scripts" / "screenshots.py")
    screenshots = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(screenshots)
    assert "1 colour(s)" in screenshots.blank(Image.new("RGB", (1144, 575), "white"))
    for shot in sorted((REPO / "docs" / "screenshots").glob("*.png")):  # the published ones are not blank
        assert screenshots.blank(Image.open(shot)) is None, shot
    page = Image.new("RGB", (400, 200), "white")
    ImageDraw.Draw(page).text((10, 10), "a table of numbers", fill="black")
    assert screenshots.blank(page) is None
