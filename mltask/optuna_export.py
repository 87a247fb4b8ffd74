"""A task's trials as an Optuna study, so Optuna's own tools work on mltask's results.

``mltask tasks export DIR --optuna FILE`` writes the study to a JournalStorage file (or
SQLite, for a ``.db`` / ``.sqlite`` / ``.sqlite3`` name), which ``optuna-dashboard FILE``,
``optuna.visualization`` and ``optuna.importance`` open; ``RunResult.trials_dataframe()`` and
``GolemSearchCV.trials_dataframe()`` give Optuna's ``trials_dataframe()`` of the same study
(its value column is named after the metric, ``value_accuracy``, as Optuna names it).

Each settled trial becomes a finished Optuna trial: its sampled parameters with their
distributions (the task's search space, so importance and the dashboard's slice plots know
the ranges), its mean score as the value (``FAIL`` for a failed trial), its start (when its
subtask was sent) and end, and as user attributes what ``results.csv`` holds besides:
every metric's mean, deviation and fold scores, times, seed, provider, how it was verified,
the error of a failed trial, and fixed parameters. The study is built from the state file
alone, like every other result.
"""

from __future__ import annotations

import datetime
import json
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from mltask.definition import TaskDefinition
from mltask.errors import TaskError
from mltask.outdir import STATE_FILE
from mltask.results import summarize
from mltask.store import Store, state_errors

_SQLITE = (".db", ".sqlite", ".sqlite3")
_NOT_ATTRS = {"params", "state", "number", "finished_at"}


def build_study(output_dir: Path, storage: Any = None) -> optuna.Study:
    """The task in ``output_dir`` as an Optuna study in ``storage`` (default: in memory)."""
    store = Store.open(Path(output_dir) / STATE_FILE)
    try:
        with state_errors(store.path):
            meta = store.meta()
            summary = summarize(store, meta.get("status", "running"))
            sent = {s["subtask_id"]: s["created_at"] for s in store.subtasks()}
    finally:
        store.close()
    space = TaskDefinition.model_validate_json(meta["definition"]).options.search_space
    distributions = space.distributions()
    fixed = space.fixed_values()
    study = optuna.create_study(storage=storage, study_name=f"{summary.name}-{summary.task_id}",
                                direction=summary.direction)
    with warnings.catch_warnings():  # experimental since Optuna 3.2, and what the dashboard labels its axes with
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([summary.scoring])
    study.set_user_attr("mltask_task_id", summary.task_id)
    study.set_user_attr("mltask_algorithm", summary.algorithm)
    study.set_user_attr("mltask_status", summary.status)
    trials = []
    for row in summary.rows:
        if row["state"] not in ("complete", "failed", "pruned"):
            continue
        params = space.optuna_params(row["params"])
        attrs = {k: v for k, v in row.items() if k not in _NOT_ATTRS and not k.startswith("param_") and v is not None}
        attrs.update({f"fixed_{name}": value for name, value in fixed.items()}, mltask_number=row["number"])
        state = _STATES[row["state"]]
        trials.append(FrozenTrial(
            number=len(trials), state=state, value=None if state == TrialState.FAIL else row["mean_test_score"],
            values=None, datetime_start=_time(sent.get(row["subtask"]) or row["finished_at"]),
            datetime_complete=_time(row["finished_at"]), params=params,
            distributions={name: distributions[name] for name in params}, user_attrs=attrs, system_attrs={},
            intermediate_values=_learning_curve(attrs.pop("rungs", [])), trial_id=len(trials),
        ))
    study.add_trials(trials)
    return study


_STATES = {"complete": TrialState.COMPLETE, "failed": TrialState.FAIL, "pruned": TrialState.PRUNED}


def _learning_curve(rungs: list[dict[str, Any]]) -> dict[int, float]:
    """Multi-fidelity: each rung's score at its resource (Optuna's steps are whole numbers; else the rung's index)."""
    whole = all(float(r["resource"]).is_integer() for r in rungs)
    return {int(r["resource"]) if whole else r["rung"]: r["mean_score"] for r in rungs if r["mean_score"] is not None}


def _time(stamp: float | None) -> datetime.datetime | None:
    return None if stamp is None else datetime.datetime.fromtimestamp(stamp)


def export_study(output_dir: Path, file: Path) -> optuna.Study:
    """Write the task's study to ``file``: SQLite for ``.db`` / ``.sqlite`` / ``.sqlite3``, else an Optuna journal."""
    if file.exists():
        raise TaskError("--optuna", f"{file} exists; give a new file name (an export never overwrites)")
    if not file.parent.is_dir():
        raise TaskError("--optuna", f"{file.parent} is not a directory; create it first")
    if file.suffix in _SQLITE:
        storage: Any = optuna.storages.RDBStorage(f"sqlite:///{file.resolve()}")
    else:
        from optuna.storages.journal import JournalFileBackend

        storage = optuna.storages.JournalStorage(JournalFileBackend(str(file)))
    return build_study(output_dir, storage)


def trials_dataframe(output_dir: Path) -> Any:
    """Optuna's ``trials_dataframe()`` of the task in ``output_dir`` (a pandas DataFrame)."""
    return build_study(output_dir).trials_dataframe()


def describe_export(study: optuna.Study, file: Path) -> str:
    """What the CLI says after an export: where it is and how to open it."""
    where = f"sqlite:///{file}" if file.suffix in _SQLITE else str(file)
    complete = sum(t.state == TrialState.COMPLETE for t in study.trials)
    return (f"wrote study {study.study_name!r} ({complete} complete of {len(study.trials)} trials) to {file}; "
            f"open it with `optuna-dashboard {where}` or optuna.load_study(study_name="
            f"{json.dumps(study.study_name)}, storage=...)")
