"""Which results to check, and how much: the verification policy.

Pure bookkeeping and random draws, no I/O: :class:`mltask.verifier.Verifier` asks it for a
plan when it accepts a subtask and tells it what checks cost and how they ended, so the
policy can be driven (and tuned) by the scale simulation as well as by real runs.

A *unit* is one (trial, fold) evaluation; ``fold = None`` means every fold of the trial.
For each accepted subtask the policy plans:

- **claimed failures** (``kind="failure"``): every trial the provider says failed is re-run
  in full, by another provider like a sample (the requestor referees a disagreement, and
  re-runs a confirmed failure only where :meth:`CheckPolicy.promising` finds good
  neighbours): hiding a good configuration as a crash is the cheapest sabotage, and
  sampling would miss it.
- **contenders** (``kind="contender"``): a subtask's top trial (with any that tie with it),
  if its claimed score beats the best so far, gets one random fold checked while its
  provider has passed no check yet (a check still out does not count: the dishonest-provider
  harness's replaying verifier changed the reported best in 2 of 55 runs when it did, 0 of 35
  before); after that the best's final full re-run guards it: a faked best fails it, and the ban
  reopens everything its provider reported. The requestor runs contender checks itself, so
  when a contender stays the best its final re-run skips the folds already re-run (with
  holdout CV, the contender check *is* that re-run). Only the top: the other trials of the
  subtask cannot become the best unless the top is a lie, which bans their provider.
  (Checking every trial that beat the best so far checked every trial of a provider's first
  subtask, 4-5% of a 40-trial task per provider; checking contenders until two checks had
  passed, and on other providers, made the templates' real runs cost 6-11%,
  bench/verification.py.)

  Both protect the reported best, so both follow ``verify_best`` (``protect_best``): with
  it off and ``budget`` 0, nothing is re-run at all.
- **samples** (``kind="spot"``): ``k`` units, with ``E[k] = m``::

      m = budget * seconds_out / unit_cost * (risk / mean risk) * (weight / mean weight) * pace

  ``budget * seconds_out`` is this subtask's share of the verification budget in seconds,
  ``unit_cost`` what one checked unit costs as measured so far (check subtasks' time out
  per unit, so per-subtask overheads count), ``pace`` pulls the spending back to 90% of the
  budget less one trial kept for the best's final re-run (between 0.25 and 2) when mandatory
  checks or estimates drifted, with a gain high enough to hold it there (see ``_pace``). ``risk`` is
  per provider, BOINC's adaptive replication: ``max(floor, h / (h + passed))`` after
  ``passed`` passed checks, so new providers are checked most and a patient cheater still
  at ``floor`` (0.2) of the new rate; a provider whose scores are systematically low (a
  one-sided Mann-Whitney test against everyone else's, only where the sampler makes trials
  exchangeable: random, qmc, grid) is checked four times as much. ``weight`` is per trial,
  towards the top: ``1 + 8 * max(0, 1 - q / 0.1)`` where ``q`` is the fraction of settled
  trials better than the trial *could* be: the better of its claimed score and the mean of
  its five nearest neighbours from other providers in the search space. Inflated fakes sit
  at the top by their claims, and a good configuration reported low sits among good
  neighbours, so both draw checks; the mean normalisers keep the budget.
- **warm-up**: until a provider's first sampled check is planned, each of its trials is
  checked with probability ``WARMUP_RATE = 1 - 0.01 ** (1 / 10) = 0.369`` (a subtask of
  ``t`` trials gets a check with probability ``1 - 0.631 ** t``), and that check takes
  ``WARMUP_TRIALS = 2`` distinct trials of the subtask (one fold each) where it has two. A
  provider that fakes every result fails any check, so it meets one before its 10th fake
  with probability ``1 - 0.631 ** 10 = 99%`` (before its 5th: 90%), whatever the task's
  shape or the budget. A partial faker, faking ``f`` of each subtask's ``t`` trials (a
  fraction ``phi``), fails it with probability ``1 - C(t - f, 2) / C(t, 2)``, about
  ``1 - (1 - phi) ** 2``, where one trial would catch it with ``phi`` only: one that trains
  one trial per subtask and makes up the rest (the replaying adversary: ``f = t - 1``) for
  certain. The binomial also prices it: an honest provider with ``n`` trials costs
  ``1 - 0.631 ** n`` checks (0.99 from ``n = 10``): two units per provider (one with one
  trial per subtask), what a 99% catch of full fakers costs (any rule catching them within
  10 trials with probability ``c`` checks an honest provider within 10 trials with
  probability ``c``) plus one unit for the partial ones (in the harness, 40 trials on 3
  providers: 8.5 -> 11.2 units re-run per run of 200; at 500 providers the overhead stayed
  within its run-to-run spread). A fold with k-fold CV, a whole trial with holdout: two
  providers on a 40-trial holdout task with one trial per subtask spend ~5% on warm-ups
  alone. Not paced (pacing
  warm-ups by a budget not yet earned let such fakers through in 2 of 5 harness runs;
  scaling them by the budget's share left 61% of full fakers unchecked through 10 trials at
  2,000 providers); its cost is charged, so later samples pay.
- **copies** (:meth:`CheckPolicy._copies`): trials of a subtask that claim the same fold
  predictions (fingerprints) for different configurations get a fold of each checked, with
  the provider's risk as probability: a provider reporting one computation for several
  configurations is checked at its first subtask, an honest one pays only where its
  configurations predict alike.

Every draw comes from the operating system's generator (``secrets.SystemRandom``), so
nothing a provider sees or can compute predicts which of its results will be checked.
"""

from __future__ import annotations

import bisect
import json
import math
import secrets
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mltask.protocol import TrialResult
from mltask.space import SearchSpace

Unit = tuple[int, int | None]  # (trial number, fold or None = every fold)

RISK_FLOOR = 0.2
RISK_HALF = 2.0
SUSPECT_RISK = 4.0
SUSPECT_P = 1e-3
SUSPECT_MIN = 10
TOP_FRACTION = 0.1
TOP_WEIGHT = 8.0
NEIGHBOURS = 5
PACE_RANGE = (0.25, 2.0)
PACE_TARGET = 0.9
PACE_GAIN = 10.0  # see CheckPolicy._pace
WARMUP_FAKES = 10  # a provider faking everything must meet a check before it has faked this many trials...
WARMUP_CATCH = 0.99  # ...with this probability
WARMUP_RATE = 1 - (1 - WARMUP_CATCH) ** (1 / WARMUP_FAKES)  # per trial until its first check: 0.369
WARMUP_TRIALS = 2  # distinct trials its check takes where the subtask has them (a partial faker keeps one honest)
CONTENDER_TRUST = 1  # contenders are checked until their provider has passed this many checks
_EMA = 0.05


@dataclass(frozen=True)
class Plan:
    """Units to check in one subtask's result, and why: 'spot' (sampled), 'contender' or 'failure'."""

    kind: str
    units: list[Unit]


@dataclass
class _Provider:
    checked: bool = False  # a sampled check was planned on it
    passed: int = 0  # checks passed
    scores: list[float] = field(default_factory=list)  # signed claimed scores (higher is better)
    useful: float = 0.0  # seconds of its accepted search subtasks
    suspect_at: int = -1  # len(scores) when last tested
    suspect: bool = False

    def warming_up(self) -> bool:
        """Whether no check of it has passed or been planned yet: see ``WARMUP_RATE``."""
        return self.passed == 0 and not self.checked

    def risk(self) -> float:
        base = max(RISK_FLOOR, RISK_HALF / (RISK_HALF + self.passed))
        return base * (SUSPECT_RISK if self.suspect else 1.0)


class CheckPolicy:
    """Plans checks for accepted results within a compute budget; see the module docstring."""

    def __init__(self, *, budget: float, direction: str, space: SearchSpace, folds: int, exchangeable: bool,
                 protect_best: bool, rng: Any = None) -> None:
        self.budget = budget
        self.sign = 1.0 if direction == "maximize" else -1.0
        self.folds = folds
        self.exchangeable = exchangeable
        self.protect_best = protect_best
        self.rng = rng or secrets.SystemRandom()
        self._embed = _Embedding(space)
        self._providers: dict[str, _Provider] = {}
        self._ids: dict[str, int] = {}
        self._population = _Population()
        self._sorted: list[float] = []  # signed scores of settled trials, ascending
        self.useful = 0.0  # seconds of accepted search subtasks
        self.useful_units = 0
        self.spent = 0.0  # seconds of verification charged
        self.committed = 0.0  # estimated seconds of planned checks not yet charged
        self._unit_cost: float | None = None
        self._mean_risk: float | None = None
        self._mean_weight: float | None = None

    # -- what the policy is told ----------------------------------------------------------

    def provider(self, name: str) -> _Provider:
        return self._providers.setdefault(name, _Provider())

    def passed(self, provider: str) -> None:
        """A check of ``provider`` agreed: trust it a little more."""
        self.provider(provider).passed += 1

    def forget(self, provider: str) -> None:
        """``provider`` was banned: its scores leave the population the weights come from, and its
        work leaves ``useful`` (it is reopened and done again elsewhere, and the overhead reported
        counts only accepted work: left in, a banned provider's voided work bought checks of others)."""
        record = self._providers.pop(provider, None)
        if record is not None:
            self.useful -= record.useful
        self._population.remove(self._id(provider))
        self._sorted = sorted(self._population.scores())

    def charge(self, seconds: float, estimate: float, units: int) -> None:
        """A check ran: ``seconds`` measured; ``estimate`` was committed for it at planning."""
        self.spent += seconds
        self.committed = max(0.0, self.committed - estimate)
        if units > 0:
            per_unit = seconds / units
            self._unit_cost = _ema(self._unit_cost, per_unit)

    def estimate(self, units: list[Unit]) -> float:
        """Expected seconds of checking ``units`` (a whole trial is ``folds`` units)."""
        return self.unit_cost() * sum(self.folds if fold is None else 1 for _, fold in units)

    def unit_cost(self) -> float:
        if self._unit_cost is not None:
            return self._unit_cost
        return self.useful / self.useful_units if self.useful_units else 0.0

    # -- planning -------------------------------------------------------------------------

    def plan(self, provider: str, trials: list[TrialResult], seconds_out: float) -> list[Plan]:
        """The checks for one accepted subtask of ``provider``."""
        record = self.provider(provider)
        self.useful += seconds_out
        record.useful += seconds_out
        self.useful_units += len(trials) * self.folds
        ok = [t for t in trials if t.status == "ok" and t.mean_score is not None]
        plans = []
        if self.protect_best:
            plans += [Plan("failure", [(t.number, None)]) for t in trials if t.status == "failed"]
        contenders = self._contenders(ok) if self.protect_best else set()
        units = self._sample(record, provider, ok, seconds_out, contenders)
        self._remember(provider, ok)
        # the requestor checks contenders itself: should one stay the best, its final re-run skips those folds
        for kind, part in (("contender", [u for u in units if u[0] in contenders]),
                           ("spot", [u for u in units if u[0] not in contenders])):
            if part:
                plans.append(Plan(kind, part))
        for plan in plans:
            self.committed += self.estimate(plan.units)
        return plans

    def _sample(self, record: _Provider, provider: str, ok: list[TrialResult], seconds_out: float,
                contenders: set[int]) -> list[Unit]:
        if not ok:
            return []
        self._update_suspicion(record, provider)
        weights = [self._weight(provider, t) for t in ok]
        risk, weight = record.risk(), sum(weights) / len(weights)
        self._mean_risk = _ema(self._mean_risk, risk)
        self._mean_weight = _ema(self._mean_weight, weight)
        m = 0.0
        if self.budget > 0 and self.unit_cost() > 0:
            m = (self.budget * seconds_out / self.unit_cost() * risk / self._mean_risk * weight / self._mean_weight
                 * self._pace())
            if record.warming_up():
                m = max(m, 1 - (1 - WARMUP_RATE) ** len(ok))
        k = int(m) + (self.rng.random() < m - int(m))
        if k and record.warming_up():  # on distinct trials (_weighted_units): see WARMUP_TRIALS
            k = max(k, min(len(ok), WARMUP_TRIALS))
        k = min(len(ok) * self.folds, k)
        units = self._weighted_units(ok, weights, k)
        chosen = {n for n, _ in units}
        if self.protect_best and record.passed < CONTENDER_TRUST:
            units += [(n, self.rng.randrange(self.folds)) for n in contenders if n not in chosen]
        if self.budget > 0 and self.rng.random() < record.risk():
            chosen = {n for n, _ in units}
            units += [(n, fold) for n, fold in self._copies(ok) if n not in chosen]
        record.checked = record.checked or bool(units)
        return units

    def _copies(self, ok: list[TrialResult]) -> list[Unit]:
        """A fold of each trial of the subtask that claims the same predictions as another configuration's.

        Training one configuration and reporting its result (scores and fingerprints) for others
        is the cheapest partial fake, and leaves this trace. Of trials claiming one computation
        at most one is its own unless the configurations truly predict alike (a parameter with
        no effect), in which case all pass: checking them catches a copier unless each copy
        checked happens to be right on its fold. A reason to check, never to ban. Every member,
        not two: on the tests' 12-configuration decision tree on iris configurations often
        predict alike on one fold, so two checked copies passed in 2-6 of 100 harness runs of
        the copier, all of them in 0-1 of 100; an honest group is mostly a pair, and cost the
        same. One group (at random) per subtask, each trial on its own random fold. Asked with
        the provider's risk as probability (1 until it has passed a check, down to
        ``RISK_FLOOR``): a copier is checked at its first subtask for certain, a patient one in
        each subtask it copies in with probability 0.2 or more, and an honest provider pays the
        group's size in units times its risk per subtask with real duplicates, nothing
        otherwise (25-30% of the decision tree's subtasks; none in the scale simulation; at
        worst, every trial of every subtask predicting alike, ``risk / folds`` of the search).
        Fingerprints, not scores: equal scores from different predictions are common on small
        validation folds (31% of those subtasks, 25% with equal predictions), and a copier that
        makes up fingerprints must make up scores too, or be seen here, which makes it the
        replaying adversary the warm-up catches. Configurations, not trials: a configuration
        drawn twice may honestly predict alike under any seed.
        """
        groups: dict[tuple[str, ...], dict[str, TrialResult]] = {}
        for t in ok:
            if t.fold_fingerprints:
                groups.setdefault(tuple(t.fold_fingerprints), {}).setdefault(json.dumps(t.params, sort_keys=True), t)
        copies = [list(group.values()) for group in groups.values() if len(group) > 1]
        if not copies:
            return []
        return [(t.number, self.rng.randrange(self.folds)) for t in self.rng.choice(copies)]

    def _contenders(self, ok: list[TrialResult]) -> set[int]:
        """The subtask's top trials (all that tie for its top score) if they beat every settled one
        (before ``ok`` is remembered). Only those: the others cannot become the best unless a top
        one is a lie, and then its provider is banned and all it reported reopened. Ties all count:
        a provider that trains one configuration and copies its scores onto others makes ties."""
        top = max((self.sign * t.mean_score for t in ok), default=-math.inf)
        if self._sorted and top <= self._sorted[-1]:
            return set()
        return {t.number for t in ok if self.sign * t.mean_score == top}

    def _pace(self) -> float:
        """How much to sample relative to the budget's rate: ``1 + PACE_GAIN * (allowed - spent - committed)
        / allowed``, within ``PACE_RANGE``; ``allowed`` aims under the budget (estimates lag) and keeps
        back the final re-run of the best (one trial).

        A proportional controller settles where the paced samples plus what it does not pace
        (warm-ups, failures, contenders, referee runs) meet it, off the target by about
        ``(rate at pace 1 + unpaced rate - target) / (PACE_GAIN * target)``: with a gain of 1 the
        budget's own rate alone put it 5% above, and a provider's warm-up more (the policy's own
        tally 4.7% for a target of 4.5%; bench/scale.py 5.4% at 500 providers, 6.1% at 5,000,
        where each provider answers 1-2 subtasks and its warm-up is a large share). A gain of 10
        cuts the offset tenfold; the committed estimates make the spending it sees current, so
        it does not overshoot.
        """
        allowed = PACE_TARGET * self.budget * self.useful - (self.unit_cost() * self.folds if self.protect_best else 0)
        if allowed <= 0:  # nothing yet (1), or a budget the best's re-run alone exceeds (the least)
            return 1.0 if self.useful <= 0 else PACE_RANGE[0]
        low, high = PACE_RANGE
        return min(high, max(low, 1.0 + PACE_GAIN * (allowed - self.spent - self.committed) / allowed))

    def _weighted_units(self, ok: list[TrialResult], weights: list[float], k: int) -> list[Unit]:
        """``k`` distinct units: trials drawn by weight (without replacement while any is left), folds at random."""
        free = {t.number: list(range(self.folds)) for t in ok}
        w = dict(zip((t.number for t in ok), weights, strict=True))
        units: list[Unit] = []
        for _ in range(k):
            numbers = [n for n in free if free[n]]
            if not numbers:
                break
            unchecked = [n for n in numbers if len(free[n]) == self.folds] or numbers
            number = self.rng.choices(unchecked, weights=[w[n] for n in unchecked])[0]
            fold = free[number].pop(self.rng.randrange(len(free[number])))
            units.append((number, fold))
        return units

    def _weight(self, provider: str, trial: TrialResult) -> float:
        """More weight the nearer the trial could be to the top (claimed or by its neighbours)."""
        if not self._sorted:
            return 1.0 + TOP_WEIGHT
        claimed = self.sign * trial.mean_score
        could_be = max(claimed, self._neighbours(provider, self._embed(trial.params)))
        better = len(self._sorted) - bisect.bisect_right(self._sorted, could_be)
        q = better / len(self._sorted)
        return 1.0 + TOP_WEIGHT * max(0.0, 1.0 - q / TOP_FRACTION)

    def promising(self, params: dict[str, Any], providers: Collection[str]) -> bool:
        """Whether the nearest trials of providers other than ``providers`` put ``params`` in the top fraction.

        Asked of a claimed failure that a checker confirmed: a configuration among good
        neighbours is worth the requestor's own re-run (the checker may collude), one among
        mediocre ones is not (failures cluster where training diverges). Unknown (too few
        neighbours yet) counts as promising.
        """
        around = self._population.neighbours(self._embed(params), {self._id(p) for p in providers}, NEIGHBOURS)
        if not self._sorted or around == -math.inf:
            return True
        better = len(self._sorted) - bisect.bisect_right(self._sorted, around)
        return better / len(self._sorted) < TOP_FRACTION

    def _neighbours(self, provider: str, point: np.ndarray) -> float:
        """Mean signed score of the nearest trials reported by other providers (-inf if too few)."""
        return self._population.neighbours(point, {self._id(provider)}, NEIGHBOURS)

    def _id(self, provider: str) -> int:
        return self._ids.setdefault(provider, len(self._ids))

    def _remember(self, provider: str, ok: list[TrialResult]) -> None:
        record = self.provider(provider)
        for t in ok:
            score = self.sign * t.mean_score
            self._population.add(self._id(provider), self._embed(t.params), score)
            bisect.insort(self._sorted, score)
            record.scores.append(score)

    def _update_suspicion(self, record: _Provider, provider: str) -> None:
        """Systematically low scores, where trials are exchangeable between providers, draw checks."""
        n = len(record.scores)
        if not self.exchangeable or n < SUSPECT_MIN or n < 1.25 * max(record.suspect_at, 1):
            return
        others = [s for who, rec in self._providers.items() if who != provider for s in rec.scores]
        if len(others) < SUSPECT_MIN:
            return
        from scipy.stats import mannwhitneyu

        record.suspect_at = n
        record.suspect = bool(mannwhitneyu(record.scores, others, alternative="less").pvalue < SUSPECT_P)


def _ema(mean: float | None, value: float) -> float:
    """An exponential moving average that starts at its first value."""
    return value if mean is None else (1 - _EMA) * mean + _EMA * value


class _Population:
    """Settled trials as points with their owner and signed score, in arrays that grow by doubling."""

    def __init__(self) -> None:
        self._n = 0
        self._points = np.zeros((0, 0))
        self._owners = np.zeros(0, dtype=np.int64)
        self._scores = np.zeros(0)

    def add(self, owner: int, point: np.ndarray, score: float) -> None:
        if self._n == len(self._scores):
            capacity = max(64, 2 * self._n)
            self._points = np.resize(self._points, (capacity, len(point))) if self._n else np.zeros((capacity,
                                                                                                     len(point)))
            self._owners = np.resize(self._owners, capacity)
            self._scores = np.resize(self._scores, capacity)
        self._points[self._n], self._owners[self._n], self._scores[self._n] = point, owner, score
        self._n += 1

    def remove(self, owner: int) -> None:
        keep = self._owners[: self._n] != owner
        n = int(keep.sum())
        self._points[:n], self._owners[:n], self._scores[:n] = (
            self._points[: self._n][keep], self._owners[: self._n][keep], self._scores[: self._n][keep])
        self._n = n

    def scores(self) -> list[float]:
        return self._scores[: self._n].tolist()

    def neighbours(self, point: np.ndarray, exclude: set[int], k: int) -> float:
        others = ~np.isin(self._owners[: self._n], list(exclude))
        if others.sum() < k:
            return -math.inf
        distance = np.where(others, ((self._points[: self._n] - point) ** 2).sum(axis=1), np.inf)
        nearest = np.argpartition(distance, k - 1)[:k]
        return float(self._scores[: self._n][nearest].mean())


class _Embedding:
    """Configurations as points in the unit cube (log scales where declared, categoricals one-hot)."""

    def __init__(self, space: SearchSpace) -> None:
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        self._parts: list[tuple[str, Any]] = []
        for name, dist in space.distributions().items():
            if isinstance(dist, CategoricalDistribution):
                self._parts.append((name, list(dist.choices)))
            elif isinstance(dist, FloatDistribution | IntDistribution):
                low, high = (math.log(dist.low), math.log(dist.high)) if dist.log else (dist.low, dist.high)
                self._parts.append((name, (dist.log, low, high)))

    def __call__(self, params: dict[str, Any]) -> np.ndarray:
        out: list[float] = []
        for name, spec in self._parts:
            value = params.get(name)
            if isinstance(spec, list):
                out += [float(value == choice) for choice in spec]
            elif value is None or isinstance(value, str | bool):
                out.append(0.5)
            else:
                log, low, high = spec
                x = math.log(value) if log else float(value)
                out.append((x - low) / (high - low) if high > low else 0.5)
        return np.array(out, dtype=float)
