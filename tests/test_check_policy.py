"""The verification policy on its own: what it plans for given results (no runs, no I/O)."""

from __future__ import annotations

from mltask.check_policy import CheckPolicy
from mltask.protocol import TrialResult
from mltask.space import SearchSpace

SPACE = SearchSpace.model_validate({"C": {"type": "float", "low": 0.01, "high": 10.0, "log": True}})


def _policy(budget: float = 0.0, folds: int = 5) -> CheckPolicy:
    return CheckPolicy(budget=budget, direction="maximize", space=SPACE, folds=folds, exchangeable=True,
                       protect_best=True, expected_subtasks=10)


def _trials(scores: list[float], first: int = 0) -> list[TrialResult]:
    return [TrialResult(number=first + i, params={"C": 1.0 + i}, seed=i, status="ok", fold_scores=[s] * 5,
                        mean_score=s, std_score=0.0) for i, s in enumerate(scores)]


def test_only_a_subtasks_top_trial_is_a_contender() -> None:
    """Regression: every trial of a provider's first subtask beat "the best so far" (nothing was
    settled), so each got a fold checked: 5 of 25 units, 4% of a 40-trial task per provider."""
    policy = _policy()
    plans = policy.plan("a", _trials([0.8, 0.9, 0.85]), 1.0, 2)
    assert [(p.kind, [n for n, _ in p.units]) for p in plans] == [("contender", [1])]
    plans = policy.plan("b", _trials([0.7, 0.95, 0.92], first=3), 1.0, 2)  # 0.92 beats 0.9 but not 0.95
    assert [(p.kind, [n for n, _ in p.units]) for p in plans] == [("contender", [4])]
    assert policy.plan("b", _trials([0.5, 0.6], first=6), 1.0, 2) == []  # beats nothing: no contender


def test_trials_that_tie_for_a_subtasks_top_are_all_contenders() -> None:
    """A provider that trains one configuration and copies its scores onto the others makes ties:
    checking only one of them (the first) checked the honest one in 1 of 5 harness runs."""
    plans = _policy().plan("a", _trials([0.9, 0.9, 0.9, 0.8]), 1.0, 2)
    assert [(p.kind, sorted(n for n, _ in p.units)) for p in plans] == [("contender", [0, 1, 2])]
