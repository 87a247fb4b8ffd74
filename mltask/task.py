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

import hashlib
import json
import math
import time
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import TrialState

from mltask import outdir
from mltask.definition import TaskDefinition
from mltask.errors import TaskError
from mltask.fidelity import RungSchedule
from mltask.outdir import RESOURCES_DIR, STATE_FILE
from mltask.protocol import Problem, SubtaskDefinition, SubtaskResult, TrialResult, TrialSpec, dumps
from mltask.resolution import resolve
from mltask.samplers import make_sampler
from mltask.store import Store, TrialRow, state_errors

optuna.logging.set_verbosity(optuna.logging.WARNING)


def trial_seed(task_seed: int, params: dict[str, Any]) -> int:
    """A well-mixed 32-bit seed per configuration, reproducible from the task seed alone.

    Derived from the configuration rather than the trial number, so a configuration scores
    the same whichever trial it lands on: grid points are handed out in a different order
    after a resume, and TPE may propose a point twice.
    """
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).digest()
    return int(np.random.SeedSequence([task_seed, int.from_bytes(digest[:8], "little")]).generate_state(1)[0])


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
    pruned: int = 0  # multi-fidelity: configurations stopped early (counted in ``done`` too)
    resource_used: float = 0.0  # multi-fidelity: resource of every rung evaluation accepted so far
    resource_budget: float = 0.0  # ...and the most the search can use (every configuration at every rung)


@dataclass
class _Pending:
    subtask: SubtaskDefinition
    provider: str
    attempt: int
    avoid: frozenset[str] = frozenset()  # providers that failed these trials before


@dataclass
class _Suspect:
    """A provider's fault, counted only once every trial it failed has succeeded elsewhere."""

    provider: str
    reason: str
    numbers: set[int]


@dataclass(frozen=True)
class _Batch:
    """Trials waiting to be sent again, and the providers that already failed them."""

    trials: list[TrialSpec]
    attempt: int
    avoid: frozenset[str] = frozenset()


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
        sampler = make_sampler(opts.algorithm, opts.search_space, opts.seed)
        self.schedule = None if opts.fidelity is None else RungSchedule(
            opts.fidelity, json.loads(store.meta()["max_resource"]))
        self.study = self._new_study(sampler)
        self._pending: dict[str, _Pending] = {}
        self._requeued: deque[_Batch] = deque()
        self._asked = 0  # Optuna trials asked so far
        self._batches = 0  # fresh batches asked so far (requeued ones are not fresh)
        self._sent = 0  # subtasks sent, requeued included; numbers subtask ids
        self._aborted = False
        self._banned: set[str] = set()
        self._dropped: dict[str, str] = {}
        self._last_exclusion = ""
        self._faults: dict[str, int] = {}  # consecutive failures per provider
        self._suspects: dict[str, _Suspect] = {}  # faults not yet counted, by subtask id
        self._progress = Progress(total=n_trials)
        if self.schedule is not None:
            self._progress.resource_budget = n_trials * self.schedule.spent(list(range(len(self.schedule.resources))))
        self.max_attempts = opts.max_attempts
        self.max_provider_failures = opts.max_provider_failures

    # -- creation -------------------------------------------------------------------------

    @classmethod
    def create(cls, definition: TaskDefinition, base_dir: Path, output_dir: Path, *, force: bool = False,
               resources_roots: Sequence[Path] = ()) -> HyperparameterSearchTask:
        """Validate against the world, copy resources, and start a fresh state file.

        The task is resolved in a staging dir and moved into ``output_dir`` only once valid:
        a task that fails leaves the dir as it was, and ``force`` replaces a previous task's
        own files only then (:mod:`mltask.outdir`). Resources come from ``base_dir`` (the
        task file's folder) or one of ``resources_roots``.
        """
        previous = outdir.previous_files(output_dir, force)
        with outdir.private_dir(output_dir), outdir.staging(output_dir) as stage:
            resolved = resolve(definition, base_dir, stage / RESOURCES_DIR, resources_roots)
            names = [r.name for r in resolved.problem.resources]
            adopted = outdir.install(stage / RESOURCES_DIR, names, output_dir, previous)
            task_id = uuid.uuid4().hex[:12]
            meta = {
                "task_id": task_id,
                "definition": definition.model_dump_json(),
                "problem": dumps(resolved.problem),
                "n_trials": str(resolved.n_trials),
                "subtasks_count": str(resolved.subtasks_count),
                "direction": resolved.direction,
                "created_at": str(time.time()),
                **({"max_resource": json.dumps(resolved.max_resource)} if definition.options.fidelity else {}),
                outdir.ADOPTED: json.dumps(adopted),
            }
            store = Store.create(output_dir / STATE_FILE, meta)
        return cls(
            definition, resolved.problem, store, task_id, resolved.n_trials, resolved.subtasks_count,
            resolved.direction, output_dir,
        )

    @classmethod
    def load(cls, output_dir: Path, update: TaskDefinition | None = None) -> HyperparameterSearchTask:
        """Reopen a task from its state file after a stop, a crash or ``kill -9``.

        Subtasks that were in flight are closed as discarded and their trials re-queued
        with the same parameters and seeds; accepted results, verdicts and bans stand. The
        study is rebuilt from the store. ``update`` may change only what
        :func:`compatible_update` allows.
        """
        store = Store.open(output_dir / STATE_FILE)
        with state_errors(store.path):
            return cls._load(store, output_dir, update)

    @classmethod
    def _load(cls, store: Store, output_dir: Path, update: TaskDefinition | None) -> HyperparameterSearchTask:
        # Read and check everything first: a damaged state must be refused before any write.
        meta = store.meta()
        definition = TaskDefinition.model_validate_json(meta["definition"])
        problem = Problem.model_validate_json(meta["problem"])
        n_trials = int(meta["n_trials"])
        rows, subtasks, bans = store.trials(), store.subtasks(), store.bans()
        searches = [sub for sub in subtasks if sub["purpose"] == "search"]
        if update is not None:
            definition, n_trials = compatible_update(definition, update, n_trials)
        from mltask.provider import check_resources

        try:
            check_resources(problem.resources, output_dir / RESOURCES_DIR)
        except TaskError as exc:
            raise TaskError(
                "resources", f"{exc.message} since the task was created; restore the file or start a new task"
            ) from None
        if update is not None:
            store.set_meta("definition", definition.model_dump_json())
            store.set_meta("n_trials", str(n_trials))
        for sub in subtasks:
            if sub["state"] == "pending":
                store.settle_subtask(sub["subtask_id"], "discarded", reason="the requestor stopped before the answer")
        store.set_meta("abort_requested", "")
        store.set_meta("dropped", "{}")
        task = cls(definition, problem, store, meta["task_id"], n_trials, int(meta["subtasks_count"]),
                   meta["direction"], output_dir)
        task._banned = set(bans)
        task._asked = len(rows)
        task._sent = max((sub["seq"] for sub in subtasks), default=0)
        first_batch: dict[int, str] = {}
        for sub in searches:
            for n in json.loads(sub["trial_numbers"]):
                first_batch.setdefault(n, sub["subtask_id"])
        task._batches = len(set(first_batch.values()))
        task._rebuild_study(rows, rejudge=store.rejudge_pending())  # a stop between a ban and its judging
        task._requeue_unsettled(rows, exclude=set())
        task._climb_if_none_complete()  # a stop between a last result and its forced promotion
        return task

    @property
    def resources_dir(self) -> Path:
        return self.output_dir / RESOURCES_DIR

    # -- handing out work -----------------------------------------------------------------

    def has_pending_subtasks(self) -> bool:
        """Whether :meth:`next_subtask` would return work now."""
        waiting = self.schedule is not None and bool(self.schedule.waiting)
        return not self._aborted and (bool(self._requeued) or self._asked < self.n_trials or waiting)

    def next_subtask(self, provider_id: str) -> SubtaskDefinition | None:
        """The next batch for ``provider_id``: re-queued trials first, then fresh ones.

        Multi-fidelity: a fresh batch takes waiting promotions first (highest rung first),
        then fills up with new configurations at their first rung, so no provider waits for
        a rung to fill.
        """
        if not self.has_pending_subtasks():
            return None
        new_rows: list[tuple[int, dict[str, Any], int, dict[str, Any]]] = []
        batch = self._take_requeued(provider_id)
        if batch is not None:
            trials, attempt, avoid = batch.trials, batch.attempt, batch.avoid
        else:
            trials, attempt, avoid = [], 1, frozenset()
            size = self._next_batch_size()
            if self.schedule is not None:
                size = math.ceil(self.n_trials / self.subtasks_count)
                trials = [self._spec(self.store.trial(n), rung) for n, rung in self.schedule.take(size)]
            for _ in range(min(size - len(trials), self.n_trials - self._asked)):
                trial = self.study.ask()
                params = self.definition.options.search_space.sample(trial)
                seed = trial_seed(self.definition.options.seed, params)
                spec = TrialSpec(number=trial.number, params=params, seed=seed)
                if self.schedule is not None:
                    spec = spec.model_copy(update={"resource": self.schedule.resources[self._first_rung(trial.number)]})
                trials.append(spec)
                new_rows.append((spec.number, spec.params, spec.seed, self._system_attrs()))
                self._asked += 1
            self._batches += 1
        self._sent += 1
        subtask = SubtaskDefinition(
            task_id=self.task_id, subtask_id=f"s{self._sent:06d}", problem=self.problem, trials=trials
        )
        numbers = [t.number for t in trials]
        self.store.add_subtask(subtask.subtask_id, self._sent, provider_id, attempt, numbers, new_rows)
        self._pending[subtask.subtask_id] = _Pending(subtask, provider_id, attempt, avoid)
        self._update_running()
        return subtask

    def hand_out_order(self, providers: list[str]) -> list[str]:
        """Idle ``providers`` in the order to offer them work: those that failed fewer re-queued batches first.

        With :meth:`_take_requeued` this sends a batch "to another provider where there is
        one": an idle provider that has not failed it is asked before one that has.
        """
        return sorted(providers, key=lambda p: sum(p in batch.avoid for batch in self._requeued))

    def _take_requeued(self, provider: str) -> _Batch | None:
        """A re-queued batch this provider has not failed; else fresh work; else any batch.

        A batch goes back to a provider that failed it only when no fresh trials are left
        to give that provider instead and no idle provider that has not failed it was asked
        first (see :meth:`hand_out_order`).
        """
        for batch in self._requeued:
            if provider not in batch.avoid:
                self._requeued.remove(batch)
                return batch
        if self._requeued and self._asked >= self.n_trials:
            return self._requeued.popleft()
        return None

    def _next_batch_size(self) -> int:
        # Split n trials into subtasks_count batches whose sizes differ by at most one.
        base, extra = divmod(self.n_trials, self.subtasks_count)
        size = base + (1 if self._batches < extra else 0)
        return max(1, min(size, self.n_trials - self._asked))

    def _new_study(self, sampler: optuna.samplers.BaseSampler) -> optuna.Study:
        if self.schedule is None:
            return optuna.create_study(direction=self.direction, sampler=sampler)
        # One fixed name: Hyperband assigns brackets from the study name and trial number, so a
        # rebuilt study, and another run of the same task file, must carry the same one.
        return optuna.create_study(direction=self.direction, sampler=sampler, pruner=self.schedule.pruner(),
                                   study_name="mltask")

    def _first_rung(self, number: int) -> int:
        assert self.schedule is not None
        return self.schedule.first_rung(self.study, number)

    def _next_rung(self, number: int) -> int:
        """The rung trial ``number`` is to be evaluated at next, from its accepted rungs in the store."""
        done = self.store.top_rung(number)
        return self._first_rung(number) if done is None else done + 1

    def _spec(self, row: TrialRow, rung: int | None) -> TrialSpec:
        """Trial ``row`` to evaluate: its parameters and seed, and (multi-fidelity) ``rung``'s resource."""
        resource = None if self.schedule is None or rung is None else self.schedule.resources[rung]
        return TrialSpec(number=row.number, params=row.params, seed=row.seed, resource=resource)

    def trial_spec(self, row: TrialRow) -> TrialSpec:
        """The evaluation a stored trial row holds, as it was sent: at its rung's resource (multi-fidelity)."""
        held = self.schedule is not None and row.subtask_id is not None
        return self._spec(row, self.store.rung_of(row.number, row.subtask_id) if held else None)

    def claims(self, numbers: set[int], subtask_id: str) -> tuple[dict[int, TrialSpec], dict[int, TrialResult]] | None:
        """What ``subtask_id`` claimed for trials ``numbers``, with the specs it answered; ``None`` once reopened.

        Multi-fidelity: a promoted trial's row holds its latest rung, so an earlier rung's
        claim (a check planned before a stop) is read from the rungs table.
        """
        if self.schedule is None:
            rows = [self.store.trial(n) for n in numbers]
            if any(r.subtask_id != subtask_id or r.result is None for r in rows):
                return None
            return ({r.number: self.trial_spec(r) for r in rows},
                    {r.number: TrialResult.model_validate(r.result) for r in rows})
        rungs = {r["number"]: r for r in self.store.rungs_of(subtask_id)}
        if not numbers <= set(rungs):
            return None
        return ({n: self._spec(self.store.trial(n), rungs[n]["rung"]) for n in numbers},
                {n: TrialResult.model_validate(rungs[n]["result"]) for n in numbers})

    def _system_attrs(self) -> dict[str, Any]:
        # Samplers such as GridSampler keep their bookkeeping (grid_id) on the trial; the
        # store keeps it so a rebuilt study does not hand out the same grid point twice.
        return dict(self.study.get_trials(deepcopy=False)[-1].system_attrs)

    def pending(self, subtask_id: str) -> SubtaskDefinition | None:
        """The subtask if it is still awaited (a late or repeated answer gets ``None``)."""
        entry = self._pending.get(subtask_id)
        return entry.subtask if entry else None

    # -- taking results back --------------------------------------------------------------

    def accept(self, result: SubtaskResult, verified: dict[int, str] | None = None,
               seconds_out: float | None = None) -> bool:
        """Record a well-formed result and tell the sampler; ``False`` if it was not awaited.

        Acceptance is optimistic: the verifier checks samples later and, if one fails, bans
        the provider, which takes everything it reported out of the study again.
        ``verified`` says which trials were already verified ('full', 'spot' or 'cross');
        ``seconds_out`` is the time the subtask was out, measured by the requestor.
        """
        entry = self._pending.pop(result.subtask_id, None)
        if entry is None:
            return False
        self._record(entry, result, verified, seconds_out)
        self._faults[entry.provider] = 0
        self._settle_suspects(entry.provider, {t.number for t in result.trials if t.status == "ok"},
                              {t.number for t in result.trials})
        self._update_running()
        self._climb_if_none_complete()
        return True

    def _record(self, entry: _Pending, result: SubtaskResult, verified: dict[int, str] | None,
                seconds_out: float | None) -> None:
        if self.schedule is not None:
            self._accept_rungs(entry, result, verified, seconds_out)
            return
        rows = [
            (t.number, "complete" if t.status == "ok" else "failed", t.mean_score, t.model_dump(mode="json"))
            for t in result.trials
        ]
        self.store.settle_subtask(
            result.subtask_id, "accepted", trials=rows, compute_time=result.compute_time,
            environment=result.environment.model_dump(), verified=verified, seconds_out=seconds_out,
        )
        for t in result.trials:
            self._tell(t.number, t.mean_score if t.status == "ok" else None, t.params)

    def gives_up(self, subtask_id: str) -> bool:
        """Whether a fault on ``subtask_id`` now would record its trials as failed for good."""
        entry = self._pending.get(subtask_id)
        return entry is not None and entry.attempt >= self.max_attempts

    def rescue(self, result: SubtaskResult, reason: str) -> None:
        """Accept the requestor's own run of a subtask that providers failed ``max_attempts`` times.

        Some of its trials ran on the requestor, so each provider that failed them failed work
        that runs: a fault against every one of them. Without this, colluders as many as
        ``max_attempts`` hid the best configuration by never answering it ("gave up"), at no cost.
        """
        entry = self._pending.pop(result.subtask_id)
        numbers = {t.number for t in result.trials}
        self._settle_suspects(entry.provider, set(), numbers)  # their faults are counted below, each once
        self._record(entry, result, {t.number: "full" for t in result.trials if t.status == "ok"}, None)
        for provider in sorted(entry.avoid | {entry.provider}):
            self._fault(provider, reason)
        self._update_running()

    def _accept_rungs(self, entry: _Pending, result: SubtaskResult, verified: dict[int, str] | None,
                      seconds_out: float | None) -> None:
        """Multi-fidelity acceptance: each rung result is reported, the pruner decides, all is stored at once.

        The trial's row takes its latest rung result: 'running' while promoted, 'pruned',
        'complete' at the top rung (only those rank for the best), or 'failed'. A result for
        a rung whose basis a ban voided meanwhile is not stored; the trial is queued again
        at the rung it now needs.
        """
        assert self.schedule is not None
        specs = {t.number: t for t in entry.subtask.trials}
        rows, rungs, outcomes = [], [], []
        for t in result.trials:
            rung = self.schedule.resources.index(specs[t.number].resource)
            expected = self._next_rung(t.number)
            if rung != expected:
                self.schedule.waiting[t.number] = expected
                continue
            decision = "failed" if t.status != "ok" else self.schedule.decide(self.study, t.number, rung, t.mean_score)
            state = {"promoted": "running"}.get(decision, decision)
            payload = t.model_dump(mode="json")
            rows.append((t.number, state, t.mean_score, payload))
            rungs.append((t.number, rung, self.schedule.resources[rung], "complete" if t.status == "ok" else "failed",
                          t.mean_score, payload, decision))
            outcomes.append((t, rung, decision))
        self.store.settle_subtask(
            result.subtask_id, "accepted", trials=rows, compute_time=result.compute_time,
            environment=result.environment.model_dump(), verified=verified, seconds_out=seconds_out, rungs=rungs,
        )
        for t, rung, decision in outcomes:
            self._progress.resource_used += self.schedule.resources[rung]
            if decision != "promoted":
                self._tell(t.number, t.mean_score if t.status == "ok" else None, t.params, pruned=decision == "pruned")

    def reject(self, subtask_id: str, reason: str, *, fault: bool = False) -> None:
        """Drop a subtask's answer and send its trials again, to another provider if possible.

        ``fault`` marks a crash, kill, timeout or missing result rather than a wrong answer:
        a batch of several trials is split into single trials, so one configuration that
        kills its worker cannot take the others down with it, and each goes to a provider
        that has not failed it where one is idle. After ``max_attempts`` sends a trial is
        recorded as failed with ``reason``: a configuration that fails deterministically is
        not retried forever.

        Whose fault was it? A configuration that hangs or crashes does so on every provider,
        and one provider may be all there is, so a fault counts against the provider only
        once every trial it failed has succeeded on another provider (:meth:`is_banned`
        turns true after ``max_provider_failures`` of those in a row). A broken provider is
        still dropped, as soon as others have redone its work; one configuration that
        fails everywhere is recorded as failed and drops no one.
        """
        entry = self._pending.pop(subtask_id, None)
        if entry is None:
            return
        trials = entry.subtask.trials
        numbers = {t.number for t in trials}
        gave_up = entry.attempt >= self.max_attempts
        if fault or gave_up:  # failed on a second provider, or for good: no earlier fault on them can count
            self._settle_suspects(entry.provider, set(), numbers)
        if not gave_up:
            if fault:
                self._suspects[subtask_id] = _Suspect(entry.provider, reason, numbers)
            self.store.settle_subtask(subtask_id, "rejected", reason=reason)
            avoid = entry.avoid | {entry.provider}
            groups = [[t] for t in trials] if fault and len(trials) > 1 else [trials]
            self._requeued.extend(_Batch(group, entry.attempt + 1, avoid) for group in groups)
        else:
            error = f"gave up after {entry.attempt} attempts: {reason}"
            rows = [
                (t.number, "failed", None, {"number": t.number, "params": t.params, "seed": t.seed,
                                            "status": "failed", "error": error})
                for t in trials
            ]
            rungs = [] if self.schedule is None else [
                (n, self.schedule.resources.index(t.resource), t.resource, "failed", None, r, "failed")
                for (n, _, _, r), t in zip(rows, trials, strict=True)
            ]
            self.store.settle_subtask(subtask_id, "failed", reason=reason, trials=rows, rungs=rungs)
            for t in trials:
                self._tell(t.number, None, t.params)
            self._climb_if_none_complete()
        self._update_running()

    def _settle_suspects(self, provider: str, succeeded: set[int], settled: set[int]) -> None:
        """Count the faults whose trials ``provider`` has now ``succeeded`` at; forget those that cannot count.

        A suspect is forgotten when one of its trials fails for good, fails elsewhere too,
        or is done by the suspect itself: then it was the configuration, or it is unknown.
        """
        for subtask_id, suspect in list(self._suspects.items()):
            hit = suspect.numbers & settled
            if not hit:
                continue
            if suspect.provider == provider or hit - succeeded:
                del self._suspects[subtask_id]
                continue
            suspect.numbers -= hit
            if suspect.numbers:
                continue
            del self._suspects[subtask_id]
            self._fault(suspect.provider, suspect.reason)

    def _fault(self, provider: str, reason: str) -> None:
        """Count a fault of ``provider``; ``max_provider_failures`` in a row drop it."""
        faults = self._faults[provider] = self._faults.get(provider, 0) + 1
        if faults >= self.max_provider_failures and not self.is_banned(provider):
            self.drop(provider, f"{faults} failures in a row, last: {reason}")

    def discard(self, subtask_ids: list[str]) -> None:
        """Forget subtasks without requeuing (abort); their trials stay unfinished."""
        for subtask_id in subtask_ids:
            if self._pending.pop(subtask_id, None) is not None:
                self.store.settle_subtask(subtask_id, "discarded", reason="task stopped")

    def ban(self, provider: str, reason: str) -> None:
        """Stop trusting ``provider``: nothing it reported stays in the study.

        Its accepted subtasks are reopened in the store and their trials re-queued with the
        same parameters and seeds; the in-memory study is rebuilt from the store (Optuna
        cannot un-tell a trial), keeping the sampler and its random state. Multi-fidelity:
        the trials pruned against the rung evaluations the ban voided are judged again
        (:func:`mltask.store._pruned_against`; the store records which in the ban's own
        transaction, so a stop before the judging does not lose them).
        """
        reopened = self.store.ban(provider, reason, reopen=True)
        self._banned.add(provider)
        self._last_exclusion = f"{provider} banned: {reason}"
        if reopened:
            rows = self.store.trials()
            if self.schedule is not None:  # a waiting promotion may rest on a rung the ban voided
                self.schedule.waiting = {n: self._next_rung(n) for n in self.schedule.waiting}
            self._requeue_unsettled(rows, exclude=self._queued_numbers())
            self._rebuild_study(rows, rejudge=self.store.rejudge_pending())
            self._climb_if_none_complete()

    def _rejudge(self, rejudge: dict[int, tuple[int, float]], rows: list[TrialRow]) -> None:
        """Decide again whether each trial in ``rejudge`` (number -> its pruned rung and value) goes on.

        Optuna's pruner on the rebuilt study decides, the same rule as :meth:`RungSchedule.decide`
        on a fresh result, against the rung's results that stand; the trials were added to the
        study running, without their mark at that rung. In trial-number order, each judged
        with those judged before it (as ASHA judges arrivals in turn), so the outcome does
        not depend on timing. A trial promoted now waits for its next rung, and the store
        records the promotion, so a resumed task finds the same decisions.
        """
        assert self.schedule is not None
        promoted = []
        for number, (rung, value) in sorted(rejudge.items()):
            if self.schedule.decide(self.study, number, rung, value) == "promoted":
                promoted.append((number, rung))
            else:
                self._tell(number, value, rows[number].params, pruned=True)
        self.store.promote_again(promoted, rejudged=True)

    def _climb_if_none_complete(self) -> None:
        """Multi-fidelity: never finish without a trial evaluated at ``max_resource``; promote one if need be.

        Pruning, failures at the top rung and a tiny ``n_trials`` can leave every trial
        pruned or failed, so there would be no best to report, verify in full and refit. As
        in scikit-learn's halving search, whose last iteration always has candidates, the
        best trial of the highest rung any pruned trial reached is promoted (forced, not
        judged); where the pruner stops it again further up, this runs again and it (or
        another) climbs on, until a trial completes at the top or every trial has failed.
        The promotion is stored, so a resume agrees.
        """
        if self.schedule is None or self._aborted or self._progress.best_number is not None or not self._settled():
            return
        pruned = {r.number for r in self.store.trials() if r.state == "pruned"}
        sign = 1.0 if self.direction == "maximize" else -1.0
        stops = [(r["rung"], sign * r["value"], -r["number"]) for r in self.store.rungs()
                 if r["number"] in pruned and r["decision"] == "pruned"]
        if not stops:
            return
        rung, _, number = max(stops)
        self.store.promote_again([(-number, rung)])
        self._rebuild_study(self.store.trials())
        self.schedule.waiting[-number] = rung + 1

    def drop(self, provider: str, reason: str) -> None:
        """Stop using a provider that keeps failing, for this run.

        Unlike a ban its accepted work stands, and a resume gives it another chance: a
        machine that was failing may have been fixed (and a local worker is new anyway).
        """
        self._dropped[provider] = reason
        self.store.set_meta("dropped", json.dumps(self._dropped))
        self._last_exclusion = f"{provider} dropped: {reason}"

    def last_exclusion(self) -> str:
        """Why the last provider was banned or dropped, for the error when none is left."""
        return self._last_exclusion or "see results.json"

    def best_trial(self) -> TrialRow | None:
        """The stored row of the best trial so far."""
        number = self._progress.best_number
        return None if number is None else self.store.trial(number)

    def mark_verified(self, number: int, how: str = "full", subtask_id: str | None = None) -> None:
        """Record that trial ``number`` survived a check: re-run in 'full', 'spot' or 'cross'.

        With ``subtask_id`` only while the trial still holds that subtask's result (a ban may
        have reopened it since the check was planned). A weaker check never overwrites a
        stronger one.
        """
        self.store.set_verified(number, how, subtask_id)

    def revise(self, subtask_id: str, trial: TrialResult) -> None:
        """Put the requestor's own figures for a trial in place of the ones ``subtask_id`` reported.

        A claim passes a re-run when it agrees within the verification tolerance, not bit for
        bit; keeping the claim let fold scores nudged by 5e-10 win ties and be reported as the
        verified best with a value nobody computed. The study is rebuilt when the value changed.
        """
        row = self.store.trial(trial.number)
        assert trial.mean_score is not None
        if self.store.set_result(trial.number, subtask_id, trial.mean_score, trial.model_dump(mode="json")) and (
                row.value != trial.mean_score):
            self._rebuild_study(self.store.trials())

    def check_subtask(self, provider_id: str, trials: list[TrialSpec]) -> SubtaskDefinition:
        """A subtask that re-runs ``trials`` (usually some folds only) to check another provider.

        Numbered from the same sequence as search subtasks, so its id says nothing; it
        never touches the study.
        """
        self._sent += 1
        subtask = SubtaskDefinition(
            task_id=self.task_id, subtask_id=f"s{self._sent:06d}", problem=self.problem, trials=trials
        )
        self.store.add_subtask(subtask.subtask_id, self._sent, provider_id, 1, [t.number for t in trials], [],
                               purpose="check")
        return subtask

    def settle_check(self, subtask_id: str, state: str, reason: str | None = None,
                     seconds_out: float | None = None) -> None:
        """Close a check subtask: 'checked' (its answer was compared), 'rejected' or 'discarded'."""
        self.store.settle_subtask(subtask_id, state, reason=reason, seconds_out=seconds_out)

    def is_banned(self, provider: str) -> bool:
        """Whether ``provider`` was banned for wrong results or dropped for failing."""
        return provider in self._banned or provider in self._dropped

    def _queued_numbers(self) -> set[int]:
        queued = {t.number for b in self._requeued for t in b.trials} | {t.number for p in self._pending.values()
                                                                          for t in p.subtask.trials}
        return queued | set(self.schedule.waiting if self.schedule else ())

    def _requeue_unsettled(self, rows: list[TrialRow], exclude: set[int]) -> None:
        """Queue every trial the store has as running, grouped as it was last sent."""
        running = {r.number for r in rows if r.state == "running"} - exclude
        if not running:
            return
        last_batch: dict[int, tuple[int, tuple[int, ...]]] = {}
        promoted: set[int] = set()
        for sub in self.store.subtasks("search"):
            numbers = tuple(json.loads(sub["trial_numbers"]))
            for n in numbers:
                if n in running:
                    last_batch[n] = (sub["attempt"], numbers)
                    if sub["state"] == "accepted":
                        promoted.add(n)
                    else:
                        promoted.discard(n)
        if self.schedule is not None:
            # A running trial whose last subtask was accepted had been promoted and was waiting for
            # a provider: it waits again, so batches form as they would have without the stop.
            for n in promoted:
                self.schedule.waiting[n] = self._next_rung(n)
                del last_batch[n]
        for attempt, numbers in dict.fromkeys(last_batch.values()):
            # Each trial once, in the batch it was last sent in: a multi-fidelity trial was sent in
            # several (a rung each, in other company), and queued in each it would run a rung twice.
            # A running trial is sent again with the same parameters and seed, at the rung it is at.
            trials = [self._spec(rows[n], None if self.schedule is None else self._next_rung(n))
                      for n in numbers if last_batch.get(n) == (attempt, numbers)]
            self._requeued.append(_Batch(trials, attempt))

    def record_verdict(self, verdict: Any) -> None:
        self.store.add_verdict(verdict.subtask_id, verdict.provider, verdict.ok, verdict.kind, verdict.checked,
                               verdict.reason, verdict.seconds, by=verdict.by, check_id=verdict.check_id)

    def _rebuild_study(self, rows: list[Any], rejudge: dict[int, tuple[int, float]] | None = None) -> None:
        """The study as the store has it; multi-fidelity trials with their rung values and pruner marks.

        The pruned trials in ``rejudge`` (number -> the rung they were pruned at and their
        value there) are judged again once every trial is in (:meth:`_rejudge`).
        """
        rejudge = rejudge or {}
        space = self.definition.options.search_space
        distributions = space.distributions()
        study = self._new_study(self.study.sampler)
        progress = Progress(total=self.n_trials, started_at=self._progress.started_at,
                            resource_budget=self._progress.resource_budget)
        self.study, self._progress = study, progress
        climbed: dict[int, list[tuple[int, float]]] = {}
        for rung in self.store.rungs() if self.schedule is not None else ():
            progress.resource_used += self.schedule.resources[rung["rung"]]
            if rung["state"] == "complete":
                climbed.setdefault(rung["number"], []).append((rung["rung"], rung["value"]))
        states = {"complete": TrialState.COMPLETE, "failed": TrialState.FAIL, "pruned": TrialState.PRUNED}
        for row in rows:
            sampled = space.optuna_params(row.params)
            state = states.get(row.state, TrialState.RUNNING)
            climbs = climbed.get(row.number, [])
            if row.number in rejudge:  # running again until judged, without its mark at the rung it is judged at
                state, climbs = TrialState.RUNNING, [c for c in climbs if c[0] != rejudge[row.number][0]]
            intermediate, marks = self.schedule.restored(climbs) if self.schedule else ({}, {})
            study.add_trial(optuna.trial.create_trial(
                state=state, value=row.value if state in (TrialState.COMPLETE, TrialState.PRUNED) else None,
                params=sampled, distributions={k: distributions[k] for k in sampled},
                system_attrs=row.system_attrs | marks, intermediate_values=intermediate,
            ))
            if state != TrialState.RUNNING:
                self._count(row.number, row.value if state == TrialState.COMPLETE else None, row.params,
                            pruned=state == TrialState.PRUNED)
        if rejudge:
            self._rejudge(rejudge, rows)
        self._update_running()

    def _update_running(self) -> None:
        self._progress.running = sum(len(p.subtask.trials) for p in self._pending.values())

    def _tell(self, number: int, value: float | None, params: dict[str, Any], pruned: bool = False) -> None:
        if pruned:  # Optuna keeps the last reported rung value as a pruned trial's value
            self.study.tell(number, state=TrialState.PRUNED)
        elif value is None:
            self.study.tell(number, state=TrialState.FAIL)
        else:
            self.study.tell(number, value)
        self._count(number, value, params, pruned)

    def _count(self, number: int, value: float | None, params: dict[str, Any], pruned: bool = False) -> None:
        p = self._progress
        if pruned:  # stopped early: done, but its score was never measured at the full resource
            p.done += 1
            p.pruned += 1
            return
        if value is None:
            p.failed += 1
            return
        p.done += 1
        maximize = self.direction == "maximize"
        better = p.best_value is None or (value > p.best_value if maximize else value < p.best_value)
        if better:
            p.best_value, p.best_number, p.best_params = value, number, params

    # -- state ----------------------------------------------------------------------------

    def progress(self) -> Progress:
        return self._progress

    def pending_subtasks(self) -> list[str]:
        return list(self._pending)

    def finished(self) -> bool:
        return self._aborted or self._settled()

    def _settled(self) -> bool:
        """Every trial asked and settled: none out, queued again or waiting for its next rung."""
        waiting = self.schedule is not None and bool(self.schedule.waiting)
        return self._asked >= self.n_trials and not self._pending and not self._requeued and not waiting

    def abort_requested(self) -> bool:
        """Whether ``mltask tasks abort`` asked this task to stop (checked by the scheduler)."""
        return bool(self.store.meta_value("abort_requested"))

    def abort(self) -> None:
        """Stop handing out work; what is in flight is discarded, what is done is kept."""
        self._aborted = True
        self.discard(self.pending_subtasks())
        self.store.set_meta("aborted_at", json.dumps(time.time()))


_UPDATABLE = ("timeout", "subtask_timeout", "bid")


def compatible_update(stored: TaskDefinition, new: TaskDefinition, n_trials: int) -> tuple[TaskDefinition, int]:
    """The stored task with the changes a resume may make; anything else is refused.

    A resume may change the time limits, the bid, ``options.provider`` and ``options.golem``
    (a bigger budget, another image build), and raise
    ``n_trials`` (not for grid search, whose budget is its grid): what was already
    computed stays valid under those.
    Any other change would mix results of two different searches in one study.
    """
    old, upd = stored.model_dump(mode="json"), new.model_dump(mode="json")
    merged = dict(old, **{k: upd[k] for k in _UPDATABLE})
    new_trials = new.options.n_trials
    # Provider resources and the Golem market decide where trials run, never what they score.
    old_opts = dict(old["options"], n_trials=None, provider=None, golem=None)
    upd_opts = dict(upd["options"], n_trials=None, provider=None, golem=None)
    merged["options"] = dict(old["options"], provider=upd["options"]["provider"], golem=upd["options"]["golem"])
    for key in list(upd) + list(old):
        if key in _UPDATABLE:
            continue
        a, b = (old_opts, upd_opts) if key == "options" else (old.get(key), upd.get(key))
        if a != b:
            where = _first_difference(a, b, key)
            raise TaskError(
                where, "differs from the task being resumed; a resume may change only timeout, subtask_timeout, "
                "bid, options.provider, options.golem and a larger options.n_trials - start a new task (--output) "
                "for anything else"
            )
    if new_trials is not None and new_trials != n_trials:
        if stored.options.algorithm == "grid" or new_trials < n_trials:
            raise TaskError("options.n_trials", f"can only grow on resume, and not for grid search (is {n_trials})")
        merged["options"]["n_trials"] = new_trials
        n_trials = new_trials
    return TaskDefinition.model_validate(merged), n_trials


def _first_difference(a: Any, b: Any, path: str) -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{path}.{key}")
    return path
