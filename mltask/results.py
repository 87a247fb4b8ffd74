"""Results in the output dir: a flat trial table like ``cv_results_``, the best config, the model.

Everything is derived from the store, so ``mltask tasks show`` and a finished run print the
same thing, and results can be rewritten at any time from the state file alone.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mltask.protocol import Problem, TrialSpec, write_json_atomic
from mltask.store import Store

RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"
BEST_JSON = "best.json"
MODEL_FILE = "model.joblib"


@dataclass(frozen=True)
class Summary:
    """What a search produced, as read back from its store."""

    task_id: str
    name: str
    algorithm: str
    scoring: str
    direction: str
    n_trials: int
    status: str
    rows: list[dict[str, Any]]
    verification: dict[str, Any]
    costs: dict[str, Any]  # GLM per provider and subtask (golem backend); empty elsewhere

    @property
    def complete(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["state"] == "complete"]

    @property
    def best(self) -> dict[str, Any] | None:
        ranked = sorted(self.complete, key=lambda r: r["rank_test_score"])
        return ranked[0] if ranked else None

    def counts(self) -> dict[str, int]:
        states = [r["state"] for r in self.rows]
        return {s: states.count(s) for s in ("complete", "failed", "running")} | {"planned": self.n_trials}


def summarize(store: Store, status: str) -> Summary:
    meta = store.meta()
    definition = json.loads(meta["definition"])
    problem = Problem.model_validate_json(meta["problem"])
    direction = meta["direction"]
    rows = [_row(t) for t in store.trials()]
    _rank(rows, direction)
    return Summary(
        task_id=meta["task_id"],
        name=definition["name"],
        algorithm=definition["options"]["algorithm"],
        scoring=problem.scoring or f"script ({direction})",
        direction=direction,
        n_trials=int(meta["n_trials"]),
        status=status,
        rows=rows,
        verification=_verification(store, definition["options"].get("verification") or {}),
        costs=json.loads(store.meta_value("costs") or "{}"),
    )


def _verification(store: Store, options: dict[str, Any]) -> dict[str, Any]:
    """How trials were verified, rejections, bans, and what verification cost.

    Compute is the requestor's own measurement (the time each subtask was out, and its
    re-runs), never a provider's claim; ``overhead`` is all verification compute, wherever
    it ran, over the compute of the accepted search subtasks.
    """
    trials = store.trials()
    settled = [t for t in trials if t.state in ("complete", "failed")]
    subtasks = {s["subtask_id"]: s for s in store.subtasks()}
    verdicts = store.verdicts()
    rejected = {v["subtask_id"] for v in verdicts if not v["ok"]}
    compute = store.compute_seconds()
    spent = compute["check"] + compute["requestor"]
    return {
        "verified_full": sum(t.verified == "full" for t in settled),
        "verified_spot": sum(t.verified == "spot" for t in settled),
        "verified_cross": sum(t.verified == "cross" for t in settled),
        "unverified": sum(t.verified is None for t in settled),
        "rejected_trials": sum(len(json.loads(subtasks[s]["trial_numbers"])) for s in rejected if s in subtasks),
        "rejected_subtasks": len(rejected),
        "banned_providers": store.bans(),
        "dropped_providers": json.loads(store.meta_value("dropped") or "{}"),
        "useful_seconds": round(compute["useful"], 4),
        "check_seconds": round(compute["check"], 4),
        "requestor_seconds": round(compute["requestor"], 4),
        "overhead": round(spent / compute["useful"], 4) if compute["useful"] else 0.0,
        "best_check": options.get("verify_best", True),
        "budget": options.get("budget", 0.05),
    }


def _row(trial: Any) -> dict[str, Any]:
    result = trial.result or {}
    row: dict[str, Any] = {"number": trial.number, "state": trial.state}
    row.update({f"param_{k}": v for k, v in trial.params.items()})
    row["mean_test_score"] = result.get("mean_score")
    row["std_test_score"] = result.get("std_score")
    for i, score in enumerate(result.get("fold_scores", [])):
        row[f"split{i}_test_score"] = score
    for kind in ("fit", "score"):
        times = result.get(f"{kind}_times") or []
        row[f"mean_{kind}_time"] = float(np.mean(times)) if times else None
        row[f"std_{kind}_time"] = float(np.std(times)) if times else None
    row.update(
        seed=trial.seed,
        subtask=trial.subtask_id,
        provider=trial.provider,
        verified=trial.verified or "none",
        fingerprint=result.get("fingerprint"),
        error=result.get("error"),
        params=trial.params,
        finished_at=trial.finished_at,
    )
    return row


def _rank(rows: list[dict[str, Any]], direction: str) -> None:
    # scikit-learn's rank_test_score: 1 is best, ties share the lower rank, failures last.
    # Means are rounded first so that float noise (0.9466...669 vs ...667) does not split a tie.
    sign = -1.0 if direction == "maximize" else 1.0
    scores = [round(sign * r["mean_test_score"], 12) if r["state"] == "complete" else math.inf for r in rows]
    order = sorted(scores)
    for row, score in zip(rows, scores, strict=True):
        row["rank_test_score"] = order.index(score) + 1


def write_results(output_dir: Path, summary: Summary, extra: dict[str, Any] | None = None) -> None:
    """``results.json``, ``results.csv`` and ``best.json``."""
    best = summary.best
    document = {
        "task_id": summary.task_id,
        "name": summary.name,
        "status": summary.status,
        "algorithm": summary.algorithm,
        "scoring": summary.scoring,
        "direction": summary.direction,
        "counts": summary.counts(),
        "best": _best_record(summary),
        "verification": summary.verification,
        "costs": summary.costs,
        **(extra or {}),
        "trials": [{k: v for k, v in r.items() if not k.startswith("param_")} for r in summary.rows],
    }
    write_json_atomic(output_dir / RESULTS_JSON, json.dumps(document, indent=1))
    write_json_atomic(output_dir / BEST_JSON, json.dumps(_best_record(summary), indent=1))
    columns: list[str] = []
    for row in summary.rows:
        columns += [k for k in row if k not in columns and k != "params"]
    with open(output_dir / RESULTS_CSV, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows({k: v for k, v in r.items() if k != "params"} for r in summary.rows)
    if best is None:
        (output_dir / BEST_JSON).unlink()


def _best_record(summary: Summary) -> dict[str, Any] | None:
    best = summary.best
    if best is None:
        return None
    return {
        "number": best["number"],
        "params": best["params"],
        "mean_score": best["mean_test_score"],
        "std_score": best["std_test_score"],
        "scoring": summary.scoring,
        "direction": summary.direction,
    }


def refit_best(output_dir: Path, problem: Problem, summary: Summary, resources_dir: Path) -> Path | None:
    """Fit the best configuration on all the data, on the requestor, and save it with joblib.

    Scripts return scores, not models, so only estimator tasks get a refit model.
    """
    best = summary.best
    if best is None or problem.estimator is None:
        return None
    import joblib

    from mltask.data import load_dataset
    from mltask.problem import build_estimator, trial_params

    data = load_dataset(problem.dataset, resources_dir)
    model = build_estimator(problem)
    spec = TrialSpec(number=best["number"], params=best["params"], seed=best["seed"])
    model.set_params(**trial_params(model, spec)).fit(data.X, data.y)
    path = output_dir / MODEL_FILE
    joblib.dump(model, path)
    return path
