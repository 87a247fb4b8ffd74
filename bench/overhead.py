"""Requestor overhead per trial: what mltask itself costs around each trivial trial.

2,000 trivial trials (DummyClassifier on iris, holdout), random search, 2 local workers.
The requestor's own CPU time (``time.process_time`` of this process: asking the sampler,
writing subtasks, reading and validating results, SQLite commits, verification, results
files) divided by the number of trials; the workers are other processes and not counted.
Target: <= 5 ms per trial. The peer is Optuna's own ask-and-tell loop around the same
sampler in memory, measured in the same run; TPE is printed for information.

    python bench/overhead.py [--trials N]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import optuna

from mltask import run_task


def _task(algorithm: str, n_trials: int) -> dict:
    return {
        "type": "ml_hyperparameter_search", "name": f"overhead-{algorithm}", "timeout": "01:00:00",
        "options": {
            "estimator": "sklearn.dummy.DummyClassifier", "dataset": {"builtin": "iris"},
            "search_space": {"strategy": ["most_frequent", "prior", "stratified", "uniform"],
                             "constant": {"type": "int", "low": 0, "high": 1000}},
            "cv": {"kind": "holdout"}, "algorithm": algorithm, "n_trials": n_trials, "seed": 0,
        },
    }


def mltask_cpu_per_trial(algorithm: str, n_trials: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        cpu, wall = time.process_time(), time.perf_counter()
        run_task(_task(algorithm, n_trials), workers=2, output=Path(tmp) / "o", quiet=True)
        return (time.process_time() - cpu) / n_trials * 1e3, (time.perf_counter() - wall) / n_trials * 1e3


def optuna_ms_per_trial(algorithm: str, n_trials: int) -> float:
    """Optuna's in-memory ask/tell for the same space, with a constant objective."""
    sampler = optuna.samplers.RandomSampler(seed=0) if algorithm == "random" else optuna.samplers.TPESampler(seed=0)
    study = optuna.create_study(sampler=sampler, direction="maximize")
    dists = {"strategy": optuna.distributions.CategoricalDistribution(["most_frequent", "prior", "stratified",
                                                                      "uniform"]),
             "constant": optuna.distributions.IntDistribution(0, 1000)}
    started = time.process_time()
    for _ in range(n_trials):
        trial = study.ask(dists)
        study.tell(trial, 0.5)
    return (time.process_time() - started) / n_trials * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=2000)
    parser.add_argument("--tpe-trials", type=int, default=500)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for algorithm, n in (("random", args.trials), ("tpe", args.tpe_trials)):
        cpu, wall = mltask_cpu_per_trial(algorithm, n)
        peer = optuna_ms_per_trial(algorithm, n)
        target = " (target <= 5 ms)" if algorithm == "random" else ""
        print(f"{algorithm}, {n} trivial trials: mltask requestor CPU {cpu:.2f} ms/trial{target}, "
              f"wall {wall:.2f} ms/trial; Optuna in-memory ask+tell {peer:.2f} ms/trial; "
              f"ratio {cpu / peer:.1f}x", flush=True)


if __name__ == "__main__":
    main()
