"""Multi-fidelity search: the rungs a configuration climbs and who is promoted, through Optuna's pruners.

A configuration is first scored with a small resource (training rows, or ``max_iter``...) and
trained again with ``reduction_factor`` times more only while it ranks in the top
``1 / reduction_factor`` of the configurations scored at that rung so far. That is
asynchronous successive halving (ASHA, Li et al. 2020): a promotion is decided the moment a
result arrives, never by waiting for a rung to fill, so no provider idles. The decision is
Optuna's own: each rung result is reported to the trial as an intermediate value and the
study's ``SuccessiveHalvingPruner`` (or ``HyperbandPruner``, brackets of it) says prune or
go on, as in an Optuna objective calling ``trial.report`` and ``trial.should_prune``.
Its eager rule applies: a trial that is the best at its rung so far is always promoted, so
the first arrivals climb (Optuna's and ASHA's known behaviour).

:class:`RungSchedule` is all the task type knows of this: the rungs, a fresh trial's first
rung, the decision on a rung result, the waiting promotions, and how to restore a rebuilt
study's pruner state from the store.
"""

from __future__ import annotations

import math
from typing import Literal

import optuna
from optuna.pruners import BasePruner, HyperbandPruner, SuccessiveHalvingPruner

from mltask.definition import FidelitySpec

Decision = Literal["promoted", "pruned", "complete"]


def rung_resources(min_resource: float, max_resource: float, factor: int) -> list[float]:
    """``min * factor**k`` while below ``max``, then ``max`` (ints stay ints)."""
    resources: list[float] = []
    k = 0
    while min_resource * factor**k < max_resource:
        resources.append(min_resource * factor**k)
        k += 1
    return [*resources, max_resource]


class RungSchedule:
    """Rungs and promotions of one task; Optuna's pruner decides, this class feeds it.

    Optuna's pruners count resource in integer steps, so rung ``k`` is reported at step
    ``factor**k`` (the resource in units of ``min_resource``) with the pruner's
    ``min_resource=1``: its rung ``k`` then starts exactly at our rung ``k``, whatever the
    resource's unit, and a float resource works too. The top rung (``max_resource``) is
    never reported: a trial that reaches it is complete, with that score as its value.
    """

    def __init__(self, spec: FidelitySpec, max_resource: float) -> None:
        self.spec = spec
        self.factor = spec.reduction_factor
        self.resources = rung_resources(spec.min_resource, max_resource, self.factor)
        self.top = len(self.resources) - 1
        self.waiting: dict[int, int] = {}  # trial number -> the rung it was promoted to

    def pruner(self) -> BasePruner:
        if self.spec.schedule == "hyperband":
            # One bracket per rung: Optuna counts them as floor(log(max / min, factor)) + 1, and
            # the + 1 keeps a float log a hair below an integer (log(243, 3) = 4.999...) from
            # dropping the last one.
            return HyperbandPruner(min_resource=1, max_resource=self.factor**self.top + 1,
                                   reduction_factor=self.factor)
        return SuccessiveHalvingPruner(min_resource=1, reduction_factor=self.factor, min_early_stopping_rate=0)

    def step(self, rung: int) -> int:
        return self.factor**rung

    def first_rung(self, study: optuna.Study, number: int) -> int:
        """The rung a fresh trial starts at: 0, or under Hyperband its bracket's first rung.

        Hyperband's bracket ``b`` would promote its trials through rungs below ``b`` without
        a decision; starting them at rung ``b`` saves those evaluations. Optuna picks the
        bracket from the study name and trial number (a CRC), so a rebuilt study agrees.
        """
        if self.spec.schedule != "hyperband":
            return 0
        pruner = study.pruner
        assert isinstance(pruner, HyperbandPruner)
        if not pruner._pruners:  # Optuna builds its brackets on the first prune (once); we need them first
            pruner._try_initialization(study)
        return min(pruner._get_bracket_id(study, _frozen(study, number)), self.top)

    def decide(self, study: optuna.Study, number: int, rung: int, value: float) -> Decision:
        """Report rung ``rung``'s ``value`` for trial ``number`` and let the pruner decide.

        Through the storage rather than an ``optuna.trial.Trial``: building one for a trial
        rebuilt after a resume asks the sampler for relative parameters again, which moves
        its random state and the configurations proposed next.
        """
        if rung >= self.top:
            return "complete"
        trial = _frozen(study, number)
        study._storage.set_trial_intermediate_value(trial._trial_id, self.step(rung), value)
        if study.pruner.prune(study, _frozen(study, number)):
            return "pruned"
        self.waiting[number] = rung + 1
        return "promoted"

    def take(self, limit: int) -> list[tuple[int, int]]:
        """Up to ``limit`` waiting promotions as (trial number, rung), highest rung first, then by number.

        By number rather than by arrival, so a resumed task (whose waiting promotions are
        read back from the store) forms the same batches as an undisturbed one.
        """
        order = sorted(self.waiting.items(), key=lambda item: (-item[1], item[0]))[:limit]
        for number, _ in order:
            del self.waiting[number]
        return order

    def restored(self, climbed: list[tuple[int, float]]) -> tuple[dict[int, float], dict[str, float]]:
        """Intermediate values and the pruner's system attributes of a trial that ``climbed`` (rung, value)s.

        What ``decide`` left in the study, rebuilt from the store: the pruner marks the
        ``j``-th rung it judged a trial at as ``completed_rung_j`` (counted from the trial's
        first rung), and it compares trials by those marks.
        """
        judged = [(rung, value) for rung, value in sorted(climbed) if rung < self.top]
        intermediate = {self.step(rung): value for rung, value in judged}
        marks = {f"completed_rung_{j}": value for j, (_, value) in enumerate(judged)}
        return intermediate, marks

    def spent(self, climbed: list[int]) -> float:
        """The resource the rungs in ``climbed`` cost (each rung trains from scratch)."""
        return math.fsum(self.resources[rung] for rung in climbed)


def _frozen(study: optuna.Study, number: int) -> optuna.trial.FrozenTrial:
    """Trial ``number`` as stored now, without listing every trial of the study."""
    storage = study._storage
    return storage.get_trial(storage.get_trial_id_from_study_id_trial_number(study._study_id, number))
