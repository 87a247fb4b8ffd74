"""The Python API as the README documents it, run the ways users run Python."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT, task_dict, write_task

README = (ROOT / "README.md").read_text(encoding="utf-8")
SNIPPET = re.search(r"The same from Python:\n\n```python\n(.*?)```", README, re.S).group(1)  # type: ignore[union-attr]


def _python(args: list[str], cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    """Run Python in ``cwd`` with this checkout's mltask, as a user's session would import it."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, *args], cwd=cwd, input=stdin, capture_output=True, text=True, env=env,
                          timeout=600)


def _user_dir(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "task_templates", tmp_path / "task_templates")
    return tmp_path


def _check(proc: subprocess.CompletedProcess, tmp_path: Path) -> None:
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("Traceback") == 0, proc.stderr[-3000:]
    doc = json.loads((tmp_path / "out" / "wine" / "results.json").read_text())
    assert doc["status"] == "finished" and doc["counts"]["complete"] == doc["counts"]["planned"]
    assert proc.stdout.split()[-1] == repr(doc["best"]["mean_score"])  # what the snippet prints last


def test_readme_snippet_runs_as_a_script_without_a_main_guard(tmp_path: Path) -> None:
    """Regression: every worker re-ran the user's script (multiprocessing's main-module preparation)."""
    assert "__main__" not in SNIPPET
    (_user_dir(tmp_path) / "search.py").write_text(SNIPPET)
    _check(_python(["search.py"], tmp_path), tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["-c", "stdin", "repl"])
def test_readme_snippet_runs_from_c_stdin_and_an_interactive_session(tmp_path: Path, how: str) -> None:
    """From stdin, workers looked for a main module file called `<stdin>`; a REPL has no file at all."""
    _user_dir(tmp_path)
    args = {"-c": ["-c", SNIPPET], "stdin": ["-"], "repl": ["-i"]}[how]
    _check(_python(args, tmp_path, stdin=None if how == "-c" else SNIPPET + "\n"), tmp_path)


def test_api_exports_what_the_readme_uses() -> None:
    from mltask import TaskError, abort_task, errors, resume_task, run_task, runner

    assert (run_task, resume_task, abort_task, TaskError) == (runner.run_task, runner.resume_task,
                                                              runner.abort_task, errors.TaskError)


def test_a_mltask_folder_in_the_working_directory_does_not_replace_mltask_in_workers(tmp_path: Path) -> None:
    """Regression: the forkserver put the working directory first on its import path."""
    work = tmp_path / "work"
    (work / "mltask").mkdir(parents=True)
    (work / "mltask" / "__init__.py").write_text("raise SystemExit('this is not mltask')\n")
    write_task(work, task_dict())
    script = tmp_path / "elsewhere" / "search.py"  # like the `mltask` command: not in the working directory
    script.parent.mkdir()
    script.write_text("from mltask import run_task\nrun_task('task.json', workers=2, output='out', quiet=True)\n")
    proc = _python([str(script)], work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((work / "out" / "results.json").read_text())
    assert doc["counts"]["complete"] == 8 and doc["counts"]["failed"] == 0
