"""The output dir: what mltask may create, replace and remove there, and nothing else.

An output dir may be the user's own folder (``--output .``), so mltask writes over nothing
it did not make and removes only what is demonstrably a task's own:

- a new task is resolved (resources copied, dataset loaded, estimator checked) in a staging
  dir inside the output dir and moved into place only once it is valid, so a task that
  fails leaves the dir as it was, including a previous task that ``--force`` was to replace;
- ``--force`` replaces a task (a dir with ``state.db``): its result files, its scratch dir
  and the resource copies it made, never other files. A dir holding files with our names
  but no task (the user's own ``report.md``) is refused, with ``--force`` or without, since
  the run would overwrite them;
- a ``resources/`` folder already there (``--output .`` with resources listed as
  ``resources/data.csv``) is used as it is if it holds only the listed files, unchanged,
  and refused if it holds others: providers are given the whole folder;
- directories mltask creates are private (0700), and so are the files it writes (0600).
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from mltask.errors import TaskError
from mltask.protocol import Problem
from mltask.report import PLOT_FILE, REPORT_FILE, RUNGS_PLOT_FILE
from mltask.results import BEST_JSON, MODEL_FILE, RESULTS_CSV, RESULTS_JSON
from mltask.store import LOCK_FILE, StateLock, Store, state_errors

STATE_FILE = "state.db"
RESOURCES_DIR = "resources"
SCRATCH_DIR = "scratch"
TASK_FILES = (STATE_FILE, f"{STATE_FILE}-wal", f"{STATE_FILE}-shm", RESULTS_JSON, RESULTS_CSV, BEST_JSON, MODEL_FILE,
              REPORT_FILE, PLOT_FILE, RUNGS_PLOT_FILE)
ADOPTED = "adopted_resources"  # meta key: resources that were the user's files in place, not copies
_CACHE = "__pycache__"  # Python's bytecode of a script resource, written beside it on import


def output_path(given: str | Path | None, configured: str | None, name: str) -> Path:
    """The output dir of a new task; an empty path, which would mean the current dir, is refused."""
    for field, value in (("--output", given), ("options.output_path", configured)):
        if value is not None:
            if not str(value).strip():
                raise TaskError(field, "is empty; give a directory (`.` for the current one)")
            return Path(value)
    return Path("mltask-results") / name


@contextmanager
def claim(directory: Path, field: str = "--output") -> Iterator[StateLock]:
    """``directory`` made (private) if missing and locked for this process while the body runs.

    If the body fails before a task exists there, what this made (dirs, lock file) goes.
    """
    with private_dir(directory, field):
        lock_made = not os.path.lexists(directory / LOCK_FILE)
        lock = StateLock.acquire(directory, field)
        try:
            yield lock
        except BaseException:
            if lock_made and not (directory / STATE_FILE).exists():
                (directory / LOCK_FILE).unlink(missing_ok=True)
            raise
        finally:
            lock.release()


@contextmanager
def private_dir(directory: Path, field: str = "--output") -> Iterator[None]:
    """Create ``directory`` and its missing parents 0700; undo that if the body fails before a task exists."""
    if directory.exists() and not directory.is_dir():
        raise TaskError(field, f"{directory} is a file, not a directory; give a directory path")
    missing: list[Path] = []
    parent = directory
    while not os.path.lexists(parent):
        missing.append(parent)
        parent = parent.parent
    try:
        for path in reversed(missing):
            try:
                path.mkdir(mode=0o700)
            except OSError as exc:
                raise TaskError(field, f"cannot create {path} ({exc.strerror}); choose a directory you can write to") \
                    from None
            os.chmod(path, 0o700)  # whatever the umask
        yield
    except BaseException:
        if missing and not (directory / STATE_FILE).exists():
            shutil.rmtree(missing[-1], ignore_errors=True)
        raise


@contextmanager
def staging(directory: Path, field: str = "--output") -> Iterator[Path]:
    """A private dir inside ``directory`` to resolve a new task in; always removed at the end.

    Inside, so that moving what it holds into place is a rename on the same filesystem.
    """
    try:
        stage = Path(tempfile.mkdtemp(prefix=".mltask-new-", dir=directory))
    except OSError as exc:
        raise TaskError(field, f"cannot write in {directory} ({exc.strerror}); choose a directory you can write to") \
            from None
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def previous_files(directory: Path, force: bool, field: str = "--output") -> list[Path]:
    """The files of the task in ``directory`` that ``force`` is to replace; refuse anything else.

    Nothing is removed here: the new task is checked first, and :func:`install` removes
    these only once it is valid.
    """
    if os.path.lexists(directory / STATE_FILE):
        if not force:
            raise TaskError(field, f"{directory} already holds a task; choose another output dir or pass --force")
        return _task_files(directory)
    ours = [name for name in (*TASK_FILES, SCRATCH_DIR) if os.path.lexists(directory / name)]
    if ours:
        raise TaskError(
            field, f"{directory} holds {', '.join(ours)} but no mltask task (no {STATE_FILE}): a run would overwrite "
            "them, and --force replaces only a task's own files; choose another output dir or move them away"
        )
    return []


def _task_files(directory: Path) -> list[Path]:
    """What a task made in ``directory``: result files, scratch, the resource copies it made."""
    try:
        store = Store.open(directory / STATE_FILE)
        try:
            with state_errors(store.path):
                meta = store.meta()
                names = [r.name for r in Problem.model_validate_json(meta["problem"]).resources]
                adopted = set(json.loads(meta.get(ADOPTED, "[]")))
        finally:
            store.close()
    except TaskError:
        raise TaskError(
            "--force", f"the task in {directory} has an unreadable state, so mltask cannot tell its files from "
            "others; move the folder away yourself or choose another output dir"
        ) from None
    files = [directory / name for name in (*TASK_FILES, SCRATCH_DIR)]
    files += [directory / RESOURCES_DIR / name for name in (*names, _CACHE) if name not in adopted]
    return [path for path in files if os.path.lexists(path)]


def install(staged: Path, names: list[str], directory: Path, previous: list[Path],
            field: str = "--output") -> list[str]:
    """Move the resources ``names`` from ``staged`` into place, replacing ``previous``.

    Returns the names found in place already, identical (the user's own files, kept as they
    are and never removed by a later ``--force``). Everything is checked before anything moves.
    """
    target = directory / RESOURCES_DIR
    adopted: list[str] = []
    if os.path.lexists(target):
        if target.is_symlink() or not target.is_dir():
            raise TaskError(field, f"{target} is not a folder mltask can use; move it or choose another output dir")
        foreign = []
        for entry in sorted(target.iterdir()):
            if entry in previous or entry.name == _CACHE:
                continue
            same = entry.name in names and not entry.is_symlink() and entry.is_file() \
                and filecmp.cmp(entry, staged / entry.name, shallow=False)
            (adopted if same else foreign).append(entry.name)
        if foreign:
            raise TaskError(
                field, f"{target} already holds {', '.join(foreign[:5])}, not among this task's resources or not the "
                "same file: providers get the whole folder, and mltask must not overwrite your files; move them away "
                "or choose another output dir"
            )
    for path in previous:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    if target.is_dir() and not any(target.iterdir()):
        target.rmdir()
    if not target.exists():
        shutil.rmtree(staged / _CACHE, ignore_errors=True)  # of the check on the staged script
        os.replace(staged, target)
        return adopted
    for name in names:
        if name not in adopted:
            os.replace(staged / name, target / name)
    return adopted


def seal(directory: Path) -> None:
    """Make the task's own files private (0600): the output dir may be a folder others can read."""
    for name in TASK_FILES:
        path = directory / name
        if not path.is_symlink():
            with suppress(FileNotFoundError):
                os.chmod(path, 0o600)
