"""The searches the app starts: background ``mltask tasks create`` / ``resume`` processes.

A search runs as its own process in its own session, with its output in a log file, so
closing the tab or the app never stops it. What the app needs to know later (which process,
which backend, where the log is) is a small JSON record under ``ROOT/.mltask-app/``; a
restarted app reads the records and the state files and is attached again. Whether a task's
process still lives is read from ``/proc`` (the pid and its start time, so a reused pid is
not mistaken for ours), or, for a task started from the command line, from the flock its
requestor holds on the task's lock file (``/proc/locks``), where the runner takes one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from mltask.errors import TaskError
from mltask.store import LOCK_FILE  # the requestor's flock beside state.db (StateLock)
from mltask.task import STATE_FILE

APP_DIR = ".mltask-app"  # hidden, so never listed as a task; holds run records and logs
_ERROR_LINE = re.compile(r"^mltask: error: (?:(?P<field>[^\s:][^:]*?): )?(?P<message>.*)$")
_START_WAIT_SECONDS = 120.0


@dataclass(frozen=True)
class RunRecord:
    """A process the app started for the task at ``key`` (a path relative to the root)."""

    key: str
    action: str  # create | resume
    pid: int
    start_ticks: int | None  # /proc/PID/stat start time: tells our process from a reused pid
    backend: str
    workers: int | None
    log: str
    started_at: float

    def alive(self) -> bool:
        return _alive(self.pid, self.start_ticks)


def _record_path(root: Path, key: str) -> Path:
    return root / APP_DIR / "runs" / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".json")


def log_path(root: Path, key: str) -> Path:
    return root / APP_DIR / "logs" / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".log")


def read_record(root: Path, key: str) -> RunRecord | None:
    try:
        data = json.loads(_record_path(root, key).read_text(encoding="utf-8"))
        return RunRecord(**data) if data.get("key") == key else None
    except (OSError, ValueError, TypeError):
        return None


def _write_record(root: Path, record: RunRecord) -> None:
    path = _record_path(root, record.key)
    path.parent.mkdir(parents=True, exist_ok=True)
    draft = path.with_suffix(".new")
    draft.write_text(json.dumps(asdict(record)), encoding="utf-8")
    os.replace(draft, path)


def _start_ticks(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()  # the command name may hold spaces and parentheses
    return None if fields[0] == "Z" else int(fields[19])


def _alive(pid: int, start_ticks: int | None) -> bool:
    if Path("/proc/self/stat").exists():
        return start_ticks is not None and _start_ticks(pid) == start_ticks
    try:  # no /proc (macOS): the pid alone
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_holder(task_dir: Path) -> int | None:
    """The pid holding the requestor's flock on the task, 0 if the lock is free, ``None`` if unknown."""
    try:
        inode = os.stat(task_dir / LOCK_FILE, follow_symlinks=False).st_ino
        locks = Path("/proc/locks").read_text()
    except OSError:
        return None
    for line in locks.splitlines():  # "1: FLOCK  ADVISORY  WRITE 4242 08:01:1234567 0 EOF"
        fields = line.split()
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5].rsplit(":", 1)[-1] == str(inode):
            return int(fields[4])
    return 0


@dataclass(frozen=True)
class Process:
    """What is known of the process driving a task: alive (True / False) or unknown (None)."""

    alive: bool | None
    pid: int | None
    backend: str | None
    workers: int | None

    @classmethod
    def of(cls, root: Path, key: str, task_dir: Path) -> Process:
        record = read_record(root, key)
        holder = lock_holder(task_dir)
        if record is not None and record.alive():
            return cls(True, record.pid, record.backend, record.workers)
        if holder:
            return cls(True, holder, record.backend if record else None, record.workers if record else None)
        known_dead = record is not None or holder == 0
        return cls(False if known_dead else None, None, record.backend if record else None,
                   record.workers if record else None)


def start(root: Path, key: str, action: str, args: list[str], backend: str, workers: int | None,
          ready: Callable[[], bool], cleanup: Callable[[], None] = lambda: None) -> RunRecord:
    """Start ``mltask tasks ACTION ARGS`` in its own session; wait until it is ``ready`` or fails.

    If it exits with an error before it is ready, that error (the CLI's one line, field and
    fix) is raised as a :class:`TaskError`. ``cleanup`` runs once the process no longer needs
    what it was given (the task's state file exists, or it ended).
    """
    task_dir = root / key
    log = log_path(root, key)
    log.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "mltask", "tasks", action, *args, "--backend", backend, "--quiet"]
    if workers:
        command += ["--workers", str(workers)]
    with open(log, "ab") as out:
        out.write(f"$ mltask tasks {action} {' '.join(args)} --backend {backend}\n".encode())
        out.flush()
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                   cwd=root, start_new_session=True)
    record = RunRecord(key, action, process.pid, _start_ticks(process.pid), backend, workers, str(log), time.time())
    _write_record(root, record)
    deadline = time.monotonic() + _START_WAIT_SECONDS
    while process.poll() is None and time.monotonic() < deadline and not ready():
        time.sleep(0.1)
    threading.Thread(target=_reap, args=(process, task_dir / STATE_FILE, cleanup), daemon=True).start()
    if process.returncode not in (None, 0) and not ready():
        error = _launch_error(log, process.returncode)
        if action == "create":  # no task came of it: leave nothing behind
            _record_path(root, key).unlink(missing_ok=True)
            log.unlink(missing_ok=True)
        raise error
    return record


def _reap(process: subprocess.Popen, state: Path, cleanup: Callable[[], None]) -> None:
    """Collect the process's exit (no zombie while the app runs); clean up once it needs nothing."""
    while process.poll() is None and not state.exists():
        time.sleep(0.5)
    time.sleep(1.0)  # the state file is renamed into place after the resources are copied
    cleanup()
    process.wait()


def _launch_error(log: Path, code: int) -> TaskError:
    """The CLI's own error line from the log, as a TaskError with its field."""
    lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    for line in reversed(lines):
        match = _ERROR_LINE.match(line)
        if match:
            return TaskError(match["field"] or "task", match["message"])
    tail = " / ".join(lines[-3:])[-300:]
    return TaskError("task", f"the search process ended with exit code {code}: {tail}")


def delete(root: Path, key: str, task_dir: Path) -> None:
    """Remove a task's folder and the app's record of it (links inside are removed, never followed)."""
    shutil.rmtree(task_dir)
    for path in (_record_path(root, key), log_path(root, key)):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
