"""Results in the output dir: a flat trial table like ``cv_results_``, the best config, the model.

Everything is derived from the store, so ``mltask tasks show`` and a finished run print the
same thing, and results can be rewritten at any time from the state file alone.
"""

from __future__ import annotations

import bisect
import csv
import json
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mltask.definition import CVSpec, DatasetSpec, PipelineSpec
from mltask.errors import one_line
from mltask.estimators import EstimatorObject, describe
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
    parameters: list[str]  # the search space's names, in its order
    estimator: str  # what was tuned: an import path, pipeline steps or a training script
    dataset: str
    cv: str
    max_resource: float | None = None  # multi-fidelity: the resource complete trials were scored at

    @property
    def complete(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["state"] == "complete"]

    @property
    def best(self) -> dict[str, Any] | None:
        """The first-ranked trial; of several tied, the one the verifier checked most."""
        checked = {"full": 0, "cross": 1, "spot": 1}
        ranked = sorted(self.complete, key=lambda r: (r["rank_test_score"], checked.get(r["verified"], 2), r["number"]))
        return ranked[0] if ranked else None

    def counts(self) -> dict[str, int]:
        states = [r["state"] for r in self.rows]
        counted = ("complete", "failed", "running") + (("pruned",) if self.max_resource is not None else ())
        return {s: states.count(s) for s in counted} | {"planned": self.n_trials}

    @property
    def param_names(self) -> list[str]:
        """The parameters any trial has, conditional ones included (blank where inactive)."""
        present = {name for r in self.rows for name in r["params"]}
        return [n for n in self.parameters if n in present] + sorted(present - set(self.parameters))

    def errors(self) -> list[tuple[str, int]]:
        """Each distinct error of the failed trials and how many trials it failed, most common first."""
        return Counter(r["error"] or "no error text" for r in self.rows if r["state"] == "failed").most_common()

    def warnings(self) -> list[str]:
        """What a reader must know before trusting the reported best configuration."""
        best = self.best
        if not self.verification["best_check"]:
            return ["the best configuration was NOT verified (verification.verify_best is false); "
                    "a provider could have faked it."]
        if best is None or best["verified"] == "full":
            return []
        how = {"spot": "only spot-checked", "cross": "only cross-checked"}.get(best["verified"], "never re-run")
        return [f"the reported best (trial {best['number']}) was not re-run in full ({how}): the search ended "
                f"({self.status}) before its final check; resume the task to verify it (`mltask tasks resume DIR`)."]


def summarize(store: Store, status: str) -> Summary:
    meta = store.meta()
    definition = json.loads(meta["definition"])
    problem = Problem.model_validate_json(meta["problem"])
    direction = meta["direction"]
    max_resource = json.loads(meta["max_resource"]) if "max_resource" in meta else None
    climbed = _rungs(store) if max_resource is not None else None
    rows = [_row(t, None if climbed is None else climbed.get(t.number, [])) for t in store.trials()]
    _rank(rows, direction)
    return Summary(
        task_id=meta["task_id"],
        name=definition["name"],
        algorithm=definition["options"]["algorithm"],
        scoring=problem.scoring or f"score returned by {problem.script.file if problem.script else 'the script'}",
        direction=direction,
        n_trials=int(meta["n_trials"]),
        status=status,
        rows=rows,
        verification=_verification(store, definition["options"].get("verification") or {}),
        costs=json.loads(store.meta_value("costs") or "{}"),
        parameters=list(definition["options"]["search_space"]),
        estimator=_describe_estimator(problem),
        dataset=_describe_dataset(problem.dataset),
        cv=_describe_cv(problem.cv),
        max_resource=max_resource,
    )


def _rungs(store: Store) -> dict[int, list[dict[str, Any]]]:
    """Multi-fidelity: every accepted rung evaluation of each trial, lowest rung first (results.json's ``rungs``)."""
    climbed: dict[int, list[dict[str, Any]]] = {}
    for rung in store.rungs():
        climbed.setdefault(rung["number"], []).append({
            "rung": rung["rung"], "resource": rung["resource"], "mean_score": rung["value"],
            "status": rung["decision"], "subtask_id": rung["subtask_id"], "provider": rung["provider"],
            "verified": rung["verified"] or "none",
        })
    return climbed


def _describe_estimator(problem: Problem) -> str:
    if problem.script is not None:
        return f"training script {problem.script.file} ({problem.script.function})"
    spec = problem.estimator
    if isinstance(spec, EstimatorObject):
        return describe(spec)
    if isinstance(spec, PipelineSpec):
        return "pipeline " + " → ".join(f"{name}: {path}" for name, path in spec.pipeline)
    return str(spec)


def _describe_dataset(spec: DatasetSpec) -> str:
    if spec.builtin:
        return f"{spec.builtin} (scikit-learn built-in)"
    return f"{spec.csv} (target column {spec.target})" if spec.csv else str(spec.npz)


def _describe_cv(cv: CVSpec) -> str:
    size = cv.test_size or (0.25 if cv.kind == "holdout" else None)
    held = "" if size is None else f"{size:.0%}" if isinstance(size, float) else f"{size} rows"
    if cv.kind == "holdout":
        split = f"holdout, {held} for validation"
    elif cv.kind.endswith("shuffle_split"):
        split = f"{cv.kind}, {cv.folds} splits" + (f" of {held} for validation" if held else "")
    else:
        split = f"{cv.kind} {cv.folds}-fold" + (f" x {cv.repeats}" if cv.kind.startswith("repeated") else "")
    if cv.kind == "timeseries":
        return f"{split}, in time order"
    random = cv.shuffle or cv.kind.startswith("repeated") or cv.kind.endswith("shuffle_split")
    return f"{split}, shuffled with seed {cv.seed}" if random else f"{split}, not shuffled"


def _verification(store: Store, options: dict[str, Any]) -> dict[str, Any]:
    """How trials were verified, rejections, bans, and what verification cost.

    Compute is the requestor's own measurement (the time each subtask was out, and its
    re-runs), never a provider's claim; ``overhead`` is all verification compute, wherever
    it ran, over the compute of the accepted search subtasks.
    """
    trials = store.trials()
    settled = [t for t in trials if t.state in ("complete", "failed", "pruned")]
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


def _row(trial: Any, climbed: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """One trial's columns; with ``climbed`` (multi-fidelity) also its highest rung and resource.

    A multi-fidelity trial's scores are those of its highest rung.
    """
    result = trial.result or {}
    row: dict[str, Any] = {"number": trial.number, "state": trial.state}
    if climbed is not None:
        row.update(rung=climbed[-1]["rung"] if climbed else None, resource=climbed[-1]["resource"] if climbed else None)
    row.update({f"param_{k}": v for k, v in trial.params.items()})
    row["mean_test_score"] = result.get("mean_score")
    row["std_test_score"] = result.get("std_score")
    for i, score in enumerate(result.get("fold_scores", [])):
        row[f"split{i}_test_score"] = score
    # With several metrics (and training scores), each gets its columns, named as in cv_results_.
    for prefix, lists in (("test", result.get("metric_scores") or {}), ("train", result.get("train_scores") or {})):
        for name, scores in lists.items():
            row[f"mean_{prefix}_{name}"] = float(np.mean(scores))
            row[f"std_{prefix}_{name}"] = float(np.std(scores))
            row.update({f"split{i}_{prefix}_{name}": score for i, score in enumerate(scores)})
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
    if climbed is not None:
        row["rungs"] = climbed
    return row


def _rank(rows: list[dict[str, Any]], direction: str) -> None:
    # scikit-learn's rank_test_score: 1 is best, ties share the lower rank. A failed or unfinished
    # trial has no rank (scikit-learn ranks failures last, all of them 1 when every fit failed).
    # Means are rounded first so that float noise (0.9466...669 vs ...667) does not split a tie.
    sign = -1.0 if direction == "maximize" else 1.0
    key = {id(r): round(sign * r["mean_test_score"], 12) for r in rows if r["state"] == "complete"}
    order = sorted(key.values())
    for row in rows:
        row["rank_test_score"] = bisect.bisect_left(order, key[id(row)]) + 1 if id(row) in key else None


def write_results(output_dir: Path, summary: Summary, extra: dict[str, Any] | None = None,
                  extra_warnings: list[str] | None = None) -> None:
    """``results.json``, ``results.csv`` and ``best.json``; ``extra_warnings`` add to the summary's own."""
    best = summary.best
    document = {
        "task_id": summary.task_id,
        "name": summary.name,
        "status": summary.status,
        "algorithm": summary.algorithm,
        "estimator": summary.estimator,
        "dataset": summary.dataset,
        "cv": summary.cv,
        "scoring": summary.scoring,
        "direction": summary.direction,
        "counts": summary.counts(),
        "best": _best_record(summary),
        "warnings": summary.warnings() + (extra_warnings or []),
        "errors": [
            {"error": error, "count": count,
             "trials": [r["number"] for r in summary.rows if r["state"] == "failed" and r["error"] == error]}
            for error, count in summary.errors()
        ],
        "verification": summary.verification,
        "costs": summary.costs,
        **(extra or {}),
        "trials": [{k: v for k, v in r.items() if not k.startswith("param_")} for r in summary.rows],
    }
    write_json_atomic(output_dir / RESULTS_JSON, json.dumps(document, indent=1))
    write_json_atomic(output_dir / BEST_JSON, json.dumps(_best_record(summary), indent=1))
    columns: list[str] = []
    for row in summary.rows:
        columns += [k for k in row if k not in columns and k not in ("params", "rungs")]
    with open(output_dir / RESULTS_CSV, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows({k: _csv_cell(v) for k, v in r.items() if k not in ("params", "rungs")} for r in summary.rows)
    if best is None:
        (output_dir / BEST_JSON).unlink()


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _csv_cell(value: Any) -> Any:
    """OWASP's defence against CSV injection: text a spreadsheet would run as a formula gets a leading quote.

    Provider-written text (an error message) lands in this file, and ``=HYPERLINK(...)`` in a
    cell runs when the file is opened. Numbers, and text that is a number (``-0.5``), stay as they are.
    """
    if not isinstance(value, str) or not value.startswith(_FORMULA_START):
        return value
    try:
        float(value)
    except ValueError:
        return "'" + value
    return value


def format_value(value: Any) -> str:
    """A parameter value for people: floats to 6 significant digits, anything else as it is."""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _best_record(summary: Summary) -> dict[str, Any] | None:
    best = summary.best
    if best is None:
        return None
    return {
        "number": best["number"],
        "params": best["params"],
        "mean_score": best["mean_test_score"],
        "std_score": best["std_test_score"],
        "verified": best["verified"],
        "scoring": summary.scoring,
        "direction": summary.direction,
        **({"resource": summary.max_resource} if summary.max_resource is not None else {}),
    }


def refit_best(
    output_dir: Path, problem: Problem, summary: Summary, resources_dir: Path
) -> tuple[Path | None, list[str]]:
    """Fit the best configuration on all the data, on the requestor, and save it with joblib.

    Scripts return scores, not models, so only estimator tasks get a refit model. The fit
    has one BLAS/OpenMP thread, as every trial had (an estimator's own ``n_jobs`` is left as
    configured); its warnings (a ``ConvergenceWarning``...) are returned, each distinct one
    once, instead of being printed in the middle of the output.
    """
    best = summary.best
    if best is None or problem.estimator is None:
        return None, []
    import joblib

    from mltask.data import load_dataset
    from mltask.problem import build_estimator, trial_params
    from mltask.provider import one_thread

    data = load_dataset(problem.dataset, resources_dir)
    model = build_estimator(problem)
    # Multi-fidelity: a parameter resource at its maximum, as the best was scored (n_samples: all rows).
    spec = TrialSpec(number=best["number"], params=best["params"], seed=best["seed"], resource=summary.max_resource)
    with warnings.catch_warnings(record=True) as caught, one_thread():
        warnings.simplefilter("always")
        model.set_params(**trial_params(model, spec, problem.resource)).fit(data.X, data.y)
    path = output_dir / MODEL_FILE
    joblib.dump(model, path)
    said = dict.fromkeys(f"refit: {w.category.__name__}: {one_line(str(w.message), 200)}" for w in caught)
    return path, list(said)
