"""Tasks under the root, read from their state files without ever writing to them.

The state file is read through a read-only SQLite connection wrapped in the store's own
:class:`~mltask.store.Store` (its ``meta``, ``subtasks``, ``verdicts`` and ``bans``) and its
:func:`~mltask.store.state_errors`, so a damaged file is one clear message on the page (a
broken task), never a 500. Trials are read by column rather than through
``results.summarize``: that parses every trial's full result and ranks in O(n^2), 2.5 s for
10,000 trials on our machines, where a page must come in well under a second and a live
page must cost next to nothing. So a page gets the columns it draws (number, state, score,
std, parameters, finish time, provider, verification, error) and a live page then gets only
what changed: trials added or settled since it last looked, new verdicts and subtasks. Any
new column the store grows is passed through as it is, and read with ``get``.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mltask.app.runs import Process
from mltask.app.security import confined
from mltask.errors import TaskError
from mltask.report import PLOT_FILE, REPORT_FILE, RUNGS_PLOT_FILE
from mltask.results import BEST_JSON, MODEL_FILE, RESULTS_CSV, RESULTS_JSON
from mltask.store import SCHEMA_VERSION, Store, state_errors
from mltask.task import RESOURCES_DIR, STATE_FILE

DOWNLOADS = (MODEL_FILE, RESULTS_CSV, RESULTS_JSON, BEST_JSON, REPORT_FILE, PLOT_FILE, RUNGS_PLOT_FILE)
RESUMABLE = ("interrupted", "aborted", "stopped", "timeout")
_SKIP_DIRS = {RESOURCES_DIR, "scratch", "__pycache__"}
_MAX_DEPTH = 4
_TRIAL_COLUMNS = ("number, state, value, json_extract(result, '$.std_score'), params, finished_at, provider, verified,"
                  " json_extract(result, '$.error')")


def find_tasks(root: Path) -> list[str]:
    """Keys (paths relative to the root) of every task dir under it; links are not followed."""
    keys: list[str] = []

    def walk(directory: Path, depth: int) -> None:
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError:
            return
        if any(e.name == STATE_FILE for e in entries):
            keys.append(directory.relative_to(root).as_posix())
            return
        if depth < _MAX_DEPTH:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False) and not entry.name.startswith(".") \
                        and entry.name not in _SKIP_DIRS:
                    walk(Path(entry.path), depth + 1)

    walk(root, 0)
    return [k for k in keys if k != "."]


def task_dir(root: Path, key: str) -> Path | None:
    """The task dir for ``key``, confined to the root and holding a state file; else ``None`` (404)."""
    path = confined(root, key)
    if path is None or not (path / STATE_FILE).is_file() or (path / STATE_FILE).is_symlink():
        return None
    return path


def download(root: Path, key: str, name: str) -> Path | None:
    """A result file of a task, if it is one of the known names and a regular file; else ``None`` (404)."""
    directory = task_dir(root, key)
    if directory is None or name not in DOWNLOADS:
        return None
    path = directory / name
    return path if path.is_file() and not path.is_symlink() else None


class StateReader:
    """A read-only view of one task's state file; cheap to poll for changes."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / STATE_FILE
        self.inode = os.stat(self.path).st_ino
        self._conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=5, check_same_thread=False)
        self.store = Store(self._conn, self.path)

    def close(self) -> None:
        self._conn.close()  # never Store.close(): that checkpoints the log, a write

    def meta(self) -> dict[str, str]:
        with state_errors(self.path):
            meta = self.store.meta()
            version = meta.get("schema_version")
            if version != str(SCHEMA_VERSION):
                raise TaskError(str(self.path), f"the task state has schema version {version}; this mltask reads "
                                f"version {SCHEMA_VERSION} - open it with the mltask that created it")
            missing = [k for k in ("definition", "task_id", "n_trials", "direction") if k not in meta]
            if missing:  # a damaged state, reported as such
                raise KeyError(missing[0])
            return meta

    def bans(self) -> dict[str, str]:
        with state_errors(self.path):
            return self.store.bans()

    def changed(self) -> int:
        """A number that changes whenever another connection commits (SQLite's ``data_version``)."""
        with state_errors(self.path):
            return self._conn.execute("PRAGMA data_version").fetchone()[0]

    def trials(self, cursor: Cursor | None = None, numbers: set[int] = frozenset()) -> list[list[Any]]:
        """Rows ``[number, state, value, std, params, finished_at, provider, verified, error]``.

        With a cursor, only trials numbered above it, settled since, or in ``numbers``.
        """
        where, args = "", []
        if cursor is not None:
            where = f" WHERE number > ? OR finished_at >= ? OR number IN ({','.join('?' * len(numbers))})"
            args = [cursor.number, cursor.settled, *numbers]
        rows = self._query(f"SELECT {_TRIAL_COLUMNS} FROM trials{where} ORDER BY number", args)
        with state_errors(self.path):
            return [[n, s, v, std, json.loads(p), fin, prov, ver, err] for n, s, v, std, p, fin, prov, ver, err in rows]

    def fully_verified(self) -> set[int]:
        """Trials re-run in full: marked after they settle, so a live page asks for them apart."""
        return {n for (n,) in self._query("SELECT number FROM trials WHERE verified = 'full'")}

    def subtasks(self, cursor: Cursor | None = None) -> list[dict[str, Any]]:
        where, args = ("", []) if cursor is None else (" WHERE seq > ? OR finished_at >= ?",
                                                       [cursor.seq, cursor.subtask_settled])
        rows = self._dicts(f"SELECT * FROM subtasks{where} ORDER BY seq", args)
        with state_errors(self.path):
            for s in rows:  # how many trials a batch held is all a page needs of them
                s["trials"] = len(json.loads(s.pop("trial_numbers") or "[]"))
                s.pop("environment", None)
        return rows

    def verdicts(self, cursor: Cursor | None = None) -> list[dict[str, Any]]:
        rows = self._dicts("SELECT * FROM verdicts WHERE id > ? ORDER BY id", [cursor.verdict if cursor else 0])
        with state_errors(self.path):
            for v in rows:
                v["checked"] = len(json.loads(v.get("checked") or "[]"))
        return rows

    def list_row(self, direction: str) -> tuple[dict[str, int], float | None, float | None, float | None, list[str]]:
        """Trial counts by state, the best score, first subtask sent, last trial settled, providers."""
        pick = "max" if direction == "maximize" else "min"
        counts = dict(self._query("SELECT state, count(*) FROM trials GROUP BY state"))
        best, ended = self._query(f"SELECT {pick}(CASE WHEN state = 'complete' THEN value END), max(finished_at)"
                                  " FROM trials")[0]
        first = self._query("SELECT min(created_at) FROM subtasks")[0][0]
        providers = [p for (p,) in self._query("SELECT DISTINCT provider FROM subtasks LIMIT 50")]
        return counts, best, first, ended, providers

    def _query(self, sql: str, args: list[Any] | tuple = ()) -> list[tuple]:
        with state_errors(self.path):
            return self._conn.execute(sql, args).fetchall()

    def _dicts(self, sql: str, args: list[Any]) -> list[dict[str, Any]]:
        with state_errors(self.path):
            cur = self._conn.execute(sql, args)
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row, strict=True)) for row in cur]


@dataclass
class Cursor:
    """How far a live page has read: it is sent only what lies beyond."""

    number: int = -1
    settled: float = 0.0
    seq: int = 0
    subtask_settled: float = 0.0
    verdict: int = 0
    bans: int = 0
    full: frozenset[int] = frozenset()

    def advance(self, trials: list[list[Any]], subtasks: list[dict[str, Any]], verdicts: list[dict[str, Any]],
                bans: int, full: set[int]) -> None:
        self.number = max([self.number, *(t[0] for t in trials)])
        self.settled = max([self.settled, *(t[5] for t in trials if t[5] is not None)])
        self.seq = max([self.seq, *(s["seq"] for s in subtasks)])
        self.subtask_settled = max([self.subtask_settled, *(s.get("finished_at") or 0 for s in subtasks)])
        self.verdict = max([self.verdict, *(v["id"] for v in verdicts)])
        self.bans = bans
        self.full = frozenset(full)


def header(root: Path, key: str, directory: Path, meta: dict[str, str], providers: list[str]) -> dict[str, Any]:
    """Name, status, backend and process of a task: what the list and the page's top line show."""
    definition = json.loads(meta["definition"])
    process = Process.of(root, key, directory)
    status, note = derive_status(meta.get("status"), bool(meta.get("abort_requested")), process)
    costs = json.loads(meta.get("costs") or "{}")
    return {
        "key": key, "name": definition.get("name", key), "status": status, "status_note": note,
        "backend": process.backend or infer_backend(providers, costs), "workers": process.workers,
        "pid": process.pid, "n_trials": int(meta["n_trials"]), "direction": meta["direction"],
        "algorithm": definition.get("options", {}).get("algorithm"),
        "created_at": float(meta.get("created_at") or 0) or None,
        "actions": actions(status, process),
    }


def derive_status(stored: str | None, abort_requested: bool, process: Process) -> tuple[str, str]:
    """The status to show, from the state file's and what is known of the process.

    A process killed with ``kill -9`` leaves "running" in the state file: where the process
    is known to be gone the task is "interrupted" (and can be resumed). While a live process
    is still writing results after the search stopped, the task is still "running", so
    "finished" means every result file is there.
    """
    if process.alive:
        return ("aborting", "abort requested; the search stops within a second or two") if abort_requested \
            else ("running", f"process {process.pid}")
    if process.alive is False and stored in (None, "running"):
        return "interrupted", "its process is gone (killed or crashed); resume carries on from the state file"
    if stored is None:
        return "starting", ""
    if stored == "running" and process.alive is None:
        return "running", "started elsewhere; the app cannot see its process"
    return stored, ""


def actions(status: str, process: Process) -> list[str]:
    allowed = []
    if status in ("running", "starting"):
        allowed.append("abort")
    if status in RESUMABLE and not process.alive:
        allowed.append("resume")
    if not process.alive and status not in ("running", "starting", "aborting"):
        allowed.append("delete")
    return allowed


def infer_backend(providers: list[str], costs: dict[str, Any]) -> str:
    """For a task started elsewhere: local and docker name their providers, Golem bills them."""
    if costs:
        return "golem"
    for prefix in ("local", "docker"):
        if providers and all(p.startswith(f"{prefix}-") for p in providers):
            return prefix
    return "golem" if providers else ""


def broken_row(key: str, exc: Exception) -> dict[str, Any]:
    message = str(exc) if isinstance(exc, TaskError) else f"{type(exc).__name__}: {exc}"
    return {"key": key, "name": key, "status": "broken", "status_note": message, "backend": "", "actions": ["delete"]}


class TaskList:
    """The tasks page's rows, each re-read only when its state file or its process changed."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._cache: dict[str, tuple[tuple, dict[str, Any]]] = {}

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for key in find_tasks(self.root):
            directory = self.root / key
            signature = (*_signature(directory), Process.of(self.root, key, directory))
            cached = self._cache.get(key)
            if cached is None or cached[0] != signature:
                cached = (signature, self._row(key, directory))
                self._cache[key] = cached
            out.append(cached[1])
        return sorted(out, key=lambda r: -(r.get("created_at") or 0))

    def _row(self, key: str, directory: Path) -> dict[str, Any]:
        try:
            reader = StateReader(directory)
        except (OSError, sqlite3.Error) as exc:
            return broken_row(key, exc)
        try:
            meta = reader.meta()
            counts, best, first, ended, providers = reader.list_row(meta["direction"])
            row = header(self.root, key, directory, meta, providers)
            row.update(complete=counts.get("complete", 0), failed=counts.get("failed", 0),
                       running_trials=counts.get("running", 0), best=best,
                       started_at=first or row["created_at"], ended_at=ended)
            return row
        except (TaskError, ValueError, KeyError, TypeError) as exc:
            return broken_row(key, exc)
        finally:
            reader.close()


class LiveTask:
    """What one open task page is shown: everything first, then only what changed.

    ``poll`` costs a ``PRAGMA data_version`` and a ``stat`` when nothing changed, so a page
    can look every quarter of a second and stay well within a second of the state file.
    """

    _PROCESS_EVERY = 1.0

    def __init__(self, root: Path, key: str, directory: Path) -> None:
        self.root, self.key, self.directory = root, key, directory
        self.reader: StateReader | None = None
        self.cursor = Cursor()
        self._seen: tuple | None = None
        self._process_at = 0.0
        self._process: Process | None = None

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()

    def snapshot(self) -> dict[str, Any]:
        """The whole page's data; a broken state file is a broken task, not an error."""
        self.close()
        self.cursor = Cursor()
        try:
            self.reader = StateReader(self.directory)
            self._seen = self._version()
            return self._read(full=True)
        except (OSError, sqlite3.Error) as exc:
            self.reader = None
            return broken_row(self.key, exc) | {"reset": True}
        except (TaskError, ValueError, KeyError, TypeError) as exc:
            return broken_row(self.key, exc) | {"reset": True}

    def poll(self) -> dict[str, Any] | None:
        """What changed since the last call, or ``None``."""
        if self.reader is None:
            return self.snapshot() if (self.directory / STATE_FILE).exists() and self._seen is None else None
        try:
            if os.stat(self.reader.path).st_ino != self.reader.inode:  # replaced (--force): start over
                return self.snapshot()
            version = self._version()
            if version == self._seen:
                return None
            self._seen = version
            if len(self.reader.bans()) != self.cursor.bans:  # a ban reopens settled trials: start over
                return self.snapshot()
            return self._read(full=False)
        except (OSError, sqlite3.Error, TaskError, ValueError, KeyError, TypeError):
            return self.snapshot()

    def _version(self) -> tuple:
        assert self.reader is not None
        now = time.monotonic()
        if now - self._process_at >= self._PROCESS_EVERY:
            self._process_at = now
            self._process = Process.of(self.root, self.key, self.directory)
        return self.reader.changed(), self._process, tuple(n for n in DOWNLOADS if (self.directory / n).exists())

    def _read(self, full: bool) -> dict[str, Any]:
        reader = self.reader
        assert reader is not None
        meta = reader.meta()
        cursor = None if full else self.cursor
        full_now = reader.fully_verified()
        trials = reader.trials(cursor, numbers=set(full_now - self.cursor.full))
        subtasks = reader.subtasks(cursor)
        verdicts = reader.verdicts(cursor)
        bans = reader.bans()
        self.cursor.advance(trials, subtasks, verdicts, len(bans), full_now)
        providers = sorted({s["provider"] for s in subtasks})
        definition = json.loads(meta["definition"])
        data = header(self.root, self.key, self.directory, meta, providers) | {
            "reset": full, "trials": trials, "subtasks": subtasks, "verdicts": verdicts, "bans": bans,
            "dropped": json.loads(meta.get("dropped") or "{}"), "costs": json.loads(meta.get("costs") or "{}"),
            "downloads": [n for n in DOWNLOADS if (self.directory / n).is_file()], "now": time.time(),
        }
        if full:
            problem = json.loads(meta.get("problem") or "{}")
            data.update(space=space_info(definition), definition=definition,
                        scoring=problem.get("scoring") or f"score of {(problem.get('script') or {}).get('file')}",
                        subtasks_count=int(meta.get("subtasks_count") or 0))
        return data


def space_info(definition: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each parameter's kind for the plots: numeric (maybe log) or categorical; fixed ones left out."""
    from mltask.space import CategoricalParam, FixedParam, SearchSpace

    out = {}
    for name, param in SearchSpace.model_validate(definition["options"]["search_space"]).params.items():
        if isinstance(param, FixedParam):
            continue
        kind = "categorical" if isinstance(param, CategoricalParam) else "numeric"
        out[name] = {"kind": kind, "log": bool(getattr(param, "log", False)), "when": param.when}
    return out


def importance(directory: Path) -> dict[str, Any]:
    """Optuna's parameter importance on a study rebuilt from the state file (PED-ANOVA: fast at 10,000 trials).

    Only parameters every finished trial has are assessed (Optuna's rule), so conditional
    ones are left out and named.
    """
    import optuna
    from optuna.importance import PedAnovaImportanceEvaluator, get_param_importances

    from mltask.space import SearchSpace

    reader = StateReader(directory)
    try:
        meta = reader.meta()
        rows = [t for t in reader.trials() if t[1] == "complete"]
    finally:
        reader.close()
    definition = json.loads(meta["definition"])
    distributions = SearchSpace.model_validate(definition["options"]["search_space"]).distributions()
    if len(rows) < 3 or not distributions:
        return {"importances": {}, "left_out": [], "trials": len(rows)}
    study = optuna.create_study(direction=meta["direction"])
    study.add_trials([
        optuna.trial.create_trial(params={k: v for k, v in r[4].items() if k in distributions},
                                  distributions={k: distributions[k] for k in r[4] if k in distributions},
                                  value=r[2])
        for r in rows
    ])
    common = [n for n in distributions if all(n in r[4] for r in rows)]
    try:
        values = get_param_importances(study, evaluator=PedAnovaImportanceEvaluator(), params=common) if common \
            else {}
    except (ValueError, RuntimeError) as exc:  # e.g. every score equal: nothing to attribute
        return {"importances": {}, "left_out": [], "trials": len(rows), "note": str(exc)[:200]}
    return {"importances": {k: float(v) for k, v in values.items()},
            "left_out": [n for n in distributions if n not in common], "trials": len(rows)}


def _signature(directory: Path) -> tuple:
    out: list[Any] = []
    for name in (STATE_FILE, f"{STATE_FILE}-wal"):
        try:
            st = os.stat(directory / name)
            out += [st.st_ino, st.st_mtime_ns, st.st_size]
        except OSError:
            out += [None]
    return tuple(out)
