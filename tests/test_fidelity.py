"""Multi-fidelity search (``options.fidelity``): rungs, promotion, the resource on providers, results."""

from __future__ import annotations

import collections
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest

from mltask import run_task
from mltask.definition import FidelitySpec, parse_definition
from mltask.fidelity import RungSchedule, rung_resources
from mltask.protocol import SubtaskDefinition, TrialSpec, dumps
from mltask.provider import evaluate_subtask
from mltask.task import HyperparameterSearchTask
from tests.support import results, run_cli, task_dict, write_task

HGB = "sklearn.ensemble.HistGradientBoostingClassifier"


def fidelity_task(algorithm: str = "random", n_trials: int = 9, **fidelity: Any) -> dict[str, Any]:
    """HistGradientBoosting on breast cancer with ``max_iter`` as the resource (or ``fidelity``'s)."""
    space: dict[str, Any] = {"learning_rate": {"type": "float", "low": 0.01, "high": 0.5, "log": True},
                             "max_leaf_nodes": {"type": "int", "low": 4, "high": 16}}
    if algorithm == "grid":
        space = {"learning_rate": [0.01, 0.1, 0.4], "max_leaf_nodes": [4, 16]}
    spec = {"resource": "max_iter", "min_resource": 2, "max_resource": 18, "reduction_factor": 3} | fidelity
    task = task_dict(estimator=HGB, dataset={"builtin": "breast_cancer"}, search_space=space, algorithm=algorithm,
                     n_trials=None if algorithm == "grid" else n_trials, fidelity=spec)
    task["subtasks_count"] = 3
    return task


# -- the rungs and the promotion rule ----------------------------------------------------------------


def test_rungs_grow_by_the_factor_and_end_at_the_maximum() -> None:
    assert rung_resources(10, 270, 3) == [10, 30, 90, 270]
    assert rung_resources(200, 1000, 3) == [200, 600, 1000]
    assert rung_resources(0.1, 1.0, 2) == [0.1, 0.2, 0.4, 0.8, 1.0]


@pytest.mark.parametrize("factor", [2, 3, 4])
def test_asha_promotes_about_one_in_factor_of_each_rung(factor: int) -> None:
    """Optuna's SuccessiveHalvingPruner, fed through our steps, judges each rung where we mean it to."""
    schedule = RungSchedule(FidelitySpec(resource="max_iter", min_resource=1, max_resource=factor**3,
                                         reduction_factor=factor), factor**3)
    study = optuna.create_study(direction="maximize", pruner=schedule.pruner())
    rng = np.random.default_rng(0)
    reached = []
    for _ in range(600):
        trial = study.ask()
        quality, rung = rng.random(), 0
        while (decision := schedule.decide(study, trial.number, rung, quality + rung)) == "promoted":
            assert schedule.take(5) == [(trial.number, rung + 1)]
            rung += 1
        reached.append(rung)
        study.tell(trial.number, quality) if decision == "complete" else study.tell(
            trial.number, state=optuna.trial.TrialState.PRUNED)
    at_least = [sum(r >= k for r in reached) for k in range(4)]
    for k in (1, 2):  # about 1 / factor: the eager rule promotes early arrivals, the rest are ranked
        assert 0.8 / factor <= at_least[k] / at_least[k - 1] < 1.5 / factor, at_least


def test_hyperband_starts_each_bracket_at_its_own_rung() -> None:
    schedule = RungSchedule(FidelitySpec(resource="max_iter", min_resource=1, max_resource=27, schedule="hyperband"),
                            27)
    study = optuna.create_study(direction="maximize", pruner=schedule.pruner(), study_name="s")
    starts = collections.Counter(schedule.first_rung(study, study.ask().number) for _ in range(400))
    assert set(starts) == {0, 1, 2, 3} and starts[0] > starts[1] > starts[3]
    again = optuna.create_study(direction="maximize", pruner=schedule.pruner(), study_name="s")
    assert [schedule.first_rung(again, again.ask().number) for _ in range(50)] == [
        schedule.first_rung(study, n) for n in range(50)]  # a rebuilt study agrees


# -- what providers compute -----------------------------------------------------------------------


def _subtask(task: HyperparameterSearchTask, resource: float) -> SubtaskDefinition:
    spec = TrialSpec(number=0, params={"learning_rate": 0.1, "max_leaf_nodes": 8}, seed=7, resource=resource)
    return SubtaskDefinition(task_id=task.task_id, subtask_id="s1", problem=task.problem, trials=[spec])


@pytest.mark.parametrize("resource", ["max_iter", "n_samples"])
def test_a_rung_evaluation_is_bit_for_bit_the_same_in_a_fresh_process(resource: str, tmp_path: Path) -> None:
    bounds = {"min_resource": 2, "max_resource": 18} if resource == "max_iter" else {"min_resource": 40,
                                                                                       "max_resource": None}
    task = HyperparameterSearchTask.create(parse_definition(fidelity_task(resource=resource, **bounds)), tmp_path,
                                           tmp_path / "out")
    low, high = (6, 18) if resource == "max_iter" else (60, 379)
    small, large = (evaluate_subtask(_subtask(task, r), task.resources_dir).trials[0] for r in (low, high))
    assert small.status == large.status == "ok" and small.fold_scores != large.fold_scores
    again = evaluate_subtask(_subtask(task, low), task.resources_dir).trials[0]
    subtask = _subtask(task, low)
    (tmp_path / "subtask.json").write_text(dumps(subtask))
    code = ("import sys; from pathlib import Path; from mltask.protocol import SubtaskDefinition, dumps;"
            "from mltask.provider import evaluate_subtask;"
            "s = SubtaskDefinition.model_validate_json(Path(sys.argv[1]).read_text());"
            "print(dumps(evaluate_subtask(s, Path(sys.argv[2])).trials[0]))")
    fresh = subprocess.run([sys.executable, "-c", code, str(tmp_path / "subtask.json"), str(task.resources_dir)],
                           capture_output=True, text=True, check=True).stdout
    for other in (again, json.loads(fresh)):
        other = other if isinstance(other, dict) else other.model_dump(mode="json")
        assert other["fold_scores"] == small.fold_scores and other["fold_fingerprints"] == small.fold_fingerprints


def test_n_samples_subsamples_each_training_fold_stratified(tmp_path: Path) -> None:
    from mltask.problem import subsample

    y = np.array([0] * 90 + [1] * 30)
    rows = subsample(np.arange(120), y, 40, seed=3, fold=1, stratify=True)
    assert len(set(rows.tolist())) == 40 and np.bincount(y[rows]).tolist() == [30, 10]
    assert subsample(np.arange(120), y, 40, 3, 1, True).tolist() == rows.tolist()
    assert subsample(np.arange(120), y, 40, 3, 2, True).tolist() != rows.tolist()  # another fold, other rows
    assert subsample(np.arange(30), y, 40, 3, 1, True).tolist() == list(range(30))  # a smaller fold is whole


def test_the_wire_is_unchanged_without_fidelity() -> None:
    """Other tasks' subtasks, stored problems and hashes stay byte for byte as before the feature."""
    spec = TrialSpec(number=1, params={"C": 1.0}, seed=2)
    assert dumps(spec) == '{"number":1,"params":{"C":1.0},"seed":2,"folds":null}'
    assert json.loads(dumps(spec.model_copy(update={"resource": 30})))["resource"] == 30
    assert TrialSpec.model_validate_json(dumps(spec.model_copy(update={"resource": 30}))).resource == 30


# -- end to end -----------------------------------------------------------------------------------


def _check_climb(out: Path, top: float) -> dict[str, Any]:
    """Every trial settled; rungs contiguous; only complete trials rank, each measured at the top."""
    doc = results(out)
    assert doc["status"] == "finished" and doc["counts"]["running"] == 0
    assert doc["counts"]["complete"] + doc["counts"]["pruned"] == doc["counts"]["planned"]
    for trial in doc["trials"]:
        rungs = trial["rungs"]
        assert [r["rung"] for r in rungs] == list(range(rungs[0]["rung"], rungs[0]["rung"] + len(rungs)))
        assert all(r["status"] == "promoted" for r in rungs[:-1])
        assert rungs[-1]["status"] == trial["state"] and trial["resource"] == rungs[-1]["resource"]
        assert trial["mean_test_score"] == rungs[-1]["mean_score"]
        assert (trial["resource"] == top) == (trial["state"] == "complete")
    best = json.loads((out / "best.json").read_text())
    assert best["resource"] == top and best["verified"] == "full"
    assert doc["trials"][best["number"]]["state"] == "complete"
    return doc


@pytest.mark.parametrize("algorithm", ["random", "qmc", "tpe", "cmaes", "grid"])
def test_every_sampler_climbs_the_rungs(algorithm: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_task(fidelity_task(algorithm), workers=2, output=out, quiet=True)
    doc = _check_climb(out, 18)
    assert doc["counts"]["planned"] == (6 if algorithm == "grid" else 9)
    assert doc["counts"]["pruned"] >= 1, "nothing was stopped early"
    header = (out / "results.csv").read_text().splitlines()[0].split(",")
    assert header[:4] == ["number", "state", "rung", "resource"] and "rungs" not in header
    if algorithm == "random":  # Optuna's view: pruned trials with their learning curves
        from mltask.optuna_export import build_study

        study = build_study(out)
        states = collections.Counter(t.state.name for t in study.trials)
        assert states == {"COMPLETE": doc["counts"]["complete"], "PRUNED": doc["counts"]["pruned"]}
        assert all(max(t.intermediate_values) == 18 for t in study.trials if t.state.name == "COMPLETE")


def test_hyperband_and_n_samples_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "out"
    task = fidelity_task("random", 12, resource="n_samples", min_resource=40, max_resource=None,
                         schedule="hyperband")
    run_task(task, workers=2, output=out, quiet=True)
    doc = _check_climb(out, 379)  # breast cancer: 569 rows, 3 folds, 379 or 380 training rows
    assert {t["rungs"][0]["rung"] for t in doc["trials"]} > {0}, "every trial started at the lowest rung"


def test_a_script_gets_the_resource_as_a_parameter(tmp_path: Path) -> None:
    (tmp_path / "train.py").write_text(
        "def fit_and_score(params, X_train, y_train, X_valid, y_valid, seed):\n"
        "    return params['a'] * params['epochs']\n")
    task = task_dict(estimator=None, scoring=None, script={"file": "train.py"}, cv={"kind": "kfold", "folds": 2},
                     search_space={"a": {"type": "float", "low": 0, "high": 1}}, n_trials=9,
                     fidelity={"resource": "epochs", "min_resource": 1, "max_resource": 9})
    task["resources"] = ["train.py"]
    out = tmp_path / "out"
    run_task(write_task(tmp_path, task), workers=1, output=out, quiet=True)
    doc = _check_climb(out, 9)
    for trial in doc["trials"]:
        assert all(r["mean_score"] == pytest.approx(trial["params"]["a"] * r["resource"]) for r in trial["rungs"])


@pytest.mark.parametrize(("fidelity", "field", "words"), [
    ({"min_resource": 20, "max_resource": 10}, "options.fidelity", "must be below max_resource"),
    ({"reduction_factor": 1}, "options.fidelity.reduction_factor", "greater than or equal to 2"),
    ({"resource": "learning_rate"}, "options.fidelity.resource", "remove it from the search space"),
    ({"resource": "max_iterations"}, "options.fidelity.resource", "did you mean 'max_iter'"),
    ({"max_resource": None}, "options.fidelity.max_resource", "needs max_resource"),
    ({"resource": "n_samples", "min_resource": 3, "max_resource": None}, "options.fidelity.min_resource",
     "2 of each of the 2 classes"),
    ({"resource": "n_samples", "min_resource": 40, "max_resource": 500}, "options.fidelity.max_resource",
     "more than the 379 training rows"),
    ({"resource": "n_samples", "min_resource": 40.5, "max_resource": None}, "options.fidelity.min_resource",
     "whole number"),
])
def test_bad_fidelity_settings_get_one_line(fidelity: dict, field: str, words: str, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    path = write_task(tmp_path, fidelity_task(**fidelity))
    code, _, err = run_cli(["tasks", "create", str(path), "--output", str(tmp_path / "out"), "--quiet"], capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert field in err and words in err, err


# -- verification ---------------------------------------------------------------------------------


@pytest.mark.parametrize("cheat", ["inflate", "random_scores"])
def test_a_faked_rung_score_is_caught_and_no_promotion_rests_on_it(cheat: str, tmp_path: Path) -> None:
    """A cheat faking rung scores (to promote bad configurations or prune good ones) is banned once caught,
    everything it reported is run again, and every rung score that stands is the honest one at its resource."""
    from tests.dishonest import CHEATS, run_inline

    data = fidelity_task("random", 12)
    data["options"]["verification"] = {"budget": 0.3}
    task, backend, status = run_inline(data, tmp_path / "out", {"honest": None, "cheat": CHEATS[cheat]})
    assert status == "finished" and backend.faked["cheat"] > 0
    rungs = task.store.rungs()
    assert set(task.store.bans()) == {"cheat"}  # it fakes every result: its first subtask's check catches it
    assert rungs and all(r["provider"] == "honest" for r in rungs)
    rows = {r.number: r for r in task.store.trials()}
    assert all(r.state in ("complete", "pruned") for r in rows.values())
    for rung in rungs:  # nothing faked stands: each score is the honest one at its rung's resource
        spec = task._spec(rows[rung["number"]], rung["rung"])
        subtask = SubtaskDefinition(task_id=task.task_id, subtask_id="x", problem=task.problem, trials=[spec])
        assert evaluate_subtask(subtask, task.resources_dir).trials[0].mean_score == rung["value"]
    best = task.best_trial()
    assert best.verified == "full" and best.state == "complete"
    assert task.store.rung_of(best.number, best.subtask_id) == task.schedule.top


def test_a_state_of_the_previous_schema_is_migrated_and_resumes(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Schema 2 (before multi-fidelity) had no rungs table and no 'pruned' trials; opening it upgrades it."""
    import sqlite3

    out = tmp_path / "out"
    run_task(task_dict(n_trials=4), workers=1, output=out, quiet=True)
    with sqlite3.connect(out / "state.db") as conn:  # back to schema 2, as the previous mltask wrote it
        conn.executescript("""
            DROP TABLE rungs;
            CREATE TABLE old AS SELECT * FROM trials; DROP TABLE trials;
            CREATE TABLE trials (number INTEGER PRIMARY KEY, params TEXT NOT NULL, seed INTEGER NOT NULL,
                system_attrs TEXT NOT NULL, state TEXT NOT NULL CHECK (state IN ('running', 'complete', 'failed')),
                value REAL, result TEXT, subtask_id TEXT, provider TEXT, finished_at REAL,
                verified TEXT CHECK (verified IN ('full', 'spot', 'cross')));
            INSERT INTO trials SELECT * FROM old; DROP TABLE old;
            UPDATE meta SET value = '2' WHERE key = 'schema_version';""")
    def kept(doc: dict) -> list:
        return [(t["number"], t["state"], t["params"], t["mean_test_score"], t["subtask"]) for t in doc["trials"]]

    before = kept(results(out))
    data = task_dict(n_trials=6)
    more = write_task(tmp_path, data)
    code, _, err = run_cli(["tasks", "resume", str(out), "--task", str(more), "--quiet"], capsys)
    assert code == 0, err
    doc = results(out)
    assert doc["counts"]["complete"] == 6 and kept(doc)[:4] == before
    with sqlite3.connect(out / "state.db") as conn:
        assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == "3"
        conn.execute("UPDATE trials SET state = 'pruned' WHERE number = 0")  # the new constraint holds


def test_a_check_planned_on_a_lower_rung_survives_a_stop_after_the_trial_climbed(tmp_path: Path) -> None:
    """Regression: a resumed verifier read the claim from the trial's row, which by then held a higher rung,
    and cancelled the check as if the evaluation had been reopened."""
    from mltask.verifier import Verifier
    from tests.dishonest import InlineBackend, InlineReferee

    data = fidelity_task("random", 6)
    data["subtasks_count"] = 2
    data["options"]["verification"] = {"budget": 1.0}
    task = HyperparameterSearchTask.create(parse_definition(data), tmp_path, tmp_path / "out")
    backend = InlineBackend({"a": None})
    backend.start(task.resources_dir, tmp_path / "scratch")
    verifier = Verifier(task, InlineReferee(task.problem, task.resources_dir))
    verifier.saw("a")
    for _ in range(2):  # the second subtask carries the first one's promotions
        backend.submit("a", task.next_subtask("a"), 60)
        for completion in backend.wait(1):
            verifier.settle(completion, 0.1)
    planned = task.store.checks("planned")
    first = [c for c in planned if c["subtask_id"] == "s000001"]
    assert first, "the provider's first subtask is always checked"
    climbed = {n for c in first for n, _ in c["units"]} & {r.number for r in task.store.trials()
                                                          if r.subtask_id != "s000001"}
    assert climbed, "no checked trial was promoted and evaluated again"
    task.store.close()
    again = HyperparameterSearchTask.load(tmp_path / "out")
    resumed = Verifier(again, InlineReferee(again.problem, again.resources_dir))
    assert {c.id for c in resumed._checks.values()} == {c["id"] for c in planned}
    for check in resumed._checks.values():
        if check.subtask_id == "s000001":
            assert all(spec.resource == 2 for spec in check.specs.values())  # rung 0, as the claim was computed


# -- a liar's rung scores and a search with nothing at the top ------------------------------------


def test_a_ban_judges_again_the_trials_pruned_against_the_liars_inflated_scores(tmp_path: Path) -> None:
    """A liar's inflated first-rung score, the first at that rung, pruned the honest trial that arrived next
    (ASHA's eager rule promotes only the best of the first arrivals). Once the liar is banned the honest trial
    is judged again against what stands and promoted: it waits for its next rung, and so does a resumed copy."""
    import shutil

    from mltask.protocol import SubtaskResult
    from tests.dishonest import RungLiar
    from tests.support import climbing_task

    task = climbing_task(tmp_path, "out")
    sent = [task.next_subtask("liar" if i == 0 else "honest") for i in range(6)]  # every trial at its first rung
    lie = RungLiar(9, delta=10.0)(json.loads(evaluate_subtask(sent[0], task.resources_dir).model_dump_json()),
                                  sent[0], None)
    assert task.accept(SubtaskResult.model_validate(lie))
    honest = max(range(1, 6), key=lambda i: sent[i].trials[0].params["a"])  # the best configuration
    assert task.accept(evaluate_subtask(sent[honest], task.resources_dir))
    assert task.store.trial(honest).state == "pruned"  # below the lie

    task.ban("liar", "a check failed")
    assert task.store.trial(honest).state == "running"
    assert [r["decision"] for r in task.store.rungs() if r["number"] == honest] == ["promoted"]
    assert task.schedule.waiting[honest] == 1  # (beside the liar's trial, back at its first rung)
    shutil.copytree(tmp_path / "out", tmp_path / "copy")
    assert HyperparameterSearchTask.load(tmp_path / "copy").schedule.waiting[honest] == 1  # a resume agrees
    for i in set(range(1, 6)) - {honest}:
        assert task.accept(evaluate_subtask(sent[i], task.resources_dir))
    while (subtask := task.next_subtask("honest")) is not None:
        assert task.accept(evaluate_subtask(subtask, task.resources_dir))
    assert task.finished() and task.store.top_rung(honest) == 2 and task.best_trial().number == honest


def test_a_stop_between_a_ban_and_its_judging_leaves_the_trials_to_judge(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: the ban and the judging were two transactions; a kill -9 between them left the honest trial
    pruned against the liar's voided score, and a resume did not judge it again."""
    import shutil

    from mltask.protocol import SubtaskResult
    from tests.dishonest import RungLiar
    from tests.support import climbing_task

    task = climbing_task(tmp_path, "out")
    sent = [task.next_subtask("liar" if i == 0 else "honest") for i in range(6)]
    lie = RungLiar(9, delta=10.0)(json.loads(evaluate_subtask(sent[0], task.resources_dir).model_dump_json()),
                                  sent[0], None)
    assert task.accept(SubtaskResult.model_validate(lie))
    honest = max(range(1, 6), key=lambda i: sent[i].trials[0].params["a"])
    assert task.accept(evaluate_subtask(sent[honest], task.resources_dir))
    assert task.store.trial(honest).state == "pruned"

    def killed(*args: Any, **kwargs: Any) -> None:
        raise SystemExit("killed between the ban and the judging")

    monkeypatch.setattr(HyperparameterSearchTask, "_rejudge", killed)
    with pytest.raises(SystemExit):
        task.ban("liar", "a check failed")
    monkeypatch.undo()
    shutil.copytree(tmp_path / "out", tmp_path / "copy")
    resumed = HyperparameterSearchTask.load(tmp_path / "copy")
    assert resumed.store.trial(honest).state == "running" and resumed.schedule.waiting[honest] == 1
    assert resumed.store.rejudge_pending() == {}  # judged once: a second resume does not judge it again
    resumed.store.close()
    assert HyperparameterSearchTask.load(tmp_path / "copy").schedule.waiting[honest] == 1


# Only the smallest `a` survives training beyond the first rung; a single worker meets it after larger ones.
_DIVERGES = ("def fit_and_score(params, X_train, y_train, X_valid, y_valid, seed):\n"
             "    if params['n'] > 1 and params['a'] > 0.15:\n"
             "        raise ValueError('diverges with more work')\n"
             "    return params['a'] * params['n'] / (params['n'] + 1)\n")


def test_a_search_never_ends_without_a_trial_at_the_maximum_resource(tmp_path: Path) -> None:
    """Every configuration promoted fails above the first rung and the only one that would not was pruned
    there: the best pruned trial of the highest rung reached is promoted anyway, until one completes at the top
    (as scikit-learn's halving search always has candidates in its last iteration)."""
    (tmp_path / "diverges.py").write_text(_DIVERGES)
    task = task_dict(estimator=None, scoring=None, script={"file": "diverges.py"}, cv={"kind": "kfold", "folds": 2},
                     search_space={"a": [0.9, 0.8, 0.7, 0.6, 0.5, 0.1]}, algorithm="grid", n_trials=None,
                     fidelity={"resource": "n", "min_resource": 1, "max_resource": 9}, seed=1)  # 0.1 comes late
    task.update(resources=["diverges.py"], subtasks_count=6)
    out = tmp_path / "out"
    run_task(write_task(tmp_path, task), workers=1, output=out, quiet=True)
    best = json.loads((out / "best.json").read_text())
    assert best["params"] == {"a": 0.1} and best["resource"] == 9
    doc = results(out)
    assert doc["counts"]["complete"] == 1
    assert [r["resource"] for t in doc["trials"] if t["params"] == {"a": 0.1} for r in t["rungs"]] == [1, 3, 9]
