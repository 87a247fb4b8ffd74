"""The loop that drives a task on a backend: hand out, collect, verify, settle.

Generic over backends, like ``BaseSearchCV.fit`` around ``_run_search``: the backend only
runs subtasks; every decision (what to send, whether a result counts, whom to distrust,
what to re-send) is made here, in the verifier and in the task type, identically for
local, docker and golem runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

from mltask.backends.base import Backend, Completion
from mltask.errors import TaskError
from mltask.protocol import MissingResult, ResultError, TrialResult, TrialSpec, read_result
from mltask.task import HyperparameterSearchTask, Progress
from mltask.verifier import Verdict, Verifier

StopReason = Literal["finished", "timeout", "aborted"]
_POLL_SECONDS = 0.25
_ABORT_CHECK_SECONDS = 1.0


def make_verifier(task: HyperparameterSearchTask) -> Verifier:
    """The task's verifier; after a resume it remembers which providers it has seen."""
    opts = task.definition.options
    verifier = Verifier(task.problem, task.resources_dir, opts.verification, opts.seed, task.direction)
    verifier.seen_providers.update(s["provider"] for s in task.store.subtasks() if s["state"] == "accepted")
    return verifier


def drive(
    task: HyperparameterSearchTask,
    backend: Backend,
    *,
    timeout: float,
    verifier: Verifier | None = None,
    on_update: Callable[[Progress], None] = lambda progress: None,
) -> StopReason:
    """Run ``task`` on ``backend`` until it finishes or ``timeout`` seconds pass.

    A search is finished only once its best trial has survived a full re-run; if it does
    not, its provider is banned, everything it reported is sent again, and the search
    goes on.
    """
    verifier = verifier or make_verifier(task)
    deadline = time.monotonic() + timeout
    while True:
        stopped = _run_until_settled(task, backend, verifier, deadline, on_update)
        if stopped is not None:
            return stopped
        if verify_best(task, verifier):
            return "finished"


def _run_until_settled(
    task: HyperparameterSearchTask,
    backend: Backend,
    verifier: Verifier,
    deadline: float,
    on_update: Callable[[Progress], None],
) -> StopReason | None:
    """Hand out and collect subtasks until none is left; a reason if stopped early."""
    subtask_timeout = float(task.definition.subtask_timeout_seconds)
    next_abort_check = 0.0
    busy = 0
    while not task.finished():
        now = time.monotonic()
        if now >= deadline:
            task.abort()
            return "timeout"
        if now >= next_abort_check:
            next_abort_check = now + _ABORT_CHECK_SECONDS
            if task.abort_requested():
                task.abort()
                return "aborted"
        for provider in task.hand_out_order([p for p in backend.idle_providers() if not task.is_banned(p)]):
            subtask = task.next_subtask(provider)
            if subtask is None:
                break
            backend.submit(provider, subtask, min(subtask_timeout, max(1.0, deadline - time.monotonic())))
            busy += 1
        if busy == 0 and task.has_pending_subtasks() and not backend.expecting_providers():
            raise TaskError(
                "providers", f"every provider was banned or dropped (last: {task.last_exclusion()}); nothing can "
                "run the rest - fix the cause and run `mltask tasks resume`"
            )
        for completion in backend.wait(_POLL_SECONDS):
            busy -= 1
            settle(task, completion, verifier)
        on_update(task.progress())
    return None


def verify_best(task: HyperparameterSearchTask, verifier: Verifier) -> bool:
    """Re-run the best trial in full unless already done; ``False`` if it proved fake."""
    row = task.best_trial()
    if row is None or row.verified == "full" or not verifier.options.verify_best:
        return True
    assert row.result is not None and row.subtask_id is not None and row.provider is not None
    spec = TrialSpec(number=row.number, params=row.params, seed=row.seed)
    verdict = verifier.check_best(spec, TrialResult.model_validate(row.result), row.subtask_id, row.provider)
    task.record_verdict(verdict)
    if verdict.ok:
        task.mark_verified(row.number)
        return True
    task.ban(row.provider, verdict.reason or "the best trial did not reproduce")
    return False


def settle(task: HyperparameterSearchTask, completion: Completion, verifier: Verifier) -> None:
    """Accept a subtask's result only if it is awaited, well-formed and survives verification."""
    subtask_id, provider = completion.subtask.subtask_id, completion.provider
    subtask = task.pending(subtask_id)
    if subtask is None:
        return  # a late answer to a subtask already settled: never counted twice
    if task.is_banned(provider):
        task.reject(subtask_id, f"{provider} is banned")
        return
    if completion.error or completion.output_dir is None:
        task.reject(subtask_id, f"{provider}: {completion.error or 'no output'}", fault=True)
        return
    try:
        result = read_result(completion.output_dir, subtask)
    except MissingResult as exc:
        task.reject(subtask_id, f"{provider}: {exc}", fault=True)
        return
    except ResultError as exc:  # an honest provider always writes our schema
        verdict = Verdict(subtask_id, provider, ok=False, kind="structure", reason=str(exc))
    else:
        verdict = verifier.check(subtask, result, provider, task.progress().best_value)
    task.record_verdict(verdict)
    if verdict.ok:
        verified = {n: "spot" for n in verdict.spot_verified} | {n: "full" for n in verdict.fully_verified}
        task.accept(result, verified=verified)
    else:
        task.reject(subtask_id, f"{provider}: {verdict.reason}")
        if verdict.kind == "version":  # an outdated image, not a cheat: drop it, keep its work
            task.drop(provider, verdict.reason or "other versions")
        else:
            task.ban(provider, verdict.reason or "wrong result")
