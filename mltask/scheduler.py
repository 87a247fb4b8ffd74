"""The loop that drives a task on a backend: hand out, collect, settle, check.

Generic over backends, like ``BaseSearchCV.fit`` around ``_run_search``: the backend only
runs subtasks; every decision (what to send, whether a result counts, what to check and
where, whom to distrust, what to re-send) is made here, in the verifier and in the task
type, identically for local, docker and golem runs. Nothing in the loop waits on a check:
check subtasks go out like search subtasks, and the requestor's own re-runs run in a pool
the loop only polls.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from mltask.backends.base import Backend
from mltask.errors import TaskError
from mltask.task import HyperparameterSearchTask, Progress
from mltask.verifier import Verifier

StopReason = Literal["finished", "timeout", "aborted"]
_POLL_SECONDS = 0.25
_ABORT_CHECK_SECONDS = 1.0


def make_verifier(task: HyperparameterSearchTask) -> Verifier:
    """The task's verifier; after a resume it carries on the checks that were planned."""
    return Verifier(task)


def drive(
    task: HyperparameterSearchTask,
    backend: Backend,
    *,
    timeout: float,
    verifier: Verifier | None = None,
    on_update: Callable[[Progress], None] = lambda progress: None,
) -> StopReason:
    """Run ``task`` on ``backend`` until it finishes or ``timeout`` seconds pass.

    A search is finished once every trial is settled, every planned check has resolved and
    the best trial has survived a full re-run; a check that fails bans its provider,
    everything it reported is sent again, and the search goes on.
    """
    verifier = verifier or make_verifier(task)
    try:
        return _run(task, backend, verifier, verifier.clock() + timeout, on_update)
    finally:
        verifier.close()


def _run(
    task: HyperparameterSearchTask,
    backend: Backend,
    verifier: Verifier,
    deadline: float,
    on_update: Callable[[Progress], None],
) -> StopReason:
    subtask_timeout = float(task.definition.subtask_timeout_seconds)
    clock = verifier.clock  # time.monotonic, or a simulation's virtual clock
    next_abort_check = 0.0
    sent: dict[str, float] = {}  # subtask id -> when it went out, to measure its time out ourselves
    while True:
        now = clock()
        if now >= deadline:
            task.abort()
            return "timeout"
        if now >= next_abort_check:
            next_abort_check = now + _ABORT_CHECK_SECONDS
            if task.abort_requested():
                task.abort()
                return "aborted"
        if task.finished() and not verifier.busy() and verifier.best_verified():
            return "finished"
        idle = backend.idle_providers()
        for provider in idle:
            verifier.saw(provider)
        order = task.hand_out_order([p for p in idle if not task.is_banned(p)])
        checks = verifier.hand_checks(order)
        for provider in order:
            subtask = checks.get(provider) or task.next_subtask(provider)
            if subtask is None:
                continue
            backend.submit(provider, subtask, min(subtask_timeout, max(1.0, deadline - clock())))
            sent[subtask.subtask_id] = clock()
        if not sent and task.has_pending_subtasks() and not backend.expecting_providers():
            raise TaskError(
                "providers", f"every provider was banned or dropped (last: {task.last_exclusion()}); nothing can "
                "run the rest - fix the cause and run `mltask tasks resume`"
            )
        completions = backend.wait(_POLL_SECONDS)
        for completion in completions:
            now = clock()
            seconds_out = now - sent.pop(completion.subtask.subtask_id, now)
            if verifier.owns(completion.subtask.subtask_id):
                verifier.collect(completion, seconds_out)
            else:
                verifier.settle(completion, seconds_out)
        verifier.poll(timeout=0.0 if sent or completions else _POLL_SECONDS, spare_cores=backend.spare_cores())
        on_update(task.progress())

