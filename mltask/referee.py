"""The requestor as referee: re-runs in a few worker processes beside the dispatch loop.

The requestor is the one party that trusts itself, so it re-runs what must not be left to
a provider: a check where two providers disagree, every trial a provider says failed, and
the best trial before it is reported. It does so in ``verification.referee_workers``
processes (default 1), which the scheduler polls and never waits on: handing out and
collecting subtasks goes on while a re-run takes minutes.

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
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Protocol

from mltask.backends.forkserver import ForkServer
from mltask.errors import TaskError
from mltask.protocol import Problem, TrialResult, TrialSpec, dumps


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


@dataclass
class _Worker:
    pid: int
    conn: Connection
    job: tuple[Hashable, TrialSpec] | None = None
    deadline: float = math.inf  # when the job's re-run is given up


class RefereePool:
    """:class:`Referee` on forked worker processes, started on first use."""

    def __init__(self, problem: Problem, resources_dir: Path, workers: int = 1, timeout: float = math.inf) -> None:
        self._problem = problem
        self._timeout = timeout
        self._arguments = {"problem": dumps(problem), "resources": str(resources_dir)}
        self._size = workers
        self._server: ForkServer | None = None
        self._workers: list[_Worker] = []
        self._queue: dict[Hashable, TrialSpec] = {}  # submitted, waiting for a free worker
        self._started: set[Hashable] = set()  # keys run before
        self._died: set[Hashable] = set()  # keys whose worker died once

    def _fork(self) -> _Worker:
        assert self._server is not None
        return _Worker(*self._server.fork("mltask.referee:serve_reruns", **self._arguments))

    def submit(self, key: Hashable, trial: TrialSpec) -> None:
        """Queue a re-run; a key run before goes first: the verifier re-runs to confirm its own run before
        it bans, and a ban cancels the banned provider's other re-runs, so the sooner the better."""
        self._queue = {key: trial, **self._queue} if key in self._started else {**self._queue, key: trial}
        self._dispatch()

    def cancel(self, keys: Iterable[Hashable]) -> set[Hashable]:
        return {key for key in keys if self._queue.pop(key, None) is not None}

    def _dispatch(self) -> None:
        if self._queue and self._server is None:
            from mltask.runner import preload_modules  # the local workers' imports; runner imports us

            self._server = ForkServer(["mltask.provider", *preload_modules(self._problem)])
            self._workers = [self._fork() for _ in range(self._size)]
        for worker in self._workers:
            if worker.job is None and self._queue:
                key = next(iter(self._queue))
                worker.job = (key, self._queue.pop(key))
                self._started.add(key)
                worker.deadline = time.monotonic() + self._timeout
                try:
                    worker.conn.send_bytes(dumps(worker.job[1]).encode())
                except OSError:  # it died just now: poll() sees it and sends the job again
                    pass

    def poll(self, timeout: float = 0.0) -> list[tuple[Hashable, TrialResult, float]]:
        """Answers that came back; a worker freed here starts its next re-run only at the next :meth:`submit`
        or poll, once the caller has read these (a confirming re-run goes first, a ban cancels re-runs)."""
        self._dispatch()
        busy = [w for w in self._workers if w.job is not None]
        if timeout > 0 and busy:
            limit = min([timeout] + [w.deadline - time.monotonic() for w in busy])
            multiprocessing.connection.wait([w.conn for w in busy], max(0.0, limit))
        done = []
        for worker in busy:
            assert worker.job is not None
            key, trial = worker.job
            if not worker.conn.poll():
                if time.monotonic() >= worker.deadline:
                    worker.job = None
                    self._replace(worker)
                    done.append((key, _failed(trial, f"TimeoutError: timed out on the requestor after "
                                                     f"{self._timeout:g} s"), self._timeout))
                continue
            worker.job = None
            try:
                answer = json.loads(worker.conn.recv_bytes())
            except (EOFError, OSError):  # the worker died: a fresh one, and the re-run again, once
                assert self._server is not None
                code = self._server.exit_code(worker.pid, timeout=5)
                self._replace(worker)
                if key not in self._died:
                    self._died.add(key)
                    self._queue[key] = trial
                else:  # the trial kills its process (os._exit, a segfault), as it did on the providers
                    done.append((key, _failed(trial, f"the requestor's worker died twice running it (exit code "
                                                 f"{code})"), 0.0))
                continue
            if "task_error" in answer:
                raise TaskError(*answer["task_error"])
            if "error" in answer:
                raise RuntimeError(f"the requestor's re-run of trial {trial.number} failed: {answer['error']}")
            done.append((key, TrialResult.model_validate_json(answer["result"]), answer["seconds"]))
        return done

    def _replace(self, worker: _Worker) -> None:
        assert self._server is not None
        self._server.kill(worker.pid)
        worker.conn.close()
        fresh = self._fork()
        worker.pid, worker.conn = fresh.pid, fresh.conn

    def pending(self) -> int:
        return len(self._queue) + sum(w.job is not None for w in self._workers)

    def close(self) -> None:
        """End the workers now, running re-runs included (one may take minutes)."""
        self._queue.clear()
        if self._server is not None:
            for worker in self._workers:
                self._server.kill(worker.pid)
                worker.conn.close()
            self._server.close()
        self._workers, self._server = [], None
