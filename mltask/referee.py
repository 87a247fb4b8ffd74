"""The requestor as referee: re-runs in a small process pool beside the dispatch loop.

The requestor is the one party that trusts itself, so it re-runs what must not be left to
a provider: a check where two providers disagree, every trial a provider says failed, and
the best trial before it is reported. It does so in a ``ProcessPoolExecutor`` of
``verification.referee_workers`` processes (default 1), which the scheduler polls and never
waits on: handing out and collecting subtasks goes on while a re-run takes minutes.

The pool's workers are forked from the same forkserver as the local backend's (its preload
of scikit-learn is shared). A worker that dies (OOM, a stray kill) breaks the pool; the
pool is rebuilt and every job in it submitted again, so a re-run is never lost.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import time
from collections.abc import Hashable
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Protocol

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


class Referee(Protocol):
    """Where the requestor's re-runs happen; the scheduler only submits and polls."""

    def submit(self, key: Hashable, trial: TrialSpec) -> None:
        """Start re-running ``trial``; its answer comes back from :meth:`poll` under ``key``."""

    def poll(self, timeout: float = 0.0) -> list[tuple[Hashable, TrialResult, float]]:
        """Re-runs that finished (waiting at most ``timeout`` s for one): key, result, seconds."""

    def pending(self) -> int:
        """Re-runs submitted and not yet returned by :meth:`poll`."""

    def close(self) -> None:
        """Stop the workers; what is pending is dropped."""


class RefereePool:
    """:class:`Referee` on a process pool, created on first use."""

    def __init__(self, problem: Problem, resources_dir: Path, workers: int = 1) -> None:
        self._problem_json = dumps(problem)
        self._resources = str(resources_dir)
        self._workers = workers
        self._executor: concurrent.futures.ProcessPoolExecutor | None = None
        self._jobs: dict[Hashable, tuple[TrialSpec, concurrent.futures.Future]] = {}

    def _pool(self) -> concurrent.futures.ProcessPoolExecutor:
        if self._executor is None:
            self._executor = concurrent.futures.ProcessPoolExecutor(
                self._workers, mp_context=multiprocessing.get_context("forkserver")
            )
        return self._executor

    def submit(self, key: Hashable, trial: TrialSpec) -> None:
        future = self._pool().submit(rerun, self._problem_json, self._resources, dumps(trial))
        self._jobs[key] = (trial, future)

    def poll(self, timeout: float = 0.0) -> list[tuple[Hashable, TrialResult, float]]:
        if timeout > 0 and self._jobs:
            concurrent.futures.wait([f for _, f in self._jobs.values()], timeout,
                                    return_when=concurrent.futures.FIRST_COMPLETED)
        done = []
        for key, (_trial, future) in list(self._jobs.items()):
            if not future.done():
                continue
            try:
                text, seconds = future.result()
            except BrokenProcessPool:
                self._rebuild()
                return done
            del self._jobs[key]
            done.append((key, TrialResult.model_validate_json(text), seconds))
        return done

    def _rebuild(self) -> None:
        """A worker died and took the pool down: start a new one and submit every job again."""
        self.close_pool()
        for key, (trial, _) in list(self._jobs.items()):
            self.submit(key, trial)

    def pending(self) -> int:
        return len(self._jobs)

    def close(self) -> None:
        self._jobs.clear()
        self.close_pool()

    def close_pool(self) -> None:
        """End the workers now, running re-runs included."""
        if self._executor is not None:
            # A re-run may take minutes, and the executor would wait for it at exit; end it
            # (Python 3.14's terminate_workers; before it, the processes are only reachable so).
            for process in list((self._executor._processes or {}).values()):
                process.kill()
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
