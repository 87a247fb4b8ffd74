"""The loop that drives a task on a backend: hand out, collect, check, settle.

Generic over backends, like ``BaseSearchCV.fit`` around ``_run_search``: the backend only
runs subtasks; every decision (what to send, whether a result counts, what to re-send)
is made here and in the task type, identically for local, docker and golem runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

from mltask.backends.base import Backend, Completion
from mltask.protocol import ResultError, read_result
from mltask.task import HyperparameterSearchTask, Progress

StopReason = Literal["finished", "timeout"]
_POLL_SECONDS = 0.25


def drive(
    task: HyperparameterSearchTask,
    backend: Backend,
    *,
    timeout: float,
    on_update: Callable[[Progress], None] = lambda progress: None,
) -> StopReason:
    """Run ``task`` on ``backend`` until it finishes or ``timeout`` seconds pass."""
    subtask_timeout = float(task.definition.subtask_timeout_seconds)
    deadline = time.monotonic() + timeout
    while not task.finished():
        if time.monotonic() >= deadline:
            task.abort()
            return "timeout"
        for provider in backend.idle_providers():
            subtask = task.next_subtask(provider)
            if subtask is None:
                break
            backend.submit(provider, subtask, min(subtask_timeout, max(1.0, deadline - time.monotonic())))
        for completion in backend.wait(_POLL_SECONDS):
            settle(task, completion)
        on_update(task.progress())
    return "finished"


def settle(task: HyperparameterSearchTask, completion: Completion) -> None:
    """Accept a subtask's result if it is awaited and well-formed; otherwise re-queue it."""
    subtask_id = completion.subtask.subtask_id
    subtask = task.pending(subtask_id)
    if subtask is None:
        return  # a late answer to a subtask already settled: never counted twice
    if completion.error or completion.output_dir is None:
        task.reject(subtask_id, f"{completion.provider}: {completion.error or 'no output'}")
        return
    try:
        result = read_result(completion.output_dir, subtask)
    except ResultError as exc:
        task.reject(subtask_id, f"{completion.provider}: {exc}")
        return
    task.accept(result)
