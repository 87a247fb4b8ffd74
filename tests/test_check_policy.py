"""The verification policy on its own: what it plans for given results (no runs, no I/O)."""

from __future__ import annotations

from mltask.check_policy import WARMUP_CATCH, WARMUP_FAKES, CheckPolicy
from mltask.protocol import TrialResult
from mltask.space import SearchSpace

SPACE = SearchSpace.model_validate({"C": {"type": "float", "low": 0.01, "high": 10.0, "log": True}})


def _policy(budget: float = 0.0, folds: int = 5) -> CheckPolicy:
    return CheckPolicy(budget=budget, direction="maximize", space=SPACE, folds=folds, exchangeable=True,
                       protect_best=True)


def _trials(scores: list[float], first: int = 0) -> list[TrialResult]:
    return [TrialResult(number=first + i, params={"C": 1.0 + i}, seed=i, status="ok", fold_scores=[s] * 5,
                        mean_score=s, std_score=0.0) for i, s in enumerate(scores)]


def test_only_a_subtasks_top_trial_is_a_contender() -> None:
    """Regression: every trial of a provider's first subtask beat "the best so far" (nothing was
    settled), so each got a fold checked: 5 of 25 units, 4% of a 40-trial task per provider."""
    policy = _policy()
    plans = policy.plan("a", _trials([0.8, 0.9, 0.85]), 1.0)
    assert [(p.kind, [n for n, _ in p.units]) for p in plans] == [("contender", [1])]
    plans = policy.plan("b", _trials([0.7, 0.95, 0.92], first=3), 1.0)  # 0.92 beats 0.9 but not 0.95
    assert [(p.kind, [n for n, _ in p.units]) for p in plans] == [("contender", [4])]
    assert policy.plan("b", _trials([0.5, 0.6], first=6), 1.0) == []  # beats nothing: no contender


def test_trials_that_tie_for_a_subtasks_top_are_all_contenders() -> None:
    """A provider that trains one configuration and copies its scores onto the others makes ties:
    checking only one of them (the first) checked the honest one in 1 of 5 harness runs."""
    plans = _policy().plan("a", _trials([0.9, 0.9, 0.9, 0.8]), 1.0)
    assert [(p.kind, sorted(n for n, _ in p.units)) for p in plans] == [("contender", [0, 1, 2])]


def test_a_provider_faking_everything_meets_a_check_before_its_tenth_fake() -> None:
    """Warm-ups by the binomial: 2,000 new providers each answer one-trial holdout subtasks with
    mediocre scores (no contender, so only warm-ups and samples check them); at most ~1% go
    unchecked through 10 trials. Before, the first subtask was checked with the probability half
    the budget's share allowed (0.5 x 5% x 1 unit x 10 subtasks / 2,000 providers), and 61% were."""
    policy = _policy(budget=0.05, folds=1)
    policy.plan("top", _trials([0.99]), 1.0)
    unchecked, providers = 0, 2000
    for p in range(providers):
        checked = any(policy.plan(f"p{p}", _trials([0.5], first=1 + 10 * p + i), 1.0) for i in range(WARMUP_FAKES))
        unchecked += not checked
    assert unchecked / providers < 2 * (1 - WARMUP_CATCH)  # 0.98% expected; 2% is 4.7 standard errors away


def test_contenders_are_checked_until_their_provider_passed_a_check() -> None:
    """A check still out does not end a provider's contender checks (the replaying adversary
    changed the reported best in 2 of 55 harness runs when it did); a passed one does."""
    policy = _policy(folds=1)
    assert [p.kind for p in policy.plan("a", _trials([0.8]), 1.0)] == ["contender"]
    assert [p.kind for p in policy.plan("a", _trials([0.9], first=1), 1.0)] == ["contender"]  # the first is out
    policy.passed("a")
    assert policy.plan("a", _trials([0.95], first=2), 1.0) == []  # the best's final re-run guards it now
