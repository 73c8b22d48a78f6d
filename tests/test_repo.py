"""The repository's promises to a new user: README's commands are the ones CI runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block, "README.md must open with a bash block of the set-up commands"
    return [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def test_readme_opens_with_the_two_commands():
    commands = _readme_commands()
    assert len(commands) == 2
    assert commands[0].endswith("normlayers-bench") and "pytest" in commands[1]


def test_ci_runs_readme_test_command_verbatim():
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert _readme_commands()[1] in ci_lines


def test_console_script_points_at_the_cli():
    text = (ROOT / "pyproject.toml").read_text()
    assert 'normlayers-bench = "normlayers.bench.cli:main"' in text
