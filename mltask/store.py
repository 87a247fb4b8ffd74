"""The task's durable state: one SQLite file (WAL) under the output dir.

Why not Optuna's RDBStorage: measured on these machines it costs 14-23 ms per trial in ORM
overhead (even with fsync off), three to five times our 5 ms budget, and a subtask and the
trials it settles must commit in one transaction so that a crash never leaves a trial told
twice or lost. So this store is the record; the Optuna study is kept in memory and rebuilt
from it (``HyperparameterSearchTask.load``), which Optuna supports through ``add_trials``.

Tables: ``meta`` (definition, problem, ids), ``trials`` (one row per Optuna trial, with the
provider's result once accepted), ``subtasks`` (one row per batch sent, search or check, with
its outcome and the seconds it was out as the requestor measured them), ``checks`` (each
verification planned, until it resolves), ``verdicts`` (each check that ran: where, on
which (trial, fold) units, with what outcome), ``bans``, and for multi-fidelity tasks ``rungs``
(each accepted rung evaluation of a trial; the trial's row holds its latest).
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mltask.errors import TaskError

SCHEMA_VERSION = 3  # 3: the rungs table, and trials may be pruned
LOCK_FILE = ".mltask.lock"  # beside state.db; see StateLock
_TABLES = ("meta", "trials", "subtasks", "checks", "verdicts", "bans", "rungs")
_TRIALS = """
CREATE TABLE IF NOT EXISTS {name} (
    number INTEGER PRIMARY KEY,
    params TEXT NOT NULL,
    seed INTEGER NOT NULL,
    system_attrs TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('running', 'complete', 'failed', 'pruned')),
    value REAL,
    result TEXT,
    subtask_id TEXT,
    provider TEXT,
    finished_at REAL,
    verified TEXT CHECK (verified IN ('full', 'spot', 'cross'))
);
"""
_RUNGS = """
CREATE TABLE IF NOT EXISTS rungs (
    number INTEGER NOT NULL,
    rung INTEGER NOT NULL,
    resource NUMERIC NOT NULL,
    subtask_id TEXT NOT NULL,
    provider TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('complete', 'failed')),
    value REAL,
    result TEXT NOT NULL,
    decision TEXT NOT NULL CHECK (decision IN ('promoted', 'pruned', 'complete', 'failed')),
    verified TEXT CHECK (verified IN ('full', 'spot', 'cross')),
    at REAL NOT NULL,
    PRIMARY KEY (number, rung)
);
"""
_SCHEMA = "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);" + _TRIALS.format(
    name="trials") + _RUNGS + """
CREATE TABLE IF NOT EXISTS subtasks (
    subtask_id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    trial_numbers TEXT NOT NULL,
    provider TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    purpose TEXT NOT NULL CHECK (purpose IN ('search', 'check')),
    state TEXT NOT NULL CHECK (state IN ('pending', 'accepted', 'checked', 'rejected', 'failed', 'discarded')),
    reason TEXT,
    compute_time REAL,
    seconds_out REAL,
    environment TEXT,
    created_at REAL NOT NULL,
    finished_at REAL
);
CREATE TABLE IF NOT EXISTS checks (
    id INTEGER PRIMARY KEY,
    subtask_id TEXT NOT NULL,
    provider TEXT NOT NULL,
    kind TEXT NOT NULL,
    units TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('planned', 'passed', 'failed', 'cancelled')),
    created_at REAL NOT NULL,
    resolved_at REAL
);
CREATE TABLE IF NOT EXISTS verdicts (
    id INTEGER PRIMARY KEY,
    check_id INTEGER,
    subtask_id TEXT NOT NULL,
    provider TEXT NOT NULL,
    by TEXT NOT NULL,
    ok INTEGER NOT NULL,
    kind TEXT NOT NULL,
    checked TEXT NOT NULL,
    reason TEXT,
    seconds REAL NOT NULL,
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS bans (provider TEXT PRIMARY KEY, reason TEXT NOT NULL, at REAL NOT NULL);
"""


@contextmanager
def state_errors(path: Path) -> Iterator[None]:
    """Turn any sign of a damaged state file into one clear error; nothing is changed.

    ``quick_check`` finds broken pages, but damage inside a row (a mangled JSON cell)
    only shows when it is read, so everything that reads a whole task runs under this.
    """
    try:
        yield
    except (sqlite3.DatabaseError, ValueError, KeyError, TypeError) as exc:
        raise TaskError(
            str(path), f"the task state is unreadable ({type(exc).__name__}: {str(exc)[:120]}); it is corrupt, "
            "truncated or not a task - nothing was changed; restore it from a backup or start a new task"
        ) from None


def require_state(path: Path) -> None:
    """Refuse a directory that holds no task before anything is read or written there."""
    if not path.is_file():
        raise TaskError(str(path.parent), "not a task output dir (no state.db); check the path")


class StateLock:
    """An exclusive hold on a task's state while one process drives it.

    A second requestor on the same task (another ``resume``, a ``create --force``) would
    re-queue the trials the first has in flight and die on its inserts. ``flock`` on a file
    beside ``state.db`` is released by the kernel when its holder exits, even by ``kill -9``,
    so a crash never leaves a stale lock; the file keeps the holder's pid for the message.
    Readers (``tasks show``, ``tasks abort``) never take it: SQLite serialises their writes.
    The descriptor is not inheritable, so workers the requestor starts never hold the lock.
    """

    def __init__(self, fd: int, path: Path) -> None:
        self._fd = fd
        self.path = path

    @classmethod
    def acquire(cls, directory: Path, field: str | None = None) -> StateLock:
        """Lock the task in ``directory``, or raise one line naming the process that holds it."""
        path = directory / LOCK_FILE
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            except OSError as exc:
                raise TaskError(field or str(directory), f"cannot write in {directory} ({exc.strerror}); "
                                "choose a directory you can write to") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
                os.close(fd)
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                raise TaskError(
                    field or str(directory), f"the task is being run by process {holder}; wait for it to end, "
                    f"or stop it first with `mltask tasks abort {directory}`"
                ) from None
            try:  # a failed create may have removed the file between our open and our lock
                if os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(fd, path)

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing drops the flock
            self._fd = -1

    def __enter__(self) -> StateLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass(frozen=True)
class TrialRow:
    number: int
    params: dict[str, Any]
    seed: int
    system_attrs: dict[str, Any]
    state: str
    value: float | None
    result: dict[str, Any] | None
    subtask_id: str | None
    provider: str | None
    finished_at: float | None
    verified: str | None


def _pruned_against(before: list[tuple[int, int, float, str, float]],
                    standing: set[tuple[int, int]]) -> dict[int, tuple[int, float]]:
    """Trials pruned at a rung after an evaluation there that is gone now: number -> (rung, value).

    ASHA ranks a rung result against every result of that rung so far, so a liar's
    inflated score can push an honest trial out of the top 1/``reduction_factor`` (and
    its own voided evaluations are re-run, but that trial's decision would stand). Those
    trials are judged again against the rung's results that stand
    (:meth:`mltask.task.HyperparameterSearchTask._rejudge`). A trial pruned before any
    voided evaluation arrived at its rung was judged on honest results only and keeps its
    decision. ``before`` is the rungs table (number, rung, value, decision, accepted at)
    before a ban, ``standing`` the (number, rung) left after it; the times compared are the
    stored acceptance times, so this is decided from the store alone.
    """
    voided: dict[int, float] = {}  # rung -> when its first evaluation now voided was accepted
    for number, rung, _, _, at in before:
        if (number, rung) not in standing:
            voided[rung] = min(voided.get(rung, math.inf), at)
    return {number: (rung, value) for number, rung, value, decision, at in before
            if (number, rung) in standing and decision == "pruned" and at >= voided.get(rung, math.inf)}


class Store:
    """Thin, transactional access to the state file; no caching, no policy."""

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn = conn
        self.path = path

    @classmethod
    def create(cls, path: Path, meta: dict[str, str]) -> Store:
        """Write a new state file whole, then move it into place.

        Built beside and renamed, ``state.db`` never exists without its tables and meta: a
        requestor killed while creating leaves no half-made task for a resume to refuse.
        """
        if path.exists():  # the task checks first, with advice; this guards the file itself
            raise FileExistsError(path)
        draft = path.with_name(f".{path.name}.new")
        draft.unlink(missing_ok=True)  # left by a create that was killed
        # Private from the start: SQLite gives the -wal and -shm files the database's mode.
        os.close(os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        conn = _connect(draft)
        try:
            conn.executescript(_SCHEMA)
            conn.executemany(
                "INSERT INTO meta VALUES (?, ?)", [("schema_version", str(SCHEMA_VERSION)), *meta.items()]
            )
        except BaseException:
            conn.close()
            draft.unlink(missing_ok=True)
            raise
        conn.close()
        os.replace(draft, path)
        return cls(_connect(path), path)

    @classmethod
    def open(cls, path: Path) -> Store:
        require_state(path)
        with state_errors(path):
            # Check read-only first: even switching a foreign file to WAL would write to it.
            probe = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            try:
                check = probe.execute("PRAGMA quick_check").fetchone()
                if check is None or check[0] != "ok":
                    raise sqlite3.DatabaseError(check[0] if check else "integrity check failed")
                # A file that is SQLite but not ours fails here; an older task's says its version.
                version = probe.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
                if version is not None and version[0] == str(SCHEMA_VERSION):
                    for table in _TABLES:
                        probe.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchone()
            finally:
                probe.close()
        if version is not None and version[0] == "2":
            return cls(_migrate_from_2(path), path)
        if version is None or version[0] != str(SCHEMA_VERSION):
            raise TaskError(str(path), f"the task state has schema version {version[0] if version else 'none'}, this "
                            f"mltask reads version {SCHEMA_VERSION}; finish the task with the mltask that created it, "
                            "or start a new task")
        return cls(_connect(path), path)

    def close(self) -> None:
        """Fold the write-ahead log into state.db, so the file alone holds the whole task."""
        self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._conn.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Cursor]:
        """All statements inside commit together or not at all."""
        cur = self._conn.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            yield cur
        except BaseException:
            self._conn.rollback()
            raise
        else:
            self._conn.commit()

    def meta(self) -> dict[str, str]:
        return dict(self._conn.execute("SELECT key, value FROM meta"))

    def meta_value(self, key: str) -> str | None:
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        with self.transaction() as cur:
            cur.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def add_subtask(
        self,
        subtask_id: str,
        seq: int,
        provider: str,
        attempt: int,
        trial_numbers: list[int],
        new_trials: list[tuple[int, dict[str, Any], int, dict[str, Any]]],
        purpose: str = "search",
    ) -> None:
        """Record a subtask as sent, together with the trials it asks for the first time.

        ``purpose`` is 'search' (its trials enter the study) or 'check' (it re-runs folds of
        trials another provider reported; its answer is only compared).
        """
        now = time.time()
        with self.transaction() as cur:
            cur.executemany(
                "INSERT INTO trials (number, params, seed, system_attrs, state) VALUES (?, ?, ?, ?, 'running')",
                [(n, json.dumps(p), s, json.dumps(a)) for n, p, s, a in new_trials],
            )
            cur.execute(
                "INSERT INTO subtasks (subtask_id, seq, trial_numbers, provider, attempt, purpose, state, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, 'pending', ?)",
                (subtask_id, seq, json.dumps(trial_numbers), provider, attempt, purpose, now),
            )

    def settle_subtask(
        self,
        subtask_id: str,
        state: str,
        *,
        reason: str | None = None,
        trials: list[tuple[int, str, float | None, dict[str, Any]]] = (),
        compute_time: float | None = None,
        environment: dict[str, Any] | None = None,
        verified: dict[int, str] | None = None,
        seconds_out: float | None = None,
        rungs: list[tuple[int, int, float, str, float | None, dict[str, Any], str]] = (),
    ) -> None:
        """Close a subtask and, if it was accepted, its trials: ``(number, state, value, result)``,
        and their rung evaluations (multi-fidelity): ``(number, rung, resource, state, value, result, decision)``.

        ``verified`` maps trial numbers to how they were verified ('full', 'spot' or 'cross');
        ``seconds_out`` is how long the subtask was out, submit to answer, as the requestor
        measured it (the provider's own ``compute_time`` is kept but never trusted).
        """
        verified = verified or {}
        now = time.time()
        with self.transaction() as cur:
            cur.execute(
                "UPDATE subtasks SET state = ?, reason = ?, compute_time = ?, environment = ?, finished_at = ?,"
                " seconds_out = coalesce(?, seconds_out) WHERE subtask_id = ?",
                (state, reason, compute_time, json.dumps(environment) if environment else None, now, seconds_out,
                 subtask_id),
            )
            provider = cur.execute("SELECT provider FROM subtasks WHERE subtask_id = ?", (subtask_id,)).fetchone()
            cur.executemany(
                "UPDATE trials SET state = ?, value = ?, result = ?, subtask_id = ?, provider = ?, finished_at = ?,"
                " verified = ? WHERE number = ?",
                [(s, v, json.dumps(r), subtask_id, provider[0], now, verified.get(n), n) for n, s, v, r in trials],
            )
            cur.executemany(
                "INSERT INTO rungs (number, rung, resource, subtask_id, provider, state, value, result, decision,"
                " verified, at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(n, k, res, subtask_id, provider[0], st, v, json.dumps(r), d, verified.get(n), now)
                 for n, k, res, st, v, r, d in rungs],
            )

    def set_seconds_out(self, subtask_id: str, seconds: float) -> None:
        """Record how long a subtask was out (for answers that are settled elsewhere)."""
        with self.transaction() as cur:
            cur.execute("UPDATE subtasks SET seconds_out = ? WHERE subtask_id = ?", (seconds, subtask_id))

    def add_verdict(self, subtask_id: str, provider: str, ok: bool, kind: str, checked: list, reason: str | None,
                    seconds: float, *, by: str = "requestor", check_id: int | None = None) -> None:
        """One check that ran: of ``provider``'s ``subtask_id``, on ``checked`` units, run ``by`` whom.

        ``by`` is the provider that re-ran the units in a check subtask, or 'requestor';
        ``seconds`` is the compute it cost (the check subtask's time out, or the requestor's
        measured re-run time).
        """
        with self.transaction() as cur:
            cur.execute(
                "INSERT INTO verdicts (check_id, subtask_id, provider, by, ok, kind, checked, reason, seconds, at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (check_id, subtask_id, provider, by, int(ok), kind, json.dumps(checked), reason, seconds, time.time()),
            )

    def verdicts(self) -> list[dict[str, Any]]:
        return self._dicts("SELECT * FROM verdicts ORDER BY id")

    def add_check(self, subtask_id: str, provider: str, kind: str, units: list) -> int:
        """Plan a check of ``provider``'s ``subtask_id``; kept until it resolves, across a resume."""
        with self.transaction() as cur:
            cur.execute(
                "INSERT INTO checks (subtask_id, provider, kind, units, state, created_at)"
                " VALUES (?, ?, ?, ?, 'planned', ?)",
                (subtask_id, provider, kind, json.dumps(units), time.time()),
            )
            return int(cur.lastrowid)

    def resolve_check(self, check_id: int, state: str) -> None:
        """Close a planned check: 'passed', 'failed' or 'cancelled'."""
        with self.transaction() as cur:
            cur.execute("UPDATE checks SET state = ?, resolved_at = ? WHERE id = ? AND state = 'planned'",
                        (state, time.time(), check_id))

    def checks(self, state: str | None = None) -> list[dict[str, Any]]:
        """Planned and resolved checks, oldest first (only those in ``state`` if given)."""
        rows = self._dicts("SELECT * FROM checks ORDER BY id")
        for row in rows:
            row["units"] = [tuple(u) for u in json.loads(row["units"])]
        return [r for r in rows if state is None or r["state"] == state]

    def compute_seconds(self) -> dict[str, float]:
        """Compute by purpose, all measured by the requestor (never the providers' own figures).

        ``useful``: accepted search subtasks' time out; ``check``: every check subtask's time
        out (whatever became of it); ``requestor``: the requestor's own re-runs.
        """
        (useful,), (check,), (requestor,) = (
            self._conn.execute(query).fetchone() for query in (
                "SELECT coalesce(sum(seconds_out), 0) FROM subtasks WHERE purpose = 'search' AND state = 'accepted'",
                "SELECT coalesce(sum(seconds_out), 0) FROM subtasks WHERE purpose = 'check'",
                "SELECT coalesce(sum(seconds), 0) FROM verdicts WHERE by = 'requestor'",
            )
        )
        return {"useful": float(useful), "check": float(check), "requestor": float(requestor)}

    def ban(self, provider: str, reason: str, *, reopen: bool) -> list[str]:
        """Ban ``provider``; with ``reopen``, reopen all it had accepted and return those subtask ids.

        Nothing a cheater reported survives, verified or not: its accepted subtasks become
        'rejected' and their trials 'running' again, in the same transaction as the ban. So
        are the trials to judge again (:meth:`rejudge_pending`): a stop between the ban and
        the judging must not leave them pruned against evaluations that are gone.
        """
        with self.transaction() as cur:
            before = [(n, rung, value, decision, at) for n, rung, value, decision, at in cur.execute(
                "SELECT number, rung, value, decision, at FROM rungs")] if reopen else []
            cur.execute("INSERT OR IGNORE INTO bans VALUES (?, ?, ?)", (provider, reason, time.time()))
            reopened = [r[0] for r in cur.execute(
                "SELECT subtask_id FROM subtasks WHERE provider = ? AND state = 'accepted'", (provider,)
            )] if reopen else []
            cur.executemany(
                "UPDATE subtasks SET state = 'rejected', reason = ? WHERE subtask_id = ?",
                [(f"provider banned: {reason}", sid) for sid in reopened],
            )
            cur.executemany(
                "UPDATE trials SET state = 'running', value = NULL, result = NULL, subtask_id = NULL,"
                " provider = NULL, finished_at = NULL, verified = NULL WHERE subtask_id = ?",
                [(sid,) for sid in reopened],
            )
            # A reopened rung evaluation also voids the rungs above it (its score decided the
            # promotion to them): the trial climbs again from there, its row reopened whoever
            # reported its latest rung.
            lowest = list(cur.execute(
                f"SELECT number, min(rung) FROM rungs WHERE subtask_id IN ({', '.join('?' * len(reopened))})"
                " GROUP BY number", reopened,
            ))
            cur.executemany("DELETE FROM rungs WHERE number = ? AND rung >= ?", lowest)
            cur.executemany(
                "UPDATE trials SET state = 'running', value = NULL, result = NULL, subtask_id = NULL,"
                " provider = NULL, finished_at = NULL, verified = NULL WHERE number = ?",
                [(n,) for n, _ in lowest],
            )
            cur.execute("UPDATE checks SET state = 'cancelled', resolved_at = ? WHERE provider = ?"
                        " AND state = 'planned'", (time.time(), provider))
            standing = set(cur.execute("SELECT number, rung FROM rungs"))
            rejudge = {n: v for n, v in self.rejudge_pending(cur).items() if (n, v[0]) in standing}
            rejudge |= _pruned_against(before, standing)
            if rejudge:
                cur.execute("INSERT OR REPLACE INTO meta VALUES ('rejudge', ?)",
                            (json.dumps({str(n): list(v) for n, v in sorted(rejudge.items())}),))
        return reopened

    def rejudge_pending(self, cur: sqlite3.Cursor | None = None) -> dict[int, tuple[int, float]]:
        """Trials a ban left to judge again (number -> the rung they were pruned at and their value there)."""
        row = (cur or self._conn).execute("SELECT value FROM meta WHERE key = 'rejudge'").fetchone()
        return {int(n): (rung, value) for n, (rung, value) in json.loads(row[0]).items()} if row else {}

    def promote_again(self, evaluations: list[tuple[int, int]], *, rejudged: bool = False) -> None:
        """Turn pruned trials' (number, rung) evaluations into promotions: the trials climb on from there.

        Their rows become 'running' again holding that rung's result, as a promoted trial's
        row does, so a resume finds them waiting for their next rung. ``rejudged``: these
        are the decisions on every trial :meth:`rejudge_pending` held, which it then no longer holds.
        """
        with self.transaction() as cur:
            if rejudged:
                cur.execute("DELETE FROM meta WHERE key = 'rejudge'")
            cur.executemany("UPDATE trials SET state = 'running' WHERE number = ? AND state = 'pruned'",
                            [(n,) for n, _ in evaluations])
            cur.executemany("UPDATE rungs SET decision = 'promoted' WHERE number = ? AND rung = ?", evaluations)

    def bans(self) -> dict[str, str]:
        return dict(self._conn.execute("SELECT provider, reason FROM bans"))

    def trials(self) -> list[TrialRow]:
        return self._trial_rows("ORDER BY number")

    def trial(self, number: int) -> TrialRow:
        return self._trial_rows("WHERE number = ?", (number,))[0]

    def set_verified(self, number: int, how: str, subtask_id: str | None = None) -> None:
        """Mark a trial verified ('cross' < 'spot' < 'full'), never downgrading it.

        With ``subtask_id``, only while the trial still holds that subtask's result.
        """
        with self.transaction() as cur:
            # A rung evaluation is marked only by its own subtask's check (a trial has several).
            tables = (("trials", "state != 'running'"),) + ((("rungs", "1"),) if subtask_id is not None else ())
            for table, settled in tables:
                cur.execute(
                    f"UPDATE {table} SET verified = ? WHERE number = ? AND {settled} AND (? IS NULL OR subtask_id = ?)"
                    " AND coalesce(instr('cross spot full', verified), 0) <= instr('cross spot full', ?)",
                    (how, number, subtask_id, subtask_id, how),
                )

    def set_result(self, number: int, subtask_id: str, value: float, result: dict[str, Any]) -> bool:
        """Replace a complete trial's value and result while it holds ``subtask_id``'s; whether it did."""
        with self.transaction() as cur:
            cur.execute("UPDATE trials SET value = ?, result = ? WHERE number = ? AND subtask_id = ?"
                        " AND state = 'complete'", (value, json.dumps(result), number, subtask_id))
            return cur.rowcount > 0

    def _trial_rows(self, where: str, args: tuple[Any, ...] = ()) -> list[TrialRow]:
        rows = self._conn.execute(
            "SELECT number, params, seed, system_attrs, state, value, result, subtask_id, provider, finished_at,"
            f" verified FROM trials {where}", args
        )
        return [
            TrialRow(n, json.loads(p), s, json.loads(a), st, v, json.loads(r) if r else None, sid, prov, fin, ver)
            for n, p, s, a, st, v, r, sid, prov, fin, ver in rows
        ]

    def top_rung(self, number: int) -> int | None:
        """The highest rung trial ``number`` has an accepted evaluation at, if any."""
        return self._conn.execute("SELECT max(rung) FROM rungs WHERE number = ?", (number,)).fetchone()[0]

    def rung_of(self, number: int, subtask_id: str) -> int:
        """The rung of trial ``number`` that ``subtask_id`` evaluated."""
        return self._conn.execute("SELECT rung FROM rungs WHERE number = ? AND subtask_id = ?",
                                  (number, subtask_id)).fetchone()[0]

    def rungs(self) -> list[dict[str, Any]]:
        """Every accepted rung evaluation (multi-fidelity), by trial and rung; ``result`` parsed."""
        return self._rung_rows("ORDER BY number, rung")

    def rungs_of(self, subtask_id: str) -> list[dict[str, Any]]:
        """The rung evaluations ``subtask_id`` reported that still stand."""
        return self._rung_rows("WHERE subtask_id = ?", (subtask_id,))

    def _rung_rows(self, where: str, args: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        rows = self._dicts(f"SELECT * FROM rungs {where}", args)
        for row in rows:
            row["result"] = json.loads(row["result"])
        return rows

    def errors(self) -> list[tuple[int, str]]:
        """Each failed trial's number and error, read without parsing every stored result."""
        rows = self._conn.execute(
            "SELECT number, json_extract(result, '$.error') FROM trials WHERE state = 'failed' ORDER BY number"
        )
        return [(n, error or "no error text") for n, error in rows]

    def subtasks(self, purpose: str | None = None) -> list[dict[str, Any]]:
        """Subtasks in the order sent; only 'search' or 'check' ones if ``purpose`` is given."""
        rows = self._dicts("SELECT * FROM subtasks ORDER BY seq, created_at")
        return [r for r in rows if purpose is None or r["purpose"] == purpose]

    def _dicts(self, query: str, args: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        cur = self._conn.execute(query, args)
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur]


def _migrate_from_2(path: Path) -> sqlite3.Connection:
    """Version 2 to 3, in one transaction: the rungs table, and 'pruned' allowed as a trial state.

    SQLite cannot change a CHECK constraint in place, so the trials table is copied into
    one with the new constraint (SQLite's documented way to alter a table).
    """
    conn = _connect(path)
    cur = conn.cursor()
    cur.execute("BEGIN IMMEDIATE")
    try:
        cur.execute(_TRIALS.format(name="trials_v3"))
        cur.execute("INSERT INTO trials_v3 SELECT * FROM trials")
        cur.execute("DROP TABLE trials")
        cur.execute("ALTER TABLE trials_v3 RENAME TO trials")
        cur.execute(_RUNGS)
        cur.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))
    except BaseException:
        conn.rollback()
        conn.close()
        raise
    conn.commit()
    return conn


def _connect(path: Path) -> sqlite3.Connection:
    # isolation_level=None: we issue BEGIN ourselves so each transaction is explicit.
    conn = sqlite3.connect(path, isolation_level=None, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    return conn
