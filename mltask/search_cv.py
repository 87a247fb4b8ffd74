"""``GolemSearchCV``: a scikit-learn search estimator whose trials run as an mltask task.

A drop-in for ``RandomizedSearchCV`` / ``GridSearchCV`` / ``OptunaSearchCV``: the same
constructor arguments (plus mltask's ``backend``, ``workers``, ``output``, ``verification``),
the same fitted attributes (``cv_results_`` with scikit-learn's keys, ``best_params_``,
``best_estimator_``...), and the same delegated ``predict`` / ``score`` / ``transform``,
which come from scikit-learn's own ``BaseSearchCV``. What differs is where trials run
(any mltask backend) and that results from providers are verified.

``fit`` writes the task a CLI user would write (:mod:`mltask.translate`): the estimator as
JSON (:mod:`mltask.estimators`), the data as a typed NPZ (:mod:`mltask.table`), and runs it
with :func:`mltask.run_task`, so Python and the CLI run the same search, and ``output_dir_``
is a task dir that ``mltask tasks show`` and ``mltask tasks resume`` work on.

``cv_results_`` is made by scikit-learn's own ``_format_results`` from the trials' fold
scores, so its keys, ranks and means are scikit-learn's. Two differences, both documented
in the README: a configuration that fails does so as a whole (every split gets
``error_score``; scikit-learn keeps the folds that did fit), and a splitter's
``random_state=None`` is filled from ``random_state`` (every configuration sees the same folds).
"""

from __future__ import annotations

import json
import numbers
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import clone, is_classifier
from sklearn.model_selection._search import BaseSearchCV

from mltask import translate
from mltask.errors import TaskError
from mltask.outdir import STATE_FILE
from mltask.results import RESULTS_JSON
from mltask.store import Store, TrialRow

DATA_FILE = "data.npz"
# Trials per subtask on backends where a subtask costs little to send: one, as scikit-learn
# dispatches single fits, so two workers share uneven trials evenly. Golem keeps mltask's default.
_FINE_GRAINED = ("local", "docker")


class GolemSearchCV(BaseSearchCV):
    """Hyperparameter search over ``param_distributions``, run on an mltask backend and verified.

    Parameters follow ``RandomizedSearchCV``: ``estimator``, ``param_distributions`` (lists,
    ``scipy.stats`` uniform / loguniform / randint, or mltask parameter dicts), ``n_iter``,
    ``scoring`` (a name, a list or a dict of names), ``cv`` (an int or a scikit-learn
    splitter), ``refit``, ``return_train_score``, ``error_score``, ``random_state``. Then:

    algorithm : {"tpe", "random", "qmc", "cmaes", "grid"}
        Optuna sampler; ``"grid"`` evaluates every combination of lists (``n_iter`` is ignored).
    backend : {"local", "docker", "golem"}
        Where trials run.
    workers : int or None
        Providers at once (default: ``n_jobs``, else the CPU count locally).
    n_jobs : int or None
        scikit-learn's name for ``workers``, so a search written for ``RandomizedSearchCV``
        runs unchanged (``-1``: every CPU).
    output : str, Path or None
        The task's output dir; a previous task there is replaced. Default: a new dir under
        ``mltask-results/``.
    verification : dict, False or None
        ``options.verification`` of the task (``False``: no re-runs at all); default mltask's.
    allowed_modules : list of str or None
        Import prefixes providers may import; default the packages the estimator comes from.
    image : str or None
        Provider image of the docker backend.
    timeout : str
        The whole search at most this long (HH:MM:SS); a search stopped by it can be resumed.
    verbose : int
        0: quiet; 1: mltask's progress bar and leaderboard.
    """

    def __init__(
        self,
        estimator: Any,
        param_distributions: Any,
        *,
        n_iter: int = 10,
        algorithm: str = "tpe",
        scoring: Any = None,
        cv: Any = None,
        refit: Any = True,
        return_train_score: bool = False,
        error_score: Any = np.nan,
        random_state: int | None = None,
        backend: str = "local",
        workers: int | None = None,
        n_jobs: int | None = None,
        output: str | Path | None = None,
        verification: dict[str, Any] | bool | None = None,
        allowed_modules: list[str] | None = None,
        image: str | None = None,
        timeout: str = "24:00:00",
        verbose: int = 0,
    ) -> None:
        self.estimator = estimator
        self.param_distributions = param_distributions
        self.n_iter = n_iter
        self.algorithm = algorithm
        self.scoring = scoring
        self.cv = cv
        self.refit = refit
        self.return_train_score = return_train_score
        self.error_score = error_score
        self.random_state = random_state
        self.backend = backend
        self.workers = workers
        self.n_jobs = n_jobs
        self.output = output
        self.verification = verification
        self.allowed_modules = allowed_modules
        self.image = image
        self.timeout = timeout
        self.verbose = verbose

    # -- the task -------------------------------------------------------------------------

    def task_definition(self, y: Any = None, groups: Any = None) -> dict[str, Any]:
        """The task JSON ``fit`` runs (its dataset is the ``data.npz`` that ``fit`` writes)."""
        estimator, packages = translate.estimator(self.estimator)
        scoring, _ = translate.scoring(self.scoring)
        if self.error_score != "raise" and not isinstance(self.error_score, numbers.Real):
            raise TaskError("error_score", "must be 'raise' or a number (default nan)")
        seed = self._seed()
        options: dict[str, Any] = {
            "estimator": estimator,
            "dataset": {"npz": DATA_FILE, **({"groups": "groups"} if groups is not None else {})},
            "search_space": translate.search_space(self.param_distributions),
            "scoring": scoring,
            "return_train_score": bool(self.return_train_score),
            "cv": {"seed": seed, **translate.splitter(self.cv, y, is_classifier(self.estimator))},
            "algorithm": self.algorithm,
            "seed": seed,
            "allowed_modules": list(self.allowed_modules) if self.allowed_modules is not None else packages,
        }
        if isinstance(scoring, dict) and isinstance(self.refit, str):
            options["refit_metric"] = self.refit
        if self.algorithm != "grid":
            options["n_trials"] = int(self.n_iter)
        if self.verification is False:
            options["verification"] = {"budget": 0.0, "verify_best": False}
        elif self.verification not in (None, True):
            options["verification"] = dict(self.verification)  # type: ignore[arg-type]
        task: dict[str, Any] = {
            "type": "ml_hyperparameter_search", "name": "GolemSearchCV", "timeout": self.timeout,
            "subtask_timeout": "01:00:00", "options": options,
        }
        if self.backend in _FINE_GRAINED:
            task["subtasks_count"] = options.get("n_trials") or 100_000  # capped at the grid size
        return task

    def _seed(self) -> int:
        if self.random_state is None:
            return int(np.random.SeedSequence().generate_state(1)[0])
        if not isinstance(self.random_state, numbers.Integral):
            raise TaskError("random_state", "must be an int or None (a RandomState cannot be sent to providers)")
        return int(self.random_state)

    def _workers(self) -> int | None:
        if self.workers is not None or self.n_jobs is None:
            return self.workers
        from joblib import effective_n_jobs

        return effective_n_jobs(self.n_jobs)

    def _output_dir(self) -> Path:
        if self.output is not None:
            return Path(self.output)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        return Path("mltask-results") / f"{type(self.estimator).__name__}-{stamp}-{np.random.randint(1 << 16):04x}"

    # -- fit ------------------------------------------------------------------------------

    def fit(self, X: Any, y: Any = None, groups: Any = None, **params: Any) -> GolemSearchCV:
        """Run the search on the backend, then set scikit-learn's fitted attributes.

        ``X`` is an array or a pandas DataFrame (column names and types reach providers),
        ``y`` the targets, ``groups`` each row's group for a group splitter.
        """
        if params:
            raise TaskError("fit", f"fit parameters ({', '.join(params)}) are not supported; the estimator is "
                            "fitted with X and y only")
        if y is None:
            raise TaskError("y", "GolemSearchCV tunes supervised estimators: pass y")
        task = self.task_definition(y, groups)
        scorers, refit_metric = self._get_scorers()  # scikit-learn's own checks of scoring and refit
        from mltask.runner import run_task
        from mltask.table import write_dataset

        output_dir = self._output_dir()
        with tempfile.TemporaryDirectory(prefix="mltask-fit-") as tmp:
            data = Path(tmp) / DATA_FILE
            write_dataset(data, X, y, groups)
            task["resources"] = [str(data)]
            result = run_task(task, backend=self.backend, workers=self._workers(), image=self.image, output=output_dir,
                              force=self.output is not None, resources_root=tmp, quiet=not self.verbose)
        if result.summary.status != "finished":
            warnings.warn(f"the search ended {result.summary.status} before its last trial; results are partial - "
                          f"carry on with `mltask tasks resume {output_dir}`", stacklevel=2)
        self.output_dir_ = result.output_dir
        self.verification_ = result.summary.verification
        self._set_results(X, y, self._trials(), result, scorers, refit_metric)
        return self

    def _trials(self) -> list[TrialRow]:
        store = Store.open(self.output_dir_ / STATE_FILE)
        try:
            rows = [t for t in store.trials() if t.state in ("complete", "failed")]
        finally:
            store.close()
        grid = self._grid()
        return sorted(rows, key=lambda t: grid[_key(t.params)][0] if grid else t.number)

    def _grid(self) -> dict[str, tuple[int, dict[str, Any]]]:
        """Grid search over lists: each configuration's position in scikit-learn's ``ParameterGrid`` and
        its dict there, so ``cv_results_`` lists ``GridSearchCV``'s candidates in its order (ties resolve alike)."""
        from sklearn.model_selection import ParameterGrid

        space = self.param_distributions
        if self.algorithm != "grid" or not all(isinstance(v, (list, tuple, np.ndarray)) for v in space.values()):
            return {}
        return {_key({k: translate.choice_value(v, k) for k, v in p.items()}): (i, p)
                for i, p in enumerate(ParameterGrid(space))}

    def _set_results(self, X: Any, y: Any, rows: list[TrialRow], result: Any, scorers: Any,
                     refit_metric: str) -> None:
        n_splits = self._n_splits()
        grid = self._grid()
        candidates = [grid[_key(t.params)][1] if grid else self._restore(t.params) for t in rows]
        self.multimetric_ = isinstance(scorers, dict) or type(scorers).__name__ == "_MultimetricScorer"
        names = list(getattr(scorers, "_scorers", {}))
        out = [fold for t in rows for fold in self._folds(t, n_splits, names)]
        failed = [t for t in rows if t.state == "failed"]
        if failed and self.error_score == "raise":
            raise ValueError(f"trial {failed[0].number} failed: {(failed[0].result or {}).get('error')}; "
                             f"every trial's outcome is in {self.output_dir_}")
        if failed:
            from sklearn.exceptions import FitFailedWarning

            warnings.warn(f"{len(failed)} of {len(rows)} configurations failed; their scores are set to "
                          f"{self.error_score}. First error: {(failed[0].result or {}).get('error')}",
                          FitFailedWarning, stacklevel=3)
        results = self._format_results(candidates, n_splits, out)
        if self.refit or not self.multimetric_:
            self.best_index_ = int(self._select_best_index(self.refit, refit_metric, results))
            if not callable(self.refit):
                self.best_score_ = results[f"mean_test_{refit_metric}"][self.best_index_]
            self.best_params_ = results["params"][self.best_index_]
        if self.refit:
            self._refit(X, y, rows[self.best_index_], result)
        self.scorer_ = getattr(scorers, "_scorers", scorers)
        self.cv_results_ = results
        self.n_splits_ = n_splits

    def _n_splits(self) -> int:
        from mltask.definition import CVSpec

        store = Store.open(self.output_dir_ / STATE_FILE)
        try:
            problem = json.loads(store.meta()["problem"])
        finally:
            store.close()
        return CVSpec.model_validate(problem["cv"]).n_splits

    def _folds(self, trial: TrialRow, n_splits: int, names: list[str]) -> list[dict[str, Any]]:
        """The trial as scikit-learn's ``_fit_and_score`` outputs, one per split (a dict of scores per
        metric when several are scored, else one score)."""
        result = trial.result or {}

        def scores(lists: dict[str, list[float]], k: int) -> Any:
            return {name: lists[name][k] for name in names} if self.multimetric_ else lists["score"][k]

        if trial.state == "failed":
            failed = dict.fromkeys(names, self.error_score) if self.multimetric_ else self.error_score
            return [{"fit_time": 0.0, "score_time": 0.0, "test_scores": failed, "train_scores": failed,
                     "fit_error": result.get("error")}] * n_splits
        tests = result.get("metric_scores") or {"score": result["fold_scores"]}
        trains = result.get("train_scores") or {}
        return [
            {"fit_time": result["fit_times"][k], "score_time": result["score_times"][k],
             "test_scores": scores(tests, k), "train_scores": scores(trains, k) if trains else None,
             "fit_error": None}
            for k in range(n_splits)
        ]

    def _restore(self, params: dict[str, Any]) -> dict[str, Any]:
        """A trial's parameters as the user gave them: the very choice objects (tuples, numpy
        scalars), not their JSON forms."""
        restored = {}
        for name, value in params.items():
            choices = self.param_distributions.get(name)
            if isinstance(choices, (list, tuple, np.ndarray)):
                value = next((c for c in choices if _key(translate.choice_value(c, name)) == _key(value)), value)
            restored[name] = value
        return restored

    def _refit(self, X: Any, y: Any, best: TrialRow, result: Any) -> None:
        """``best_estimator_``: the refit model the task wrote, when it is this trial's; else fitted here."""
        summary_best = result.best
        if result.model_path is not None and summary_best is not None and summary_best["number"] == best.number:
            import joblib

            self.best_estimator_ = joblib.load(result.model_path)  # our own file, fitted by this process's task
            timing = json.loads((self.output_dir_ / RESULTS_JSON).read_text()).get("timing", {})
            self.refit_time_ = float(timing.get("refit_seconds", 0.0))
        else:
            from mltask.problem import trial_params
            from mltask.protocol import TrialSpec
            from mltask.provider import one_thread

            model = clone(self.estimator)
            model.set_params(**trial_params(model, TrialSpec(number=best.number, params=best.params, seed=best.seed)))
            started = time.time()
            with one_thread():
                model.fit(X, y)
            self.refit_time_ = time.time() - started
            self.best_estimator_ = model
        if hasattr(self.best_estimator_, "feature_names_in_"):
            self.feature_names_in_ = self.best_estimator_.feature_names_in_


    def trials_dataframe(self) -> Any:
        """The search's trials as Optuna's ``Study.trials_dataframe()`` gives them (a pandas DataFrame)."""
        from sklearn.utils.validation import check_is_fitted

        from mltask.optuna_export import trials_dataframe

        check_is_fitted(self, "output_dir_")
        return trials_dataframe(self.output_dir_)


def _key(params: Any) -> str:
    return json.dumps(params, sort_keys=True)
