"""The requestor as referee: re-runs in a few worker processes beside the dispatch loop.

The requestor is the one party that trusts itself, so it re-runs what must not be left to
a provider: a check where two providers disagree, every trial a provider says failed, and
the best trial before it is reported. It does so in ``verification.referee_workers``
processes (default 1), which the scheduler polls and never waits on: handing out and
collecting subtasks goes on while a re-run takes minutes. Where the backend's providers are
this machine's own processes (the local backend), the cores they leave idle are lent to the
pool (:meth:`Referee.lend`), and a re-run's folds, split into separate jobs, run on them at
once: the best's final re-run no longer runs its folds one after another on one process
while the workers that could share them sit idle.

The workers are forked by the same kind of server as the local backend's
(:mod:`mltask.backends.forkserver`), not by :mod:`multiprocessing`, whose start methods
would run the user's ``__main__`` again in each of them (a script that calls ``run_task``
without a ``__main__`` guard) or import from the working directory. A worker that dies (OOM,
a stray kill) is replaced and its re-run sent again, so a stray kill loses no re-run; a trial
that kills its worker twice comes back failed (it kills its process, as on the providers).

Each re-run has a deadline, the task's ``subtask_timeout``, as a provider's subtask has: past
it the worker is killed and replaced, as the local backend does with a timed-out worker,
and the trial comes back failed ("timed out on the requestor"). Without it, a provider that
said a configuration slower than any subtask could take had failed held the requestor (and
the task's end) for as long as that configuration ran; with it, the re-run agrees with the
claimed failure, and nobody is banned for the limit the task itself set.
"""

from __future__ import annotations

import json
import math
import multiprocessing.connection
import time
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Protocol

from mltask.backends.forkserver import ForkServer
from mltask.errors import TaskError
from mltask.protocol import Problem, TrialResult, TrialSpec, canonical_trial, dumps, problem_folds


def rerun(problem_json: str, resources_dir: str, trial_json: str) -> tuple[str, float]:
    """Evaluate one trial (only ``trial.folds`` if set) here; the result JSON and its seconds.

    Runs in a pool worker, through the same evaluator as a provider, with one BLAS thread.
    The seconds are the requestor's own measurement of what the re-run cost; like a
    provider's start-up, the worker's one-off imports and data loading are not counted.
    """
    from mltask.provider import check_resources, evaluator_for, one_thread

    problem = Problem.model_validate_json(problem_json)
    check_resources(problem.resources, Path(resources_dir))
    evaluator = evaluator_for(problem, Path(resources_dir))  # built once per worker, like a provider's
    trial = TrialSpec.model_validate_json(trial_json)
    with one_thread():
        started = time.perf_counter()
        result = evaluator.evaluate(trial, trial.folds)
        return result.model_dump_json(), time.perf_counter() - started


def _failed(trial: TrialSpec, error: str) -> TrialResult:
    return TrialResult(number=trial.number, params=trial.params, seed=trial.seed, status="failed", error=error)


class Referee(Protocol):
    """Where the requestor's re-runs happen; the scheduler only submits and polls."""

    def submit(self, key: Hashable, trial: TrialSpec) -> None:
        """Start re-running ``trial``; its answer comes back from :meth:`poll` under ``key``."""

    def poll(self, timeout: float = 0.0) -> list[tuple[Hashable, TrialResult, float]]:
        """Re-runs that finished (waiting at most ``timeout`` s for one): key, result, seconds."""

    def cancel(self, keys: Iterable[Hashable]) -> set[Hashable]:
        """Forget the re-runs under ``keys`` that have not started, and say which: those cost
        nothing and never come back; the others (running or done) still come back from :meth:`poll`."""

    def pending(self) -> int:
        """Re-runs submitted and not yet returned by :meth:`poll`."""

    def lend(self, cores: int) -> None:
        """``cores`` of this machine are idle now: the re-runs may use as many processes (never fewer than
        their own); 0 ends the loan. See :meth:`mltask.backends.base.Backend.spare_cores`."""

    def close(self) -> None:
        """Stop the workers; what is pending is dropped."""


def serve_reruns(conn: Connection, problem: str, resources: str) -> None:
    """A referee worker: re-run each trial it is sent, until the requestor goes away."""
    while True:
        try:
            trial_json = conn.recv_bytes().decode()
        except (EOFError, OSError):
            return
        try:
            text, seconds = rerun(problem, resources, trial_json)
            answer: dict = {"result": text, "seconds": seconds}
        except TaskError as exc:  # the resources changed under the task: the requestor says so
            answer = {"task_error": [exc.field, exc.message]}
        except Exception as exc:  # a bug here, not a trial's failure (the evaluator records those)
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        conn.send_bytes(json.dumps(answer).encode())


Part = tuple[Hashable, int | None]  # (a re-run's key, its fold; None: the re-run's one part, unsplit)


@dataclass
class _Worker:
    pid: int
    conn: Connection
    job: tuple[Part, TrialSpec] | None = None
    started: float = 0.0  # when the job went out


@dataclass
class _Rerun:
    """A submitted re-run: its trial and the parts (folds) it was split into, until they are all in."""

    trial: TrialSpec
    parts: list[int | None]
    results: dict[int | None, TrialResult] = field(default_factory=dict)
    seconds: float = 0.0  # the finished parts' own measurements
    dropped: bool = False  # cancelled after a fold had started: comes back once none runs


class RefereePool:
    """:class:`Referee` on forked worker processes, started on first use.

    A re-run of several folds is split into one job per fold, so where the pool has several
    processes (``workers``, or more lent by :meth:`lend`) the folds run at once; the answer
    comes back under the submitted key once every fold is in, merged in fold order: each fold
    is evaluated from the trial seed alone, so the merged result is bit for bit the one a
    single process evaluating the folds in turn gives (fold scores, fingerprints, mean, std,
    the first failing fold's error). The deadline stays the whole re-run's: the seconds its
    folds have run, summed, against ``timeout`` (a claimed timeout must still be agreed with).
    """

    def __init__(self, problem: Problem, resources_dir: Path, workers: int = 1, timeout: float = math.inf) -> None:
        self._problem = problem
        self._folds = problem_folds(problem)
        self._timeout = timeout
        self._arguments = {"problem": dumps(problem), "resources": str(resources_dir)}
        self._size = workers
        self._lent = 0
        self._server: ForkServer | None = None
        self._workers: list[_Worker] = []
        self._queue: dict[Part, TrialSpec] = {}  # parts submitted, waiting for a free worker
        self._reruns: dict[Hashable, _Rerun] = {}  # submitted and not yet returned
        self._started: set[Hashable] = set()  # keys run before
        self._died: set[Part] = set()  # parts whose worker died once

    def _fork(self) -> _Worker:
        assert self._server is not None
        return _Worker(*self._server.fork("mltask.referee:serve_reruns", **self._arguments))

    def lend(self, cores: int) -> None:
        """Let the re-runs use up to ``cores`` processes now (never fewer than ``workers``).

        For cores the backend's providers leave idle on this machine (see
        :meth:`mltask.backends.base.Backend.spare_cores`): the best's final re-run, split by
        fold, then takes them instead of running its folds one after another on one process.
        A job started on a lent core runs to its end when the loan shrinks; no new one starts.
        """
        self._lent = cores

    def submit(self, key: Hashable, trial: TrialSpec) -> None:
        """Queue a re-run; a key run before goes first: the verifier re-runs to confirm its own run before
        it bans, and a ban cancels the banned provider's other re-runs, so the sooner the better."""
        folds = list(range(self._folds)) if trial.folds is None else trial.folds
        parts: list[int | None] = list(folds) if len(folds) > 1 else [None]
        self._reruns[key] = _Rerun(trial, parts)
        jobs = {(key, f): trial if f is None else trial.model_copy(update={"folds": [f]}) for f in parts}
        self._queue = {**jobs, **self._queue} if key in self._started else {**self._queue, **jobs}
        self._started.add(key)
        self._dispatch()

    def cancel(self, keys: Iterable[Hashable]) -> set[Hashable]:
        """A re-run none of whose folds has started is forgotten; one that has started loses its waiting
        folds and comes back from :meth:`poll` (failed, "cancelled") with the seconds spent once none runs."""
        cancelled = set()
        for key in keys:
            rerun_ = self._reruns.get(key)
            if rerun_ is None:
                continue
            waiting = [part for part in self._queue if part[0] == key]
            for part in waiting:
                del self._queue[part]
            if len(waiting) == len(rerun_.parts):
                del self._reruns[key]
                cancelled.add(key)
            else:
                rerun_.dropped = True
        return cancelled

    def _dispatch(self) -> None:
        if self._queue and self._server is None:
            from mltask.runner import preload_modules  # the local workers' imports; runner imports us

            self._server = ForkServer(["mltask.provider", *preload_modules(self._problem)])
        width = max(self._size, self._lent)
        busy = sum(w.job is not None for w in self._workers)
        idle = [w for w in self._workers if w.job is None]
        while self._queue and busy < width:
            if not idle:  # a lent core: one more process (kept once idle: a process holds no core)
                self._workers.append(self._fork())
                idle.append(self._workers[-1])
            worker = idle.pop(0)
            part = next(iter(self._queue))
            worker.job = (part, self._queue.pop(part))
            worker.started = time.monotonic()
            busy += 1
            try:
                worker.conn.send_bytes(dumps(worker.job[1]).encode())
            except OSError:  # it died just now: poll() sees it and sends the job again
                pass

    def _spent(self, key: Hashable, now: float) -> float:
        """Seconds the re-run's folds have taken so far, running ones included."""
        running = [w for w in self._workers if w.job is not None and w.job[0][0] == key]
        return self._reruns[key].seconds + sum(now - w.started for w in running)

    def _limit(self, timeout: float) -> float:
        """How long :meth:`poll` may wait before a running re-run reaches its deadline."""
        now = time.monotonic()
        limit = timeout
        running: dict[Hashable, int] = {}
        for worker in self._workers:
            if worker.job is not None:
                running[worker.job[0][0]] = running.get(worker.job[0][0], 0) + 1
        for key, count in running.items():
            limit = min(limit, (self._timeout - self._spent(key, now)) / count)
        return max(0.0, limit)

    def poll(self, timeout: float = 0.0) -> list[tuple[Hashable, TrialResult, float]]:
        """Answers that came back; a worker freed here starts its next re-run only at the next :meth:`submit`
        or poll, once the caller has read these (a confirming re-run goes first, a ban cancels re-runs)."""
        self._dispatch()
        busy = [w for w in self._workers if w.job is not None]
        if timeout > 0 and busy:
            multiprocessing.connection.wait([w.conn for w in busy], self._limit(timeout))
        for worker in busy:
            assert worker.job is not None
            (key, fold), trial = worker.job
            if not worker.conn.poll():
                continue
            worker.job = None
            try:
                answer = json.loads(worker.conn.recv_bytes())
            except (EOFError, OSError):  # the worker died: a fresh one, and the fold again, once
                assert self._server is not None
                code = self._server.exit_code(worker.pid, timeout=5)
                self._replace(worker)
                if self._reruns[key].dropped:  # cancelled: nothing to run again
                    pass
                elif (key, fold) not in self._died:
                    self._died.add((key, fold))
                    self._queue = {(key, fold): trial, **self._queue}
                else:  # the trial kills its process (os._exit, a segfault), as it did on the providers
                    self._reruns[key].results[fold] = _failed(
                        trial, f"the requestor's worker died twice running it (exit code {code})")
                continue
            if "task_error" in answer:
                raise TaskError(*answer["task_error"])
            if "error" in answer:
                raise RuntimeError(f"the requestor's re-run of trial {trial.number} failed: {answer['error']}")
            self._reruns[key].results[fold] = TrialResult.model_validate_json(answer["result"])
            self._reruns[key].seconds += answer["seconds"]
        return self._finished()

    def _finished(self) -> list[tuple[Hashable, TrialResult, float]]:
        """The re-runs that are over: every fold in, or a fold failed (the later ones are not needed), or the
        deadline passed, or cancelled once started and nothing of it runs any more."""
        now = time.monotonic()
        done = []
        for key, rerun_ in list(self._reruns.items()):
            running = [w for w in self._workers if w.job is not None and w.job[0][0] == key]
            out = bool(running) or any(part[0] == key for part in self._queue)
            spent = self._spent(key, now)
            if out and spent >= self._timeout:
                result = _failed(rerun_.trial, f"TimeoutError: timed out on the requestor after {self._timeout:g} s")
                spent = self._timeout
            elif rerun_.dropped:
                if running:
                    continue
                result = _failed(rerun_.trial, "cancelled before it finished")
            else:
                merged = _merged(rerun_)
                if merged is None:
                    continue
                result = merged
            for worker in running:  # folds past the deadline, or after a fold that failed
                worker.job = None
                self._replace(worker)
            for part in [p for p in self._queue if p[0] == key]:
                del self._queue[part]
            del self._reruns[key]
            done.append((key, result, spent))
        return done

    def _replace(self, worker: _Worker) -> None:
        assert self._server is not None
        self._server.kill(worker.pid)
        worker.conn.close()
        fresh = self._fork()
        worker.pid, worker.conn = fresh.pid, fresh.conn

    def pending(self) -> int:
        return len(self._reruns)

    def close(self) -> None:
        """End the workers now, running re-runs included (one may take minutes)."""
        self._queue.clear()
        self._reruns.clear()
        if self._server is not None:
            for worker in self._workers:
                self._server.kill(worker.pid)
                worker.conn.close()
            self._server.close()
        self._workers, self._server = [], None


def _merged(rerun_: _Rerun) -> TrialResult | None:
    """The re-run's result from its folds, as one process evaluating them in turn gives it (the first failed
    fold's, or every fold's scores in fold order); ``None`` while a fold it depends on is still out."""
    results = rerun_.results
    if rerun_.parts == [None]:
        return results.get(None)
    for fold in rerun_.parts:
        if fold not in results:
            return None
        if results[fold].status != "ok":
            return results[fold]  # the folds after it would not have run
    got = [results[fold] for fold in rerun_.parts]
    merged: dict = {name: [x for r in got for x in getattr(r, name)]
                    for name in ("fold_scores", "fit_times", "score_times", "fold_fingerprints")}
    for name in ("metric_scores", "train_scores"):
        merged[name] = {metric: [x for r in got for x in getattr(r, name)[metric]] for metric in getattr(got[0], name)}
    return canonical_trial(got[0].model_copy(update=merged))
