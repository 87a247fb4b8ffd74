"""The user's files: what a task file may read, and what mltask may write, replace or remove.

A task file must not send the requestor's other files to providers, and a run must never
lose or overwrite a file that is not the task's own, whatever the output dir (``--output .``
included) and whether or not the new task is valid.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from mltask.errors import TaskError
from mltask.runner import run_task
from tests.support import results, run_cli, task_dict, write_task

SPACE = {"max_depth": {"type": "int", "low": 1, "high": 4}}


def _csv(path: Path) -> Path:
    rng = np.random.default_rng(0)
    rows = [f"{rng.normal():.3f},{rng.normal():.3f},{i % 2}" for i in range(60)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("a,b,label\n" + "\n".join(rows) + "\n")
    return path


def _csv_task(resource: str, csv: str = "data.csv") -> dict:
    return {**task_dict(dataset={"csv": csv, "target": "label"}, search_space=SPACE, n_trials=4),
            "subtasks_count": 2, "resources": [resource]}


def _snapshot(root: Path, but: tuple[str, ...] = ()) -> dict[str, tuple[int, bytes | None]]:
    """Every entry under ``root`` (hidden ones too), with its mode and bytes, except those named in ``but``."""
    entries = {}
    for path in sorted(root.rglob("*")):
        if path.name not in but:
            st = path.lstat()
            entries[str(path.relative_to(root))] = (st.st_mode, path.read_bytes() if path.is_file() else None)
    return entries


def _one_line_error(code: int, out: str, err: str, *fragments: str) -> str:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("mltask: error: "), err
    assert "Traceback" not in err + out
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# -- what a task file may send to providers -------------------------------------------------


def _outside(kind: str, tmp_path: Path, task_dir: Path) -> str:
    """A resource entry for ``kind`` that a task file must not be able to name."""
    if kind == "absolute":
        return "/etc/passwd"
    if kind == "environ":
        return "/proc/self/environ"
    secret = tmp_path / "secret.csv"
    _csv(secret)
    if kind == "dotdot":
        return "../secret.csv"
    if kind == "link_out":
        (task_dir / "data.csv").symlink_to(secret)
        return "data.csv"
    if kind == "hidden":
        _csv(task_dir / ".env")
        return ".env"
    if kind == "fifo":
        os.mkfifo(task_dir / "data.csv")
        return "data.csv"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["absolute", "environ", "dotdot", "link_out", "hidden", "fifo"])
def test_resources_outside_the_task_folder_are_refused(kind: str, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    task_dir = tmp_path / "task"
    task_dir.mkdir()
    # an extra file next to a built-in dataset: nothing else in the task needs it, it would just go to providers
    task = write_task(task_dir, {**task_dict(n_trials=2), "resources": [_outside(kind, tmp_path, task_dir)]})
    before = _snapshot(tmp_path)
    out = tmp_path / "out"
    _one_line_error(*run_cli(["tasks", "create", str(task), "--output", str(out), "--quiet"], capsys), "resources[0]")
    assert not out.exists() and _snapshot(tmp_path) == before  # nothing written, nothing copied


def test_a_named_resources_root_is_allowed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    task_dir, shared = tmp_path / "task", tmp_path / "shared"
    task_dir.mkdir()
    _csv(shared / "data.csv")
    task = write_task(task_dir, _csv_task("../shared/data.csv"))
    out = tmp_path / "out"
    _one_line_error(*run_cli(["tasks", "create", str(task), "--output", str(out), "--quiet"], capsys),
                    "--resources-root")
    code, _, err = run_cli(["tasks", "create", str(task), "--output", str(out), "--quiet",
                            "--resources-root", str(shared)], capsys)
    assert code == 0, err
    assert (out / "resources" / "data.csv").read_bytes() == (shared / "data.csv").read_bytes()


def test_a_task_given_as_a_dict_reads_only_the_current_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TaskError, match=r"resources\[0\]"):
        run_task(_csv_task("/etc/passwd"), output=tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()


def test_a_link_inside_the_folder_keeps_its_listed_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _csv(tmp_path / "raw" / "2024-export.csv")
    (tmp_path / "data.csv").symlink_to(tmp_path / "raw" / "2024-export.csv")
    task = write_task(tmp_path, _csv_task("data.csv"))
    code, _, err = run_cli(["tasks", "create", str(task), "--output", str(tmp_path / "out"), "--quiet"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "out" / "resources").iterdir()) == ["data.csv"]


def test_a_dataset_given_as_a_path_says_to_give_its_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _csv(tmp_path / "data.csv")
    task = write_task(tmp_path, _csv_task("data.csv", csv="../data.csv"))
    _one_line_error(*run_cli(["tasks", "create", str(task), "--output", str(tmp_path / "out"), "--quiet"], capsys),
                    "options.dataset.csv", "as listed in `resources` (e.g. 'data.csv'), not a path")


# -- what a run may write, replace and remove -------------------------------------------------


def _user_folder(root: Path) -> Path:
    """A folder of the user's own: files named like mltask's, and a resources/ folder."""
    _csv(root / "resources" / "data.csv")
    (root / "resources" / "notes.txt").write_text("mine\n")
    (root / "report.md").write_text("# my report\n")
    (root / "results.csv").write_text("my,results\n")
    return root


def test_failed_create_into_an_existing_dir_leaves_it_as_it_was(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    _csv(out / "resources" / "data.csv")
    (out / "resources" / "notes.txt").write_text("mine\n")
    (out / "keep.txt").write_text("mine too\n")
    _csv(tmp_path / "data.csv")
    bad = _csv_task("data.csv")
    bad["options"]["scoring"] = "acuracy"  # found after the resources were copied
    task = write_task(tmp_path, bad)
    before = _snapshot(out)
    _one_line_error(*run_cli(["tasks", "create", str(task), "--output", str(out), "--quiet"], capsys),
                    "options.scoring")
    assert _snapshot(out) == before


def test_force_with_an_invalid_task_keeps_the_previous_results(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    task = write_task(tmp_path, task_dict(n_trials=4))
    assert run_cli(["tasks", "create", str(task), "--output", str(out), "--quiet"], capsys)[0] == 0
    mine = (".mltask.lock",)  # the task's lock file holds the pid of the last process to take it
    before = _snapshot(out, but=mine)
    assert {"state.db", "results.json", "report.md", "model.joblib"} <= set(before)
    typo = write_task(tmp_path, task_dict(n_trials=4, scoring="acuracy"), name="typo.json")
    _one_line_error(*run_cli(["tasks", "create", str(typo), "--output", str(out), "--force", "--quiet"], capsys),
                    "options.scoring")
    assert _snapshot(out, but=mine) == before


@pytest.mark.parametrize("force", [True, False])
def test_a_folder_that_never_held_a_task_is_not_overwritten(force: bool, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """Refused, since the run would overwrite report.md and results.csv; --force replaces a task only."""
    monkeypatch.chdir(_user_folder(tmp_path))
    task = write_task(tmp_path, _csv_task("resources/data.csv"))
    before = _snapshot(tmp_path)
    args = ["tasks", "create", str(task), "--output", ".", "--quiet"] + (["--force"] if force else [])
    _one_line_error(*run_cli(args, capsys), "report.md", "results.csv", "no mltask task")
    assert _snapshot(tmp_path) == before


def test_output_dot_with_resources_in_a_resources_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    data = _csv(tmp_path / "resources" / "data.csv").read_bytes()
    task = write_task(tmp_path, _csv_task("resources/data.csv"))
    code, _, err = run_cli(["tasks", "create", str(task), "--output", ".", "--quiet"], capsys)
    assert code == 0, err
    assert results(tmp_path)["status"] == "finished"
    # --force replaces the task, and keeps the user's file it found in place
    code, _, err = run_cli(["tasks", "create", str(task), "--output", ".", "--force", "--quiet"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "resources").iterdir()) == ["data.csv"]
    assert (tmp_path / "resources" / "data.csv").read_bytes() == data


def test_a_resources_folder_with_other_files_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """Providers get the whole resources folder: the user's unlisted notes.txt must not go with it."""
    monkeypatch.chdir(tmp_path)
    _csv(tmp_path / "resources" / "data.csv")
    (tmp_path / "resources" / "notes.txt").write_text("private\n")
    task = write_task(tmp_path, _csv_task("resources/data.csv"))
    before = _snapshot(tmp_path)
    _one_line_error(*run_cli(["tasks", "create", str(task), "--output", ".", "--quiet"], capsys), "notes.txt")
    assert _snapshot(tmp_path) == before


@pytest.fixture
def unwritable_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory this process cannot create files in, root included."""
    path = tmp_path / "locked"
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o500)
        yield path
        path.chmod(0o700)
        return
    chattr = shutil.which("chattr")
    if chattr and subprocess.run([chattr, "+i", str(path)], capture_output=True).returncode == 0:
        yield path  # immutable: not even root can add a file
        subprocess.run([chattr, "-i", str(path)], check=True)
    else:  # sysfs refuses new files to root too
        yield Path("/sys/kernel")


@pytest.mark.parametrize("case", ["empty", "a_file", "under_a_file", "unwritable", "under_unwritable"])
def test_unusable_output_paths_give_one_line(case: str, tmp_path: Path, unwritable_dir: Path,
                                             monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)  # `--output ""` wrote here
    (tmp_path / "file.txt").write_text("x")
    output = {"empty": "", "a_file": str(tmp_path / "file.txt"), "under_a_file": str(tmp_path / "file.txt" / "out"),
              "unwritable": str(unwritable_dir), "under_unwritable": str(unwritable_dir / "out")}[case]
    task = write_task(tmp_path, task_dict(n_trials=2))
    before = _snapshot(tmp_path)
    _one_line_error(*run_cli(["tasks", "create", str(task), "--output", output, "--quiet"], capsys), "--output")
    assert _snapshot(tmp_path) == before


def test_made_dirs_and_result_files_are_private(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "new" / "out"
    task = write_task(tmp_path, task_dict(n_trials=2))
    assert run_cli(["tasks", "create", str(task), "--output", str(out), "--quiet"], capsys)[0] == 0
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o700
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    for name in ("state.db", "results.json", "results.csv", "best.json", "model.joblib", "report.md"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o600, name
    assert json.loads((out / "results.json").read_text())["status"] == "finished"


def test_an_empty_output_path_in_the_task_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TaskError, match=r"options\.output_path: is empty"):
        run_task(task_dict(n_trials=2, output_path=""), quiet=True)
    assert list(tmp_path.iterdir()) == []
