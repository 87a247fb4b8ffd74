"""The task type: :class:`HyperparameterSearchTask`, the requestor's side of a search.

Modelled on Golem's task-type interface (``CoreTask``, the Task API's app handler): the
task hands out subtasks, takes results back, and knows when it is done. It proposes
configurations through Optuna's ask-and-tell, so proposing is decoupled from evaluating:
``next_subtask`` asks the sampler for a batch while other batches are still out (TPE's
constant liar and Optuna's RUNNING state keep a batch from repeating pending work), and
``accept`` tells the sampler what came back. It does no I/O besides its store, so every
backend, the verifier and the tests drive it the same way.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import TrialState

from mltask.definition import TaskDefinition
from mltask.protocol import Problem, SubtaskDefinition, SubtaskResult, TrialSpec, dumps
from mltask.resolution import resolve
from mltask.samplers import make_sampler
from mltask.store import Store

STATE_FILE = "state.db"
RESOURCES_DIR = "resources"
MAX_ATTEMPTS = 3
"""A batch is sent at most this often; then its trials are recorded as failed with the reason."""

optuna.logging.set_verbosity(optuna.logging.WARNING)


def trial_seed(task_seed: int, number: int) -> int:
    """A well-mixed 32-bit seed per trial, reproducible from the task seed alone."""
    return int(np.random.SeedSequence([task_seed, number]).generate_state(1)[0])


@dataclass
class Progress:
    """A snapshot for progress bars and front ends."""

    total: int
    done: int = 0
    failed: int = 0
    running: int = 0
    best_value: float | None = None
    best_number: int | None = None
    best_params: dict[str, Any] | None = None
    started_at: float = field(default_factory=time.time)


@dataclass
class _Pending:
    subtask: SubtaskDefinition
    provider: str
    attempt: int
    sent_at: float


class HyperparameterSearchTask:
    """One search: definition, sampler, store and the subtasks in flight."""

    def __init__(
        self,
        definition: TaskDefinition,
        problem: Problem,
        store: Store,
        task_id: str,
        n_trials: int,
        subtasks_count: int,
        direction: str,
        output_dir: Path,
    ) -> None:
        self.definition = definition
        self.problem = problem
        self.store = store
        self.task_id = task_id
        self.n_trials = n_trials
        self.subtasks_count = subtasks_count
        self.direction = direction
        self.output_dir = output_dir
        opts = definition.options
        self.study = optuna.create_study(direction=direction, sampler=make_sampler(opts.algorithm, opts.search_space, opts.seed))
        self._pending: dict[str, _Pending] = {}
        self._requeued: deque[tuple[list[TrialSpec], int]] = deque()
        self._asked = 0  # Optuna trials asked so far
        self._batches = 0  # fresh batches asked so far (requeued ones are not fresh)
        self._sent = 0  # subtasks sent, requeued included; numbers subtask ids
        self._aborted = False
        self._banned: set[str] = set()
        self._progress = Progress(total=n_trials)

    # -- creation -------------------------------------------------------------------------

    @classmethod
    def create(cls, definition: TaskDefinition, base_dir: Path, output_dir: Path) -> "HyperparameterSearchTask":
        """Validate against the world, copy resources, and start a fresh state file."""
        output_dir.mkdir(parents=True, exist_ok=True)
        resolved = resolve(definition, base_dir, output_dir / RESOURCES_DIR)
        task_id = uuid.uuid4().hex[:12]
        meta = {
            "task_id": task_id,
            "definition": definition.model_dump_json(),
            "problem": dumps(resolved.problem),
            "n_trials": str(resolved.n_trials),
            "subtasks_count": str(resolved.subtasks_count),
            "direction": resolved.direction,
            "created_at": str(time.time()),
        }
        store = Store.create(output_dir / STATE_FILE, meta)
        return cls(
            definition, resolved.problem, store, task_id, resolved.n_trials, resolved.subtasks_count,
            resolved.direction, output_dir,
        )

    @property
    def resources_dir(self) -> Path:
        return self.output_dir / RESOURCES_DIR

    # -- handing out work -----------------------------------------------------------------

    def has_pending_subtasks(self) -> bool:
        """Whether :meth:`next_subtask` would return work now."""
        return not self._aborted and (bool(self._requeued) or self._asked < self.n_trials)

    def next_subtask(self, provider_id: str) -> SubtaskDefinition | None:
        """The next batch for ``provider_id``: re-queued trials first, then fresh ones."""
        if not self.has_pending_subtasks():
            return None
        new_rows: list[tuple[int, dict[str, Any], int, dict[str, Any]]] = []
        if self._requeued:
            trials, attempt = self._requeued.popleft()
        else:
            trials, attempt = [], 1
            for _ in range(self._next_batch_size()):
                trial = self.study.ask()
                params = self.definition.options.search_space.sample(trial)
                spec = TrialSpec(number=trial.number, params=params, seed=trial_seed(self.definition.options.seed, trial.number))
                trials.append(spec)
                new_rows.append((spec.number, spec.params, spec.seed, self._system_attrs()))
                self._asked += 1
            self._batches += 1
        self._sent += 1
        subtask = SubtaskDefinition(
            task_id=self.task_id, subtask_id=f"s{self._sent:06d}", problem=self.problem, trials=trials
        )
        self.store.add_subtask(subtask.subtask_id, self._sent, provider_id, attempt, [t.number for t in trials], new_rows)
        self._pending[subtask.subtask_id] = _Pending(subtask, provider_id, attempt, time.time())
        self._progress.running = sum(len(p.subtask.trials) for p in self._pending.values())
        return subtask

    def _next_batch_size(self) -> int:
        # Split n trials into subtasks_count batches whose sizes differ by at most one.
        base, extra = divmod(self.n_trials, self.subtasks_count)
        size = base + (1 if self._batches < extra else 0)
        return max(1, min(size, self.n_trials - self._asked))

    def _system_attrs(self) -> dict[str, Any]:
        # Samplers such as GridSampler keep their bookkeeping (grid_id) on the trial; the
        # store keeps it so a rebuilt study does not hand out the same grid point twice.
        return dict(self.study.get_trials(deepcopy=False)[-1].system_attrs)

    def pending(self, subtask_id: str) -> SubtaskDefinition | None:
        """The subtask if it is still awaited (a late or repeated answer gets ``None``)."""
        entry = self._pending.get(subtask_id)
        return entry.subtask if entry else None

    # -- taking results back --------------------------------------------------------------

    def accept(self, result: SubtaskResult, verified: dict[int, str] | None = None) -> bool:
        """Record a checked result and tell the sampler; ``False`` if it was not awaited.

        ``verified`` says which trials the verifier re-ran ('full' or 'spot').
        """
        entry = self._pending.pop(result.subtask_id, None)
        if entry is None:
            return False
        rows = [
            (t.number, "complete" if t.status == "ok" else "failed", t.mean_score, t.model_dump(mode="json"))
            for t in result.trials
        ]
        self.store.settle_subtask(
            result.subtask_id, "accepted", trials=rows, compute_time=result.compute_time,
            environment=result.environment.model_dump(), verified=verified,
        )
        for t in result.trials:
            self._tell(t.number, t.mean_score if t.status == "ok" else None, t.params)
        self._progress.running = sum(len(p.subtask.trials) for p in self._pending.values())
        return True

    def reject(self, subtask_id: str, reason: str) -> None:
        """Drop a subtask's answer (fault, timeout, bad result) and send its trials again.

        After :data:`MAX_ATTEMPTS` sends the trials are recorded as failed with ``reason``:
        a configuration that kills every worker must not be retried forever.
        """
        entry = self._pending.pop(subtask_id, None)
        if entry is None:
            return
        if entry.attempt < MAX_ATTEMPTS and not self._aborted:
            self.store.settle_subtask(subtask_id, "rejected", reason=reason)
            self._requeued.append((entry.subtask.trials, entry.attempt + 1))
        else:
            error = f"gave up after {entry.attempt} attempts: {reason}"
            rows = [
                (t.number, "failed", None, {"number": t.number, "params": t.params, "seed": t.seed,
                                            "status": "failed", "error": error})
                for t in entry.subtask.trials
            ]
            self.store.settle_subtask(subtask_id, "failed", reason=reason, trials=rows)
            for t in entry.subtask.trials:
                self._tell(t.number, None, t.params)
        self._progress.running = sum(len(p.subtask.trials) for p in self._pending.values())

    def discard(self, subtask_ids: list[str]) -> None:
        """Forget subtasks without requeuing (abort); their trials stay unfinished."""
        for subtask_id in subtask_ids:
            if self._pending.pop(subtask_id, None) is not None:
                self.store.settle_subtask(subtask_id, "discarded", reason="task stopped")

    def ban(self, provider: str, reason: str) -> None:
        """Stop trusting ``provider``: nothing it reported stays in the study.

        Its accepted subtasks are reopened in the store and their trials re-queued with the
        same parameters and seeds; the in-memory study is rebuilt from the store (Optuna
        cannot un-tell a trial), keeping the sampler and its random state.
        """
        reopened = set(self.store.ban(provider, reason))
        self._banned.add(provider)
        if not reopened:
            return
        rows = self.store.trials()
        by_subtask: dict[str, list[TrialSpec]] = {}
        for sub in self.store.subtasks():
            if sub["subtask_id"] in reopened:
                numbers = json.loads(sub["trial_numbers"])
                by_subtask[sub["subtask_id"]] = [TrialSpec(number=n, params=rows[n].params, seed=rows[n].seed)
                                                 for n in numbers]
        self._requeued.extend((trials, 1) for trials in by_subtask.values())
        self._rebuild_study(rows)

    def is_banned(self, provider: str) -> bool:
        return provider in self._banned

    def record_verdict(self, verdict: Any) -> None:
        self.store.add_verdict(verdict.subtask_id, verdict.provider, verdict.ok, verdict.kind, verdict.checked,
                               verdict.reason, verdict.seconds)

    def _rebuild_study(self, rows: list[Any]) -> None:
        space = self.definition.options.search_space
        distributions = space.distributions()
        study = optuna.create_study(direction=self.direction, sampler=self.study.sampler)
        progress = Progress(total=self.n_trials, started_at=self._progress.started_at)
        self.study, self._progress = study, progress
        for row in rows:
            sampled = {k: v for k, v in row.params.items() if k in distributions}
            state = {"complete": TrialState.COMPLETE, "failed": TrialState.FAIL}.get(row.state, TrialState.RUNNING)
            study.add_trial(optuna.trial.create_trial(
                state=state, value=row.value if state == TrialState.COMPLETE else None, params=sampled,
                distributions={k: distributions[k] for k in sampled}, system_attrs=row.system_attrs,
            ))
            if state != TrialState.RUNNING:
                self._count(row.number, row.value if state == TrialState.COMPLETE else None, row.params)
        self._progress.running = sum(len(p.subtask.trials) for p in self._pending.values())

    def _tell(self, number: int, value: float | None, params: dict[str, Any]) -> None:
        if value is None:
            self.study.tell(number, state=TrialState.FAIL)
        else:
            self.study.tell(number, value)
        self._count(number, value, params)

    def _count(self, number: int, value: float | None, params: dict[str, Any]) -> None:
        p = self._progress
        if value is None:
            p.failed += 1
            return
        p.done += 1
        better = p.best_value is None or (value > p.best_value if self.direction == "maximize" else value < p.best_value)
        if better:
            p.best_value, p.best_number, p.best_params = value, number, params

    # -- state ----------------------------------------------------------------------------

    def progress(self) -> Progress:
        return self._progress

    def pending_subtasks(self) -> list[str]:
        return list(self._pending)

    def finished(self) -> bool:
        return self._aborted or (self._asked >= self.n_trials and not self._pending and not self._requeued)

    def abort(self) -> None:
        """Stop handing out work; what is in flight is discarded, what is done is kept."""
        self._aborted = True
        self.discard(self.pending_subtasks())
        self.store.set_meta("aborted_at", json.dumps(time.time()))
