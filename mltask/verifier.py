"""Verification: re-run samples of untrusted results on the requestor and compare.

Providers may skip training and invent scores, inflate a score to win, or return garbage.
The schema and :func:`mltask.protocol.check_answers` catch garbage; this module catches
lies, by re-running work through the same :class:`~mltask.problem.TrialEvaluator` a
provider uses, on the requestor (trusted), and comparing fold by fold:

- *best check*: a faked high score is the attack that changes the outcome, so it is never
  left to sampling. A trial that would become the new best gets one random fold re-run
  at once (a blatant fake is caught before the sampler learns from it), and the best
  trial is re-run in full (:meth:`Verifier.check_best`: every fold score within
  tolerance, every fold's prediction fingerprint equal) before it is reported; if that
  fails the provider is banned and the search goes on without its results.
- *spot check*: each provider's first subtask, then a ``sample_rate`` fraction of the rest,
  get ``checks_per_subtask`` random (trial, fold) evaluations re-run. A fold costs
  1/(trials x folds) of its subtask, which is what makes checking most subtasks cheap.
- a trial the provider says failed must fail on the re-run too.

Re-running every new best in full as it arrives cost 10-17% of provider compute on the
templates (a search improves its best several times); one fold at once plus one full
re-run at the end gives the same guarantee for the reported best at about a third.

Determinism (seeded splits, per-trial seeds, one BLAS thread) makes an honest re-run
reproduce the provider's numbers bit for bit on the same versions, so the default
tolerance is tight and honest results are never rejected.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from mltask.definition import VerificationOptions
from mltask.protocol import Problem, SubtaskDefinition, SubtaskResult, TrialResult, TrialSpec, subtask_folds
from mltask.provider import check_resources, environment, evaluator_for, one_thread

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


@dataclass
class Verdict:
    """What was compared for one subtask, and whether it held."""

    subtask_id: str
    provider: str
    ok: bool
    kind: str  # "structure", "version", "best", "spot" or "none"
    checked: list[tuple[int, int | None]] = field(default_factory=list)  # (trial, fold or None = all)
    reason: str | None = None
    seconds: float = 0.0

    @property
    def fully_verified(self) -> set[int]:
        return {trial for trial, fold in self.checked if fold is None}

    @property
    def spot_verified(self) -> set[int]:
        return {trial for trial, _ in self.checked}


class Verifier:
    """Decides what to re-run, re-runs it on the requestor, and compares."""

    def __init__(self, problem: Problem, resources_dir: Path, options: VerificationOptions, seed: int,
                 direction: str) -> None:
        self.problem = problem
        self.resources_dir = resources_dir
        self.options = options
        self.direction = direction
        self._rng = random.Random(seed)
        self._low, self._high = score_range(problem.scoring)
        self.seen_providers: set[str] = set()
        self.rerun_seconds = 0.0

    def check(self, subtask: SubtaskDefinition, result: SubtaskResult, provider: str,
              best: float | None) -> Verdict:
        """Verify ``result`` (already schema- and answer-checked) against re-runs."""
        verdict = Verdict(subtask.subtask_id, provider, ok=True, kind="none")
        mismatch = environment().mismatch(result.environment)
        if mismatch:  # bit-for-bit comparison needs the same versions; not a lie, but unusable
            verdict.ok, verdict.kind = False, "version"
            verdict.reason = (f"provider runs {mismatch}: its scores cannot be compared with a re-run; "
                              "rebuild the provider image with `mltask image build`")
            return verdict
        for trial in result.trials:
            if trial.status == "ok" and not all(self._low <= s <= self._high for s in trial.fold_scores):
                verdict.ok, verdict.kind = False, "structure"
                verdict.reason = f"trial {trial.number}: a fold score lies outside [{self._low}, {self._high}]"
                return verdict
        started = time.perf_counter()
        plan = self._plan(subtask, result, provider, best)
        if plan:
            verdict.kind = "spot"
            verdict.checked = plan
            verdict.reason = self._rerun(
                {t.number: t for t in subtask.trials}, {t.number: t for t in result.trials}, plan
            )
            verdict.ok = verdict.reason is None
        verdict.seconds = time.perf_counter() - started
        self.rerun_seconds += verdict.seconds
        return verdict

    def _plan(self, subtask: SubtaskDefinition, result: SubtaskResult, provider: str,
              best: float | None) -> list[tuple[int, int | None]]:
        """Which (trial, fold) to re-run; fold ``None`` means every fold."""
        folds = subtask_folds(subtask)
        first = provider not in self.seen_providers
        self.seen_providers.add(provider)
        contender = self._would_be_best(result.trials, best) if self.options.verify_best else None
        if contender is not None:
            return [(contender.number, self._rng.randrange(folds))]
        rate = self.options.sample_rate
        if rate == 0 or not (first or self._rng.random() < rate):
            return []
        units = [(t.number, f) for t in result.trials for f in range(folds)]
        plan: list[tuple[int, int | None]] = []
        for number, fold in self._rng.sample(units, min(self.options.checks_per_subtask, len(units))):
            failed = next(t for t in result.trials if t.number == number).status == "failed"
            plan.append((number, None if failed else fold))  # a claimed failure is re-run whole
        return plan

    def check_best(self, trial: TrialSpec, claim: TrialResult, subtask_id: str, provider: str) -> Verdict:
        """Re-run the best trial in full before it is reported as the result of the search."""
        started = time.perf_counter()
        reason = self._rerun({trial.number: trial}, {trial.number: claim}, [(trial.number, None)])
        seconds = time.perf_counter() - started
        self.rerun_seconds += seconds
        return Verdict(subtask_id, provider, ok=reason is None, kind="best", checked=[(trial.number, None)],
                       reason=reason, seconds=seconds)

    def _would_be_best(self, trials: list[TrialResult], best: float | None) -> TrialResult | None:
        ok = [t for t in trials if t.status == "ok" and t.mean_score is not None]
        if not ok:
            return None
        sign = 1.0 if self.direction == "maximize" else -1.0
        top = max(ok, key=lambda t: sign * t.mean_score)
        return top if best is None or sign * top.mean_score > sign * best else None

    def _rerun(self, specs: dict[int, TrialSpec], claimed: dict[int, TrialResult],
               plan: list[tuple[int, int | None]]) -> str | None:
        """Re-run ``plan`` on the requestor; the first disagreement with the claims, or ``None``."""
        check_resources(self.problem.resources, self.resources_dir)
        evaluator = evaluator_for(self.problem, self.resources_dir)
        with one_thread():
            for number, fold in plan:
                folds = None if fold is None else [fold]
                honest = evaluator.evaluate(specs[number], folds)
                mismatch = self._mismatch(claimed[number], honest, folds)
                if mismatch:
                    return f"trial {number}: {mismatch}"
        return None

    def _mismatch(self, claim: TrialResult, honest: TrialResult, folds: list[int] | None) -> str | None:
        if claim.status != honest.status:
            return f"provider says {claim.status}, re-run says {honest.status} ({honest.error or honest.mean_score})"
        if claim.status == "failed":
            return None
        indices = folds if folds is not None else range(len(claim.fold_scores))
        for got, index in zip(honest.fold_scores, indices, strict=True):
            said = claim.fold_scores[index]
            if not math.isclose(said, got, rel_tol=self.options.rel_tolerance, abs_tol=self.options.abs_tolerance):
                return f"fold {index} score {said!r} but re-run gives {got!r}"
        for got, index in zip(honest.fold_fingerprints, indices, strict=True):
            if claim.fold_fingerprints[index] != got:
                return f"fold {index} predictions differ from the re-run (fingerprint mismatch)"
        return None
