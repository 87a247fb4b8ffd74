"""Search algorithms: one Optuna sampler per ``options.algorithm``.

Optuna does the searching; this module only picks and configures a sampler so that it works
under asynchronous, batched ask-and-tell, where many trials are pending at once:
TPE uses the constant liar (pending trials count as bad guesses, so a batch spreads out)
and counts pending trials in its start-up phase (see :class:`_AskedStartupTPESampler`), and
QMC is told the search space up front (see :class:`_KnownSpaceQMCSampler`).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler
from optuna.trial import TrialState

from mltask.errors import TaskError
from mltask.space import FloatParam, IntParam, SearchSpace


class _KnownSpaceQMCSampler(optuna.samplers.QMCSampler):
    """QMC that knows the search space before the first trial completes.

    Optuna's QMCSampler learns the space from the first *finished* trial and samples the
    trials before it at random; with a whole batch asked up front that would be the entire
    first batch. Our space is declared in the task, so we hand it over.
    """

    def __init__(self, space: dict[str, BaseDistribution], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._known_space = {
            name: dist for name, dist in space.items()
            if not isinstance(dist, optuna.distributions.CategoricalDistribution)
        }

    def infer_relative_search_space(self, study: optuna.Study, trial: Any) -> dict[str, BaseDistribution]:
        return self._known_space


class _AskTellGridSampler(optuna.samplers.GridSampler):
    """Grid search under ask-and-tell.

    Optuna's GridSampler calls ``study.stop()`` when the grid is exhausted, which raises
    outside ``study.optimize``; our task knows its budget (the grid size) and stops itself.
    """

    def after_trial(self, study: optuna.Study, trial: Any, state: Any, values: Any) -> None:
        return None


class _ReproducibleRandomSampler(optuna.samplers.RandomSampler):
    """Random search whose trial *n* is the same whatever happened before it.

    Optuna's RandomSampler draws from one generator, so after a resume (a fresh sampler)
    trial 0's values would come again. Drawing trial *n*'s values from a generator seeded
    by (seed, *n*) makes it identical in an interrupted and an undisturbed run; the
    parameters of a trial are always drawn in the search space's order.
    """

    def __init__(self, seed: int) -> None:
        super().__init__(seed=seed)
        self._base_seed = seed
        self._current: tuple[int, optuna.samplers.RandomSampler] | None = None

    def sample_independent(self, study: optuna.Study, trial: Any, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        if self._current is None or self._current[0] != trial.number:
            seed = np.random.SeedSequence([self._base_seed, trial.number]).generate_state(1)[0]
            self._current = (trial.number, optuna.samplers.RandomSampler(seed=int(seed)))
        return self._current[1].sample_independent(study, trial, param_name, param_distribution)


class _AskedStartupTPESampler(optuna.samplers.TPESampler):
    """TPE whose random start-up phase is its first ``n_startup_trials`` *asked* trials.

    Optuna ends the start-up phase once ``n_startup_trials`` trials have *finished*, which
    is right when trials are asked one at a time. Under batched ask-and-tell a batch is
    asked while others are still out, so with batches of 5 on 2 providers the third batch
    was random too: 15 random trials instead of 10, and at 20 trials the search trailed
    sequential TPE (``bench/tpe_batched.py``). Here pending (RUNNING) trials count, as
    they would have finished by then in a sequential search; the model then proposes with
    the constant liar standing in for their results. Failed trials do not count, as in
    Optuna. Once the model has started it stays on (later failures do not bring back
    random sampling), which also spares a scan of every trial on every draw.
    """

    def __init__(self, *, n_startup_trials: int = 10, seed: int | None = None, **kwargs: Any) -> None:
        super().__init__(n_startup_trials=0, seed=seed, **kwargs)
        self._asked_startup = n_startup_trials
        self._startup_sampler = optuna.samplers.RandomSampler(seed=seed)  # the stream Optuna's start-up draws from
        self._model_started = False

    def reseed_rng(self) -> None:
        super().reseed_rng()
        self._startup_sampler.reseed_rng()

    def _in_startup(self, study: optuna.Study, trial: Any) -> bool:
        if not self._model_started:
            states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
            asked = sum(t.number != trial.number for t in study.get_trials(deepcopy=False, states=states))
            self._model_started = asked >= self._asked_startup
        return not self._model_started

    def sample_relative(self, study: optuna.Study, trial: Any, search_space: dict[str, BaseDistribution]) -> dict:
        return {} if self._in_startup(study, trial) else super().sample_relative(study, trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: Any, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        if self._in_startup(study, trial):
            return self._startup_sampler.sample_independent(study, trial, param_name, param_distribution)
        return super().sample_independent(study, trial, param_name, param_distribution)


def make_sampler(algorithm: str, space: SearchSpace, seed: int) -> BaseSampler:
    """The Optuna sampler for ``algorithm``; raises :class:`TaskError` if it cannot serve ``space``."""
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    if algorithm == "grid":
        try:
            return _AskTellGridSampler(space.grid(), seed=seed)
        except ValueError as exc:
            raise TaskError("options.search_space", str(exc)) from None
    if algorithm == "random":
        return _ReproducibleRandomSampler(seed)
    if algorithm == "qmc":
        if space.is_conditional:
            raise TaskError("options.algorithm", "qmc needs a space without `when` conditions; use tpe or random")
        return _KnownSpaceQMCSampler(
            space.distributions(), seed=seed, scramble=True, warn_asynchronous_seeding=False,
            warn_independent_sampling=False,
        )
    if algorithm == "tpe":
        return _AskedStartupTPESampler(seed=seed, constant_liar=True, multivariate=True, group=space.is_conditional)
    if algorithm == "cmaes":
        if not any(isinstance(p, (IntParam, FloatParam)) for p in space.params.values()):
            raise TaskError(
                "options.algorithm", "cmaes searches int and float parameters and this space has none "
                "(it would pick categorical ones at random, as random search does); use tpe or random"
            )
        try:
            import cmaes  # noqa: F401  # Optuna's CMA-ES needs it; fail now, not mid-search
        except ImportError:
            raise TaskError("options.algorithm", "cmaes needs the `cmaes` package; pip install cmaes") from None
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    raise TaskError("options.algorithm", f"unknown algorithm {algorithm!r}")
