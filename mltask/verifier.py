"""Verification: accept results at once, check samples of them later, elsewhere, unpredictably.

Providers may skip training and invent scores, inflate a score to win, lower or hide good
configurations (sabotage), or return garbage; they may have read this code. The schema and
:func:`mltask.protocol.check_answers` catch garbage. This module catches lies by having
samples of the work re-run, fold by fold, through the same
:class:`~mltask.problem.TrialEvaluator` a provider uses, and comparing each fold's score
(within tolerance) and its prediction fingerprint.

**Off the dispatch path.** :meth:`Verifier.settle` does only the cheap checks (versions,
score range) and accepts a well-formed result at once: the sampler learns from it and the
trials count as verified ``none``. It then asks :class:`~mltask.check_policy.CheckPolicy`
for a plan. Checks run later, beside the loop, and never block handing out or collecting:

- ``cross``: a *check subtask* (the trials with ``folds`` set; numbered like any subtask)
  goes to another provider, chosen uniformly at random among the non-banned ones, as an
  ordinary subtask through the same backend. Agreement marks the trials ``cross``. If the
  chosen provider is not idle within a patience (twice the typical time a subtask is out),
  any other idle one may take it; if none does for three patiences, or there is no other
  provider, the requestor runs it.
- claimed failures are checked the same way, the whole trial re-run by another provider:
  hiding a good configuration as a crash is the cheapest sabotage. A checker that confirms
  the failure settles it, unless the configuration's neighbours (from other providers)
  score in the top tenth, or with probability ``min(1, 5 / other providers)``: then the
  requestor re-runs it too (the checker may collude; see :meth:`Verifier._suspect_confirmation`).
- the **requestor as referee** (:mod:`mltask.referee`, a bounded process pool the loop
  polls): on any disagreement (who is wrong?), for failures an accomplice may have
  confirmed, and for the best trial, re-run in full before it is reported (the task is
  finished only when every search trial is settled, every planned check has resolved and
  the best has passed). Nothing else routine runs on the requestor: its work is per lie
  caught and per run, not per trial, so it does not grow with the network's throughput.
- before the referee blames anyone it re-runs a second time: if its own two runs differ,
  the training is not deterministic given its seed and no provider can be judged; the task
  stops with a :class:`~mltask.errors.TaskError` saying so, and nobody is banned.

A failed check bans the provider and reopens everything it reported (``task.ban``); a
checker that contradicts an honest result is banned the same way.

**Unpredictable.** Every choice (which subtasks, which trials and folds, which checker) is
drawn from ``secrets.SystemRandom()``, never from the task seed. Trial seeds and CV splits
are still derived from the task seed, so the same task file gives the same scores in
separate runs (users expect it; the resume and chaos tests rely on it). That is safe
because no check decision depends on anything a provider sees: a provider that recovers
the task seed from its trial seeds, or reads it as the default CV seed, can compute the
trials, but learns nothing about which of its results will be checked; replaying the
verifier needs the OS generator's state. A check subtask tells its checker it is checking,
but the checked provider has already answered by then.

Determinism (seeded splits, per-trial seeds, one BLAS thread) makes an honest re-run
reproduce the provider's numbers bit for bit on the same versions, so the default
tolerance is tight and honest results are never rejected.
"""

from __future__ import annotations

import json
import math
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from statistics import median
from typing import TYPE_CHECKING, Any

from mltask.check_policy import CheckPolicy, Unit
from mltask.errors import TaskError
from mltask.protocol import (
    MissingResult,
    ResultError,
    SubtaskDefinition,
    SubtaskResult,
    TrialResult,
    TrialSpec,
    canonical_trial,
    problem_folds,
    read_result,
)
from mltask.provider import environment
from mltask.referee import Referee, RefereePool

if TYPE_CHECKING:
    from mltask.backends.base import Completion
    from mltask.store import TrialRow
    from mltask.task import HyperparameterSearchTask

REQUESTOR = "requestor"
CROSS_KINDS = ("spot", "failure")  # checks sent to other providers; "best" is the requestor's own
EXCHANGEABLE = ("random", "qmc", "grid")  # samplers whose proposals do not depend on who reports what
_SAMPLED = ("spot", "contender")  # kinds of check that sample a provider's work (and build its trust)
_CROSS_ATTEMPTS = 2  # check subtasks lost to faults before the requestor runs the check
# A confirmed failure is re-run by the requestor with probability min(1, this / other providers): at
# most that many of the others could be the claimer's accomplice (see Verifier._suspect_confirmation)
_CONFIRMED_REFEREE = 5.0

# Scores a scorer can produce; a claim outside is a lie without re-running anything.
_UNIT_INTERVAL = ("accuracy", "balanced_accuracy", "f1", "precision", "recall", "roc_auc", "jaccard",
                  "average_precision", "top_k_accuracy")


def score_range(scoring: str | None) -> tuple[float, float]:
    """Closed range of a scikit-learn scorer's values (unbounded where unknown)."""
    if scoring is None:
        return -math.inf, math.inf
    if scoring.startswith("neg_"):
        return -math.inf, 0.0
    if scoring in ("r2", "explained_variance", "d2_absolute_error_score"):
        return -math.inf, 1.0
    if scoring.startswith(_UNIT_INTERVAL):
        return 0.0, 1.0
    return -math.inf, math.inf



def read_answer(completion: Completion, subtask: SubtaskDefinition) -> SubtaskResult:
    """The result a completion carries: :class:`MissingResult` for a fault (crash, timeout, no
    output), :class:`ResultError` for an answer that breaks the protocol or its bounds (a lie)."""
    if completion.refused is not None:
        raise ResultError(completion.refused)
    if completion.error or completion.output_dir is None:
        raise MissingResult(completion.error or "no output")
    return read_result(completion.output_dir, subtask)

@dataclass
class Verdict:
    """One check that ran (or a structural finding), and whether it held."""

    subtask_id: str
    provider: str
    ok: bool
    # "structure", "version", "spot", "contender", "failure", "best", "cancelled" (re-runs a ban made
    # moot) or "rescue" (the requestor's run of trials before they are given up after faults)
    kind: str
    checked: list[Unit] = field(default_factory=list)
    reason: str | None = None
    seconds: float = 0.0
    by: str = REQUESTOR  # where it ran: a provider's name or the requestor
    check_id: int | None = None


@dataclass
class _Check:
    """A planned check of one accepted subtask, until it resolves."""

    id: int
    subtask_id: str
    provider: str
    kind: str  # "spot", "contender", "failure" or "best"
    units: list[Unit]
    specs: dict[int, TrialSpec]
    claims: dict[int, TrialResult]
    estimate: float
    planned_at: float
    assignee: str | None = None
    out: str | None = None  # the check subtask's id while a provider runs it
    checker: str | None = None
    answer: dict[int, TrialResult] | None = None  # the checker's
    answered_in: str | None = None  # the check subtask that brought the answer
    attempts: int = 0
    referee: list[dict[int, TrialResult]] = field(default_factory=list)  # the requestor's runs
    referee_seconds: float = 0.0
    awaiting: set[int] = field(default_factory=set)  # trial numbers the referee is re-running

    def trials(self) -> list[TrialSpec]:
        """The units as trials: each with its folds (``None``: every fold)."""
        folds: dict[int, list[int] | None] = {}
        for number, fold in self.units:
            if fold is None or folds.get(number, []) is None:
                folds[number] = None
            else:
                folds.setdefault(number, []).append(fold)
        return [self.specs[n].model_copy(update={"folds": None if f is None else sorted(f)}) for n, f in folds.items()]


@dataclass
class _Rescue:
    """The requestor's run of a subtask's trials before they are given up after faults."""

    provider: str  # whose fault made it the last attempt
    reason: str
    awaiting: set[int]
    results: dict[int, TrialResult] = field(default_factory=dict)
    seconds: float = 0.0


class Verifier:
    """Decides what to check, has it checked elsewhere, compares, and bans liars."""

    def __init__(self, task: HyperparameterSearchTask, referee: Referee | None = None, *,
                 clock: Any = time.monotonic) -> None:
        opts = task.definition.options
        self.task = task
        self.options = opts.verification
        self.clock = clock
        self.rng = secrets.SystemRandom()
        self.folds = problem_folds(task.problem)
        self.policy = CheckPolicy(
            budget=self.options.budget, direction=task.direction, space=opts.search_space, folds=self.folds,
            exchangeable=opts.algorithm in EXCHANGEABLE, protect_best=self.options.verify_best, rng=self.rng,
        )
        self.referee = referee or RefereePool(task.problem, task.resources_dir, self.options.referee_workers,
                                              float(task.definition.subtask_timeout_seconds))
        self._low, self._high = score_range(task.problem.scoring)
        self._checks: dict[int, _Check] = {}
        self._cancelled: dict[int, _Check] = {}  # cancelled by a ban, with re-runs still out on the referee
        self._out: dict[str, _Check] = {}  # check subtask id -> check
        self._providers: set[str] = set()
        self._seen: list[str] = []  # the same, in a list to draw checkers from
        self._durations: list[float] = []  # recent search subtasks' time out, for the patience
        self._best: int | None = None  # check id of the pending best re-run
        # (subtask, trial) -> folds the requestor re-ran and found as claimed: the best's full
        # re-run skips them (cross checks do not count: the checker may collude)
        self._rerun: dict[tuple[str, int], set[int]] = {}
        self._rescues: dict[str, _Rescue] = {}  # subtask id -> the requestor's run before giving it up
        self._dodged: dict[str, int] = {}  # check subtasks each provider failed to answer, in a row
        self._resume()

    # -- the scheduler's interface --------------------------------------------------------

    def saw(self, provider: str) -> None:
        """A provider the backend offers (idle now); checks may be sent to it."""
        if provider not in self._providers:
            self._providers.add(provider)
            self._seen.append(provider)

    def owns(self, subtask_id: str) -> bool:
        """Whether ``subtask_id`` is a check subtask (its completion goes to :meth:`collect`)."""
        return subtask_id in self._out

    def busy(self) -> bool:
        """Whether any planned check has not resolved yet."""
        return bool(self._checks)

    def hand_checks(self, idle: list[str]) -> dict[str, SubtaskDefinition]:
        """Check subtasks for some of the ``idle`` providers, in one pass over the waiting checks.

        A check goes to its chosen checker when that one is idle, or, once it has waited past
        the patience, to any idle provider but the checked one. One pass per round of the loop,
        not one per idle provider: at 5,000 providers, offering every check to every idle
        provider took 95% of the requestor's time (bench/scale.py).
        """
        now = self.clock()
        patience = self._patience()
        free = dict.fromkeys(idle)  # an ordered set: the scheduler's order of preference
        handed: dict[str, SubtaskDefinition] = {}
        for check in self._checks.values():
            if not free:
                break
            # a check lost twice is the requestor's (re-picking let a checker that never answers stall the task)
            if (check.out is not None or check.awaiting or check.kind not in CROSS_KINDS
                    or check.attempts >= _CROSS_ATTEMPTS):
                continue
            if check.assignee is None or self.task.is_banned(check.assignee):
                check.assignee = self._pick_checker(check)
            if check.assignee is None:
                continue
            if check.assignee in free:
                provider: str | None = check.assignee
            elif now - check.planned_at > patience:
                provider = next((p for p in free if p != check.provider), None)
            else:
                provider = None
            if provider is None:
                continue
            del free[provider]
            subtask = self.task.check_subtask(provider, check.trials())
            check.out, check.checker = subtask.subtask_id, provider
            self._out[subtask.subtask_id] = check
            handed[provider] = subtask
        return handed

    def poll(self, timeout: float = 0.0, spare_cores: int = 0) -> None:
        """Collect the referee's re-runs (waiting up to ``timeout`` s); start the checks it owes.

        ``spare_cores``: cores of this machine the backend's providers leave idle
        (:meth:`~mltask.backends.base.Backend.spare_cores`), lent to the referee meanwhile.
        """
        self.referee.lend(spare_cores)
        now = self.clock()
        patience = self._patience()
        for check in list(self._checks.values()):
            if check.awaiting or check.out is not None:
                continue
            lost = check.attempts >= _CROSS_ATTEMPTS
            if check.kind in CROSS_KINDS and check.assignee is None and not lost:
                check.assignee = self._pick_checker(check)
            waited = now - check.planned_at
            if (check.kind not in CROSS_KINDS or lost or waited > 3 * patience
                    or (check.assignee is None and waited > patience)):
                self._to_referee(check)
        for (check_id, number), result, seconds in self.referee.poll(timeout):
            if isinstance(check_id, str):  # a subtask about to be given up: see _rescue
                self.policy.charge(seconds, 0.0, 0)
                self._rescued(check_id, number, result, seconds)
                continue
            check = self._checks.get(check_id)
            if check is None:  # cancelled meanwhile: the compute was still spent, and is counted
                self.policy.charge(seconds, 0.0, 0)
                self._spent_on_cancelled(self._cancelled[check_id], number, seconds)
                continue
            check.referee_seconds += seconds
            self.policy.charge(seconds, check.estimate, 0)
            check.estimate = 0.0
            self._referee_answer(check, number, result)

    def close(self) -> None:
        self.referee.close()

    # -- settling a search subtask --------------------------------------------------------

    def settle(self, completion: Completion, seconds_out: float) -> None:
        """Accept a subtask's result at once if it is awaited and well-formed, and plan its checks."""
        task = self.task
        subtask_id, provider = completion.subtask.subtask_id, completion.provider
        subtask = task.pending(subtask_id)
        if subtask is None:
            return  # a late answer to a subtask already settled: never counted twice
        self.saw(provider)
        if task.is_banned(provider):
            task.reject(subtask_id, f"{provider} is banned")
            return
        try:
            result = read_answer(completion, subtask)
        except MissingResult as exc:
            task.store.set_seconds_out(subtask_id, seconds_out)
            if task.gives_up(subtask_id):
                self._rescue(subtask, provider, f"{provider}: {exc}")
            else:
                task.reject(subtask_id, f"{provider}: {exc}", fault=True)
            return
        except ResultError as exc:  # an honest provider always writes our schema
            verdict = Verdict(subtask_id, provider, ok=False, kind="structure", reason=str(exc))
        else:
            verdict = self.inspect(subtask_id, result, provider)
        if not verdict.ok:
            task.record_verdict(verdict)
            task.store.set_seconds_out(subtask_id, seconds_out)
            task.reject(subtask_id, f"{provider}: {verdict.reason}")
            self._distrust(verdict)
            return
        task.accept(result, seconds_out=seconds_out)
        self._durations = ([*self._durations, seconds_out])[-50:]
        for plan in self.policy.plan(provider, result.trials, seconds_out):
            self._plan(subtask, result, provider, plan.kind, plan.units)

    def inspect(self, subtask_id: str, result: SubtaskResult, provider: str) -> Verdict:
        """The synchronous checks: comparable versions, every score within the scorer's range."""
        verdict = Verdict(subtask_id, provider, ok=True, kind="none", by=provider)
        mismatch = environment().mismatch(result.environment)
        if mismatch:  # bit-for-bit comparison needs the same versions; not a lie, but unusable
            verdict.ok, verdict.kind = False, "version"
            verdict.reason = (f"provider runs {mismatch}: its scores cannot be compared with a re-run; "
                              "rebuild the provider image with `mltask image build`")
            return verdict
        for trial in result.trials:
            for what, (low, high), scores in self._ranged(trial):
                if not all(low <= s <= high for s in scores):
                    verdict.ok, verdict.kind = False, "structure"
                    verdict.reason = f"trial {trial.number}: a fold {what}score lies outside [{low}, {high}]"
                    return verdict
        return verdict

    def _ranged(self, trial: TrialResult) -> Iterator[tuple[str, tuple[float, float], list[float]]]:
        """Each list of scores an ok trial reports with its scorer's range: every metric's, not only the
        searched one's (an f1 of 7.0 stayed in the results unless a sampled check landed on it)."""
        if trial.status != "ok":
            return
        problem = self.task.problem
        yield "", (self._low, self._high), trial.fold_scores
        for label, lists in (("{} ", trial.metric_scores), ("train {} ", trial.train_scores)):
            for name, scores in lists.items():
                yield label.format(name), score_range(problem.metrics.get(name, problem.scoring)), scores

    # -- the best trial -------------------------------------------------------------------

    def best_verified(self) -> bool:
        """Whether the best trial has passed a full re-run; starts that re-run if not."""
        row = self.task.best_trial()
        if row is None or row.verified == "full" or not self.options.verify_best:
            return True
        if self._best is None or self._best not in self._checks:
            assert row.subtask_id is not None
            done = self._rerun.get((row.subtask_id, row.number), set())
            units: list[Unit] = [(row.number, f) for f in range(self.folds) if f not in done] if done else [
                (row.number, None)]
            self._best = self._plan_row(row, "best", units).id
        return False

    # -- internals ------------------------------------------------------------------------

    def _rescue(self, subtask: SubtaskDefinition, provider: str, reason: str) -> None:
        """Before trials are given up after faults, the requestor runs them (within subtask_timeout).

        Providers as many as ``max_attempts``, colluding, could otherwise hide the best
        configuration by never answering a subtask holding it: a fault is no evidence of a lie,
        and "gave up" was re-run by no one.
        """
        self._rescues[subtask.subtask_id] = _Rescue(provider, reason, {t.number for t in subtask.trials})
        for trial in subtask.trials:
            self.referee.submit((subtask.subtask_id, trial.number), trial)

    def _rescued(self, subtask_id: str, number: int, result: TrialResult, seconds: float) -> None:
        rescue = self._rescues[subtask_id]
        rescue.awaiting.discard(number)
        rescue.results[number], rescue.seconds = result, rescue.seconds + seconds
        if rescue.awaiting:
            return
        del self._rescues[subtask_id]
        subtask = self.task.pending(subtask_id)
        assert subtask is not None
        # stored like any re-run of the requestor's, whatever came of it: compute is compute
        self.task.record_verdict(Verdict(
            subtask_id, rescue.provider, ok=True, kind="rescue", checked=[(t.number, None) for t in subtask.trials],
            reason=f"run on the requestor before giving up after faults, last: {rescue.reason}",
            seconds=rescue.seconds))
        if not any(r.status == "ok" for r in rescue.results.values()):  # it fails here too: the configuration's
            self.task.reject(subtask_id, rescue.reason, fault=True)
            return
        trials = [canonical_trial(rescue.results[t.number]) for t in subtask.trials]
        self.task.rescue(SubtaskResult(task_id=subtask.task_id, subtask_id=subtask_id, environment=environment(),
                                       trials=trials, compute_time=rescue.seconds), rescue.reason)

    def _plan(self, subtask: SubtaskDefinition, result: SubtaskResult, provider: str, kind: str,
              units: list[Unit]) -> _Check:
        numbers = {n for n, _ in units}
        specs = {t.number: t for t in subtask.trials if t.number in numbers}
        claims = {t.number: t for t in result.trials if t.number in numbers}
        return self._add(subtask.subtask_id, provider, kind, units, specs, claims)

    def _plan_row(self, row: TrialRow, kind: str, units: list[Unit]) -> _Check:
        assert row.result is not None and row.subtask_id is not None and row.provider is not None
        spec = self.task.trial_spec(row)  # at the resource the claim was computed with (multi-fidelity)
        claim = TrialResult.model_validate(row.result)
        return self._add(row.subtask_id, row.provider, kind, units, {row.number: spec}, {row.number: claim})

    def _add(self, subtask_id: str, provider: str, kind: str, units: list[Unit], specs: dict[int, TrialSpec],
             claims: dict[int, TrialResult], check_id: int | None = None) -> _Check:
        if check_id is None:
            check_id = self.task.store.add_check(subtask_id, provider, kind, units)
        estimate = 0.0 if kind == "best" else self.policy.estimate(units)  # the policy committed the others
        check = _Check(check_id, subtask_id, provider, kind, units, specs, claims, estimate, self.clock())
        if kind in CROSS_KINDS:
            check.assignee = self._pick_checker(check)
        self._checks[check_id] = check
        return check

    def _resume(self) -> None:
        """Checks planned before a stop are planned again; providers' trust is rebuilt."""
        store = self.task.store
        for verdict in store.verdicts():
            if verdict["ok"] and verdict["kind"] in _SAMPLED:
                self.policy.passed(verdict["provider"])
            if verdict["ok"] and verdict["by"] == REQUESTOR:  # the best's re-run skips these folds again
                for number, folds in _folds([tuple(u) for u in json.loads(verdict["checked"])], self.folds).items():
                    self._rerun.setdefault((verdict["subtask_id"], number), set()).update(folds)
        for planned in store.checks("planned"):
            units = planned["units"]
            claimed = self.task.claims({n for n, _ in units}, planned["subtask_id"])
            if claimed is None:
                store.resolve_check(planned["id"], "cancelled")  # reopened since: nothing left to check
                continue
            if planned["kind"] in _SAMPLED:  # its provider's warm-up check is planned
                self.policy.provider(planned["provider"]).checked = True
            specs, claims = claimed
            check = self._add(planned["subtask_id"], planned["provider"], planned["kind"], units, specs, claims,
                              planned["id"])
            if check.kind == "best":  # not planned a second time (it may have started before the search's end)
                self._best = check.id

    def _pick_checker(self, check: _Check) -> str | None:
        for _ in range(8 if self._seen else 0):  # a few uniform draws find one, without listing thousands
            pick = self.rng.choice(self._seen)
            if pick != check.provider and not self.task.is_banned(pick):
                return pick
        eligible = [p for p in self._seen if p != check.provider and not self.task.is_banned(p)]
        return self.rng.choice(eligible) if eligible else None

    def _patience(self) -> float:
        """How long a check waits for its chosen checker: twice a typical subtask's time out."""
        typical = median(self._durations) if self._durations else 1.0
        return min(float(self.task.definition.subtask_timeout_seconds), max(1.0, 2 * typical))

    def collect(self, completion: Completion, seconds_out: float) -> None:
        """A check subtask came back: compare it with the claim, or hand the check on."""
        subtask_id, checker = completion.subtask.subtask_id, completion.provider
        check = self._out.pop(subtask_id)
        check.out = None
        if check.id not in self._checks:  # cancelled meanwhile (its provider was banned)
            self.task.settle_check(subtask_id, "discarded", "the checked provider was banned", seconds_out)
            self.policy.charge(seconds_out, 0.0, 0)
            return
        # what a claimed failure costs to re-run (it may stop at its first fold) says nothing about a unit's
        units = sum(self.folds if f is None else 1 for _, f in check.units) if check.kind == "spot" else 0
        self.policy.charge(seconds_out, check.estimate, units)
        check.estimate = 0.0
        if self.task.is_banned(checker):
            return self._retry(check, subtask_id, f"{checker} is banned", seconds_out)
        try:
            answer = read_answer(completion, completion.subtask)
        except MissingResult as exc:
            self._dodge(checker, str(exc))
            return self._retry(check, subtask_id, f"{checker}: {exc}", seconds_out)
        except ResultError as exc:
            verdict = Verdict(subtask_id, checker, ok=False, kind="structure", reason=str(exc), by=checker)
        else:
            verdict = self.inspect(subtask_id, answer, checker)
        if not verdict.ok:
            self.task.record_verdict(verdict)
            self.task.settle_check(subtask_id, "rejected", f"{checker}: {verdict.reason}", seconds_out)
            self._distrust(verdict)
            check.assignee, check.planned_at = None, self.clock()
            return None
        self.task.settle_check(subtask_id, "checked", None, seconds_out)
        self._dodged.pop(checker, None)
        check.answer, check.checker, check.answered_in = {t.number: t for t in answer.trials}, checker, subtask_id
        if self._disagreement(check, check.answer) is not None:  # who is wrong? The requestor decides
            self._to_referee(check)
        elif check.kind == "failure" and self._suspect_confirmation(check):  # it may hide a good one
            self._record(check, ok=True, by=checker, seconds=seconds_out)
            self._to_referee(check)
        else:
            self._record(check, ok=True, by=checker, seconds=seconds_out)
            self._pass(check, "cross")
        return None

    def _suspect_confirmation(self, check: _Check) -> bool:
        """Whether the requestor re-runs a failure a checker confirmed: the checker may be an accomplice.

        Always where the configuration sits among good trials of third parties (a hidden
        contender); otherwise with probability ``min(1, 5 / other providers)``. A random
        checker is one of ``a`` accomplices with probability ``a / others``, so a hidden
        configuration survives with probability at most ``a / others * (1 - 5 / others)``:
        nil with six providers or fewer, and falling with the network as fast as the
        requestor's share of the work must (its re-runs stay flat per provider).
        """
        assert check.checker is not None
        others = len(self._providers) - 1
        if self.rng.random() < min(1.0, _CONFIRMED_REFEREE / max(1, others)):
            return True
        return any(self.policy.promising(spec.params, (check.provider, check.checker))
                   for spec in check.specs.values())

    def _dodge(self, checker: str, reason: str) -> None:
        """Count a check subtask ``checker`` did not answer; drop it after ``max_provider_failures`` in a row.

        A fault, not a lie: a drop, its own work kept. Not counted like a search subtask's fault
        (only once others have done its trials): a check re-runs trials a provider has just run
        within the subtask timeout, so an honest machine answers it. Not counting them made
        dodging free: a provider that answered no check was sent every check it could get.
        """
        dodged = self._dodged[checker] = self._dodged.get(checker, 0) + 1
        if dodged >= self.task.max_provider_failures and not self.task.is_banned(checker):
            self.task.drop(checker, f"answered none of {dodged} checks in a row, last: {reason}")

    def _retry(self, check: _Check, subtask_id: str, reason: str, seconds_out: float) -> None:
        """The checker failed to answer (a fault): another provider, or after a few, the requestor."""
        self.task.settle_check(subtask_id, "rejected", reason, seconds_out)
        check.attempts += 1
        check.assignee = None if check.attempts >= _CROSS_ATTEMPTS else self._pick_checker(check)
        check.planned_at = self.clock()

    def _to_referee(self, check: _Check) -> None:
        """Have the requestor re-run the check's units (once more if it already did)."""
        for trial in check.trials():
            check.awaiting.add(trial.number)
            self.referee.submit((check.id, trial.number), trial)

    def _referee_answer(self, check: _Check, number: int, result: TrialResult) -> None:
        check.awaiting.discard(number)
        if not check.referee or number in check.referee[-1]:
            check.referee.append({})
        check.referee[-1][number] = result
        if check.awaiting:
            return
        run = check.referee[-1]
        claim_wrong = self._disagreement(check, run)
        checker_wrong = None if check.answer is None else self._differs(check, check.answer, run)
        if (claim_wrong or checker_wrong) and len(check.referee) == 1:
            return self._to_referee(check)  # before blaming anyone, make sure our own run is reproducible
        if len(check.referee) == 2:
            unstable = self._differs(check, check.referee[0], run)
            if unstable is not None:
                self._not_deterministic(unstable)
        seconds, check.referee_seconds = check.referee_seconds, 0.0
        if checker_wrong and check.checker is not None and check.answered_in is not None:
            self.task.record_verdict(Verdict(check.answered_in, check.checker, ok=False, kind=check.kind,
                                             checked=list(check.units), reason=checker_wrong, check_id=check.id))
            self._ban(check.checker, f"check of {check.subtask_id}: {checker_wrong}")
        self._record(check, ok=claim_wrong is None, by=REQUESTOR, seconds=seconds, reason=claim_wrong)
        if claim_wrong:
            self.task.store.resolve_check(check.id, "failed")
            self._ban(check.provider, claim_wrong)
        else:
            self._adopt(check, run)
            self._pass(check, "spot", by_requestor=True)
        return None

    def _not_deterministic(self, difference: str) -> None:
        problem = self.task.problem
        field_, what, fix = (
            ("options.script", "this script", "seed every random source from the `seed` argument")
            if problem.script is not None else
            ("options.estimator", "this estimator", "give it a `random_state` (mltask fills it with the trial seed) "
             "or make it deterministic")
        )
        raise TaskError(field_, f"{what} is not deterministic given `seed` ({difference}); {fix}")

    def _adopt(self, check: _Check, run: dict[int, TrialResult]) -> None:
        """The requestor's own figures replace the claim's on every fold it re-ran and found as claimed.

        A claim only has to agree within the tolerance (kept for honest machines whose floating
        point differs in the last bits); what is reported of a trial the requestor re-ran in
        full is then all its own, so a lie below the tolerance cannot decide the outcome.
        """
        for trial in check.trials():
            own = run[trial.number]
            row = self.task.store.trial(trial.number)
            if own.status != "ok" or row.subtask_id != check.subtask_id or row.result is None:
                continue
            said = TrialResult.model_validate(row.result)
            self.task.revise(check.subtask_id, canonical_trial(said.model_copy(update={
                "fold_scores": _put(said.fold_scores, own.fold_scores, trial.folds),
                "metric_scores": {k: _put(v, own.metric_scores.get(k, []), trial.folds)
                                  for k, v in said.metric_scores.items()},
                "train_scores": {k: _put(v, own.train_scores.get(k, []), trial.folds)
                                 for k, v in said.train_scores.items()},
            })))

    def _pass(self, check: _Check, how: str, by_requestor: bool = False) -> None:
        """The check agreed; a trial whose every fold the requestor has re-run is verified 'full'."""
        self.task.store.resolve_check(check.id, "passed")
        del self._checks[check.id]
        if check.kind in _SAMPLED:
            self.policy.passed(check.provider)
        for number, folds in _folds(check.units, self.folds).items():
            if not by_requestor:
                self.task.mark_verified(number, how, check.subtask_id)
                continue
            done = self._rerun.setdefault((check.subtask_id, number), set())
            done |= folds
            self.task.mark_verified(number, "full" if len(done) == self.folds else how, check.subtask_id)

    def _record(self, check: _Check, *, ok: bool, by: str, seconds: float, reason: str | None = None) -> None:
        """The verdict on the checked provider's claim, from the run ``by`` a checker or the requestor."""
        self.task.record_verdict(Verdict(check.subtask_id, check.provider, ok=ok, kind=check.kind,
                                         checked=list(check.units), reason=reason, seconds=seconds, by=by,
                                         check_id=check.id))

    def _distrust(self, verdict: Verdict) -> None:
        """Act on a broken answer: an outdated image is not a cheat (dropped, its work kept); anything else bans."""
        if verdict.kind == "version":
            self.task.drop(verdict.provider, verdict.reason or "other versions")
        else:
            self._ban(verdict.provider, verdict.reason or "wrong result")

    def _ban(self, provider: str, reason: str) -> None:
        """Ban ``provider``; its checks are moot (its work is reopened), checks it holds go elsewhere."""
        if provider in self.task.store.bans():
            return
        self.task.ban(provider, reason)
        self.policy.forget(provider)
        for check_id, check in list(self._checks.items()):
            if check.provider == provider:
                self.policy.charge(0.0, check.estimate, 0)
                dropped = self.referee.cancel([(check_id, number) for number in check.awaiting])  # a liar costs no more
                check.awaiting -= {number for _, number in dropped}
                del self._checks[check_id]
                if check.awaiting:
                    self._cancelled[check_id] = check
                elif check.referee_seconds:
                    self._record_cancelled(check)
            elif check.assignee == provider:
                check.assignee = self._pick_checker(check)

    def _spent_on_cancelled(self, check: _Check, number: int, seconds: float) -> None:
        check.awaiting.discard(number)
        check.referee_seconds += seconds
        if not check.awaiting:
            del self._cancelled[check.id]
            self._record_cancelled(check)

    def _record_cancelled(self, check: _Check) -> None:
        """Store what the requestor spent on a check its provider's ban made moot: compute is compute."""
        self.task.record_verdict(Verdict(
            check.subtask_id, check.provider, ok=True, kind="cancelled", checked=list(check.units),
            reason=f"{check.kind} check cancelled: {check.provider} was banned before it resolved",
            seconds=check.referee_seconds, check_id=check.id))
        check.referee_seconds = 0.0

    def _disagreement(self, check: _Check, other: dict[int, TrialResult]) -> str | None:
        """How the claims differ from ``other`` on the check's units (``None``: they agree)."""
        return self._differs(check, check.claims, other)

    def _differs(self, check: _Check, claims: dict[int, TrialResult], other: dict[int, TrialResult]) -> str | None:
        for trial in check.trials():
            mismatch = self._mismatch(claims[trial.number], other[trial.number], trial.folds)
            if mismatch:
                return f"trial {trial.number} {mismatch}"
        return None

    def _mismatch(self, claim: TrialResult, other: TrialResult, folds: list[int] | None) -> str | None:
        """Where ``claim`` (all its folds, or only ``folds``) and ``other`` (only those) differ: any
        metric's score (with several scorers, each one; training scores too), or the predictions."""
        if claim.status != other.status:
            return f"is {claim.status} in one run and {other.status} in the other ({other.error or claim.error})"
        if claim.status == "failed":
            return None
        indices = list(folds if folds is not None else range(len(claim.fold_scores)))
        for what, said, got in _score_lists(claim, other):
            said = said if len(said) == len(indices) else [said[i] for i in indices if i < len(said)]
            if len(said) != len(got):
                return f"reports {what}scores for {len(said)} folds, the other run for {len(got)}"
            for index, a, b in zip(indices, said, got, strict=True):
                if not math.isclose(a, b, rel_tol=self.options.rel_tolerance, abs_tol=self.options.abs_tolerance):
                    return f"fold {index} {what}gave {a!r} then {b!r}"
        prints = (claim.fold_fingerprints if len(claim.fold_fingerprints) == len(indices)
                  else [claim.fold_fingerprints[i] for i in indices])
        for index, a, b in zip(indices, prints, other.fold_fingerprints, strict=True):
            if a != b:
                return f"fold {index} predictions differ (fingerprint mismatch)"
        return None


def _score_lists(claim: TrialResult, other: TrialResult) -> Iterator[tuple[str, list[float], list[float]]]:
    """Each list of fold scores a trial reports, with its label: the search's own, then every metric's
    and every training score's (a provider must not fake a metric the search does not optimise)."""
    yield "", claim.fold_scores, other.fold_scores
    for kind, label in (("metric_scores", "{} "), ("train_scores", "train {} ")):
        mine, theirs = getattr(claim, kind), getattr(other, kind)
        for name in sorted(set(mine) | set(theirs)):
            yield label.format(name), mine.get(name, []), theirs.get(name, [])


def _put(said: list[float], own: list[float], folds: list[int] | None) -> list[float]:
    """``said`` with the scores at ``folds`` (``None``: all of them) replaced by ``own``, which has one per fold."""
    out = list(said)
    for index, score in zip(range(len(said)) if folds is None else folds, own, strict=True):
        out[index] = score
    return out


def _folds(units: list[Unit], folds: int) -> dict[int, set[int]]:
    """The folds each trial's units cover (``None``: all ``folds`` of them)."""
    covered: dict[int, set[int]] = {}
    for number, fold in units:
        covered.setdefault(number, set()).update(range(folds) if fold is None else (fold,))
    return covered
