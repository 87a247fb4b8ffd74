"""The README's promises: its reference table is current and its commands are the ones CI runs."""

from __future__ import annotations

import re
from pathlib import Path

from mltask.registry import reference_markdown

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_reference_is_generated_from_the_schema() -> None:
    block = re.search(r"<!-- reference:start -->\n(.*)<!-- reference:end -->", README, re.S)
    assert block is not None
    assert block.group(1).strip() == reference_markdown().strip(), "run: python -m mltask.registry --write-readme"


def test_ci_runs_the_readme_test_command() -> None:
    first_screen = README.split("```bash", 1)[1].split("```", 1)[0]  # the two set-up commands
    commands = re.findall(r"^(pip install .*)$", first_screen, re.M)
    assert len(commands) == 2, commands
    assert commands[1] in (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    template = re.search(r"mltask tasks create (\S+)", commands[0])
    assert template is not None and (ROOT / template.group(1)).is_file()
