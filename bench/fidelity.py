"""Multi-fidelity search (``options.fidelity``, ASHA) against its peers, side by side.

HistGradientBoostingClassifier (no early stopping) with ``max_iter`` as the resource, on a
20,000-row ``make_classification`` set generated here with a fixed seed (handed to mltask
as an NPZ in a temporary dir), 3-fold stratified CV, accuracy, 2 workers. mltask runs
through ``run_task`` on the local backend with default verification ON (the peers trust
their workers). Every side evaluates the same configurations: mltask's seeded random
sampler draws them (the first, warm-up ASHA run reads them from its ``results.json``), and
each peer is handed that list; mltask's later runs must draw the same list again.

(a) scikit-learn ``HalvingRandomSearchCV(n_jobs=2)``, same candidates (a list of one-point
    dicts as ``param_distributions`` with ``n_candidates`` their number: scikit-learn samples
    such a list without replacement, so each is evaluated once), ``resource="max_iter"``,
    same min/max resources and factor. The candidate count is a power of the factor and
    max/min resource is that power too, so scikit-learn's last iteration trains at the
    maximum resource and its ``best_score_`` (picked at the last iteration) is measured at
    the same resource as mltask's best (always a trial evaluated at the maximum resource).
    Wall time: mltask's search + refit (``results.json`` timing) over scikit-learn's
    ``fit`` (which refits too), with default verification and again with it off (trusting
    its workers, as scikit-learn does); score difference: mltask's best minus scikit-learn's.
(b) mltask's own full-fidelity random search, same seed and number of configurations
    (``max_iter`` fixed at the maximum): when ASHA first has an evaluation at the maximum
    resource scoring at least that search's final best, over the time the full search
    settled its last trial, both counted from the ``run_task`` call (settle times are the
    ``finished_at`` of the subtasks in ``state.db``).
(c) Optuna's ``SuccessiveHalvingPruner`` run sequentially in one process (one thread, as
    mltask's trials): each configuration is refit at each rung resource and reported
    (``trial.report``), pruned when ``should_prune``. At Optuna's total wall time, mltask's
    best at the maximum resource so far minus Optuna's best (a complete trial's score,
    always at the maximum resource).

Runs are interleaved (scikit-learn, ASHA, full search, Optuna, again...) and medians are
printed, because these 2-core machines are noisy. Timing is only meaningful on a quiet
machine.

    python bench/fidelity.py [--quick] [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import math
import sqlite3
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from joblib.externals.loky import get_reusable_executor
from sklearn.datasets import make_classification
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.experimental import enable_halving_search_cv  # noqa: F401  (makes the import below work)
from sklearn.model_selection import HalvingRandomSearchCV, StratifiedKFold, cross_val_score
from threadpoolctl import threadpool_limits

from mltask import run_task

SEED = 0
ROWS = 20_000
FOLDS = 3
FACTOR = 3
MIN_RESOURCE = 10
FIXED = {"early_stopping": False}  # else HGB holds out 10% of 20,000 rows and stops early: max_iter would not bind
SPACE = {
    "learning_rate": {"type": "float", "low": 0.01, "high": 0.5, "log": True},
    "max_leaf_nodes": {"type": "int", "low": 4, "high": 128, "log": True},
    "min_samples_leaf": {"type": "int", "low": 5, "high": 200, "log": True},
    "l2_regularization": {"type": "float", "low": 1e-6, "high": 10.0, "log": True},
}


@dataclass
class Setting:
    """One benchmark size: ``n_configs`` = FACTOR ** rungs-1, max resource = MIN_RESOURCE * the same."""

    rungs: int

    @property
    def n_configs(self) -> int:
        return FACTOR ** (self.rungs - 1)

    @property
    def max_resource(self) -> int:
        return MIN_RESOURCE * FACTOR ** (self.rungs - 1)

    @property
    def resources(self) -> list[int]:
        return [MIN_RESOURCE * FACTOR**k for k in range(self.rungs)]


@dataclass
class Run:
    """One mltask run: its timed seconds, configurations and when each full-resource score arrived."""

    seconds: float  # search + refit, as results.json times them
    configs: list[str]
    best: float
    timeline: list[tuple[float, float]] = field(default_factory=list)  # (seconds since run_task was called, score)
    last_settled: float = 0.0
    rung_evaluations: int = 0
    scores: dict[tuple[str, int], float] = field(default_factory=dict)  # (configuration, resource) -> mean score

    def best_at(self, seconds: float) -> float | None:
        scores = [s for t, s in self.timeline if t <= seconds]
        return max(scores) if scores else None

    def first_reaching(self, score: float) -> float | None:
        return next((t for t, s in sorted(self.timeline) if s >= score - 1e-12), None)


def _key(params: dict[str, Any]) -> str:
    """A configuration, without the fixed parameters and the resource, as comparable text."""
    return json.dumps({k: (v.item() if hasattr(v, "item") else v) for k, v in params.items()
                       if k in SPACE}, sort_keys=True)


def _task(setting: Setting, fidelity: bool, data: Path, verify: bool = True) -> dict[str, Any]:
    space: dict[str, Any] = {**SPACE, **FIXED}
    options: dict[str, Any] = {
        "estimator": "sklearn.ensemble.HistGradientBoostingClassifier", "dataset": {"npz": "data.npz"},
        "scoring": "accuracy", "cv": {"kind": "stratified", "folds": FOLDS, "shuffle": True, "seed": SEED},
        "algorithm": "random", "n_trials": setting.n_configs, "seed": SEED,
    }
    if fidelity:
        options["fidelity"] = {"resource": "max_iter", "min_resource": MIN_RESOURCE,
                               "max_resource": setting.max_resource, "reduction_factor": FACTOR, "schedule": "asha"}
    else:
        space["max_iter"] = setting.max_resource
    options["search_space"] = space
    if not verify:  # trusting its workers, as the peers do
        options["verification"] = {"verify_best": False, "budget": 0.0}
    # One configuration per subtask, as scikit-learn and Optuna dispatch single fits.
    return {"type": "ml_hyperparameter_search", "name": "bench-fidelity" if fidelity else "bench-full",
            "timeout": "01:00:00", "subtask_timeout": "00:30:00", "subtasks_count": setting.n_configs,
            "resources": [str(data)], "options": options}


def _settle_times(out: Path) -> dict[str, float]:
    with sqlite3.connect(f"file:{out / 'state.db'}?mode=ro", uri=True) as conn:
        return {sid: at for sid, at in conn.execute("SELECT subtask_id, finished_at FROM subtasks") if at is not None}


def run_mltask(task: dict[str, Any], data_dir: Path, max_resource: int) -> Run:
    """Run ``task`` on 2 local workers, default verification; when each full-resource score settled."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        started = time.time()
        run_task(task, workers=2, output=out, resources_root=data_dir, quiet=True)
        doc = json.loads((out / "results.json").read_text())
        settled = {sid: at - started for sid, at in _settle_times(out).items()}
    trials = [t for t in doc["trials"] if t["state"] in ("complete", "pruned")]
    timeline, evaluations, scores = [], 0, {}
    for trial in trials:
        rungs = trial.get("rungs")
        if rungs is None:  # full fidelity: the trial is its one evaluation
            timeline.append((trial["finished_at"] - started, trial["mean_test_score"]))
            continue
        evaluations += len(rungs)
        ok = [r for r in rungs if r["mean_score"] is not None]
        timeline += [(settled[r["subtask_id"]], r["mean_score"]) for r in ok if r["resource"] == max_resource]
        scores.update({(_key(trial["params"]), r["resource"]): r["mean_score"] for r in ok})
    best = doc["best"]
    assert not evaluations or best["resource"] == max_resource, "the reported best is not at max_resource"
    return Run(seconds=doc["timing"]["search_seconds"] + doc["timing"]["refit_seconds"],
               configs=sorted(_key(t["params"]) for t in doc["trials"]), best=best["mean_score"],
               timeline=timeline, last_settled=max(t["finished_at"] for t in trials) - started,
               rung_evaluations=evaluations, scores=scores)


def run_halving(configs: list[dict[str, Any]], setting: Setting, X: np.ndarray,
                y: np.ndarray) -> tuple[float, float, dict[tuple[str, int], float]]:
    """scikit-learn's HalvingRandomSearchCV on exactly ``configs``: (fit seconds, best_score_, scores as Run's)."""
    get_reusable_executor().shutdown(wait=True)  # cold start, as run_task's workers
    search = HalvingRandomSearchCV(
        HistGradientBoostingClassifier(random_state=SEED, **FIXED), [{k: [v] for k, v in c.items()} for c in configs],
        n_candidates=len(configs), factor=FACTOR, resource="max_iter", min_resources=MIN_RESOURCE,
        max_resources=setting.max_resource, cv=StratifiedKFold(FOLDS, shuffle=True, random_state=SEED),
        scoring="accuracy", n_jobs=2, random_state=SEED,
    )
    started = time.perf_counter()
    search.fit(X, y)
    seconds = time.perf_counter() - started
    assert search.n_resources_[-1] == setting.max_resource, f"scikit-learn stopped at {search.n_resources_}"
    assert len(set(map(_key, search.cv_results_["params"]))) == len(configs), "scikit-learn skipped candidates"
    res = search.cv_results_
    scores = {(_key(p), int(r)): float(m)
              for p, r, m in zip(res["params"], res["n_resources"], res["mean_test_score"], strict=True)}
    return seconds, float(search.best_score_), scores


def run_optuna(configs: list[dict[str, Any]], setting: Setting, X: np.ndarray,
               y: np.ndarray) -> tuple[float, list[tuple[float, float]]]:
    """Optuna's SuccessiveHalvingPruner, sequential: (wall seconds, (seconds, score) per complete trial)."""
    folds = StratifiedKFold(FOLDS, shuffle=True, random_state=SEED)
    timeline: list[tuple[float, float]] = []

    def objective(trial: optuna.Trial) -> float:
        params = configs[trial.number]
        for resource in setting.resources:
            model = HistGradientBoostingClassifier(max_iter=resource, random_state=SEED, **FIXED, **params)
            score = float(cross_val_score(model, X, y, cv=folds, scoring="accuracy").mean())
            trial.report(score, resource)
            if resource < setting.max_resource and trial.should_prune():
                raise optuna.TrialPruned()
        timeline.append((time.perf_counter() - started, score))
        return score

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=MIN_RESOURCE, reduction_factor=FACTOR)
    study = optuna.create_study(direction="maximize", pruner=pruner, sampler=optuna.samplers.RandomSampler(SEED))
    started = time.perf_counter()
    with threadpool_limits(1):
        study.optimize(objective, n_trials=len(configs))
    return time.perf_counter() - started, timeline


def _typed(configs: list[str]) -> list[dict[str, Any]]:
    """Configurations back from their text, with the space's types (an int parameter stays an int)."""
    out = []
    for text in configs:
        params = json.loads(text)
        out.append({k: (int(v) if SPACE[k]["type"] == "int" else float(v)) for k, v in params.items()})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="9 configurations, 3 rungs (10-90 iterations), 1 repeat")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    setting = Setting(rungs=3 if args.quick else 4)
    repeats = 1 if args.quick else args.repeats

    X, y = make_classification(n_samples=ROWS, n_features=20, n_informative=10, n_redundant=4, flip_y=0.05,
                               class_sep=0.8, random_state=SEED)
    with tempfile.TemporaryDirectory() as data_dir:
        np.savez(Path(data_dir) / "data.npz", X=X, y=y)  # a resource in a --resources-root
        data = Path(data_dir) / "data.npz"
        asha_task, full_task = _task(setting, True, data), _task(setting, False, data)
        trusting_task = _task(setting, True, data, verify=False)
        warm = run_mltask(asha_task, Path(data_dir), setting.max_resource)  # also: imports, file caches
        configs = _typed(warm.configs)
        print(f"{ROWS} rows, HGB max_iter {setting.resources}, factor {FACTOR}, {len(configs)} configurations, "
              f"{FOLDS}-fold CV, 2 workers; mltask on the local backend with default verification ON", flush=True)
        halving, asha, trusting, full, optuna_runs = [], [], [], [], []
        for _ in range(repeats):
            halving.append(run_halving(configs, setting, X, y))
            asha.append(run_mltask(asha_task, Path(data_dir), setting.max_resource))
            trusting.append(run_mltask(trusting_task, Path(data_dir), setting.max_resource))
            full.append(run_mltask(full_task, Path(data_dir), setting.max_resource))
            optuna_runs.append(run_optuna(configs, setting, X, y))
    for run in asha + trusting + full:
        assert run.configs == warm.configs, "mltask drew other configurations than in the warm-up run"
    med = statistics.median

    common = [(a.scores[k], h[2][k]) for a, h in zip(asha, halving, strict=True) for k in a.scores.keys() & h[2]]
    time_ratio = med(a.seconds for a in asha) / med(h[0] for h in halving)
    score_diff = med(a.best - h[1] for a, h in zip(asha, halving, strict=True))
    print(f"(a) vs HalvingRandomSearchCV(n_jobs=2): mltask {med(a.seconds for a in asha):.2f} s "
          f"({med(a.rung_evaluations for a in asha):.0f} rung evaluations), scikit-learn "
          f"{med(h[0] for h in halving):.2f} s -> wall-time ratio {time_ratio:.3f} (goal <= 1.0); best score "
          f"{med(a.best for a in asha):.4f} vs {med(h[1] for h in halving):.4f} (both at max_iter "
          f"{setting.max_resource}), median difference {score_diff:+.4f} (goal >= 0); the same (configuration, "
          f"max_iter) scored alike by both: {len(common)} pairs, max |difference| "
          f"{max((abs(x - y) for x, y in common), default=0.0):.1e}", flush=True)
    trusting_ratio = med(a.seconds for a in trusting) / med(h[0] for h in halving)
    print(f"(a) the same with verification off (trusting its workers, as scikit-learn does): mltask "
          f"{med(a.seconds for a in trusting):.2f} s -> wall-time ratio {trusting_ratio:.3f}; the difference is "
          "the best's full re-run at max_iter on the requestor after the search (the issue's own requirement), "
          "contender and warm-up checks", flush=True)

    reached = [a.first_reaching(f.best) for a, f in zip(asha, full, strict=True)]
    shares = [t / f.last_settled for t, f in zip(reached, full, strict=True) if t is not None]
    time_to_best = med(shares) if len(shares) == len(reached) else float("inf")
    print(f"(b) vs full-fidelity random search: its best {med(f.best for f in full):.4f} after "
          f"{med(f.last_settled for f in full):.2f} s; ASHA reached it in {len(shares)}/{len(reached)} runs, "
          f"median time share {time_to_best:.3f} (goal <= 0.40; inf: not reached in every run)", flush=True)

    diffs = []
    for a, (seconds, timeline) in zip(asha, optuna_runs, strict=True):
        ours = a.best_at(seconds)  # None: no full-resource score yet when Optuna had finished
        diffs.append((ours if ours is not None else -math.inf) - max(s for _, s in timeline))
    optuna_diff = med(diffs)
    print(f"(c) vs Optuna SuccessiveHalvingPruner, sequential: Optuna {med(s for s, _ in optuna_runs):.2f} s, best "
          f"{med(max(s for _, s in t) for _, t in optuna_runs):.4f}; mltask's best by then minus Optuna's: "
          f"median {optuna_diff:+.4f} (goal >= 0; -inf: none yet)", flush=True)
    print(f"fidelity: vs_halving_time={time_ratio:.2f} vs_halving_time_unverified={trusting_ratio:.2f} "
          f"score_diff={score_diff:+.4f} "
          f"vs_full_time_to_best={time_to_best:.2f} vs_optuna_score_diff={optuna_diff:+.4f}")


if __name__ == "__main__":
    main()
