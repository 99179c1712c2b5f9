"""The README's two commands are the project's contract: they must exist and CI must run the test one."""

import re

from conftest import REPO


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = re.search(r"## The two commands.*?```bash\n(.*?)```", text, re.S)
    assert block, "README has no '## The two commands' bash block"
    return [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def test_readme_names_two_scripts_that_exist():
    commands = readme_commands()
    assert len(commands) == 2
    for command in commands:
        assert command.startswith("bash scripts/")
        assert (REPO / command.split()[1]).is_file(), command


def test_ci_runs_the_readme_test_command():
    test_command = readme_commands()[1]
    assert test_command.split()[1] in (REPO / ".ci" / "run").read_text(encoding="utf-8")
