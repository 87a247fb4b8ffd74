"""Dishonest providers are caught; honest ones never are; the best reported is the honest best.

What sampling catches only with some probability is measured in ``bench/verification.py``;
these tests assert what the verifier guarantees: a cheat that fakes every result is caught
on its first subtask (always checked), a faked best never wins, every claimed failure is
re-run in full elsewhere (the requestor referees), the reported best is re-run in full,
honest providers are never banned, and nothing a banned provider reported survives.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from mltask.errors import TaskError
from mltask.problem import trial_params
from mltask.protocol import TrialSpec
from mltask.runner import finish, run_task
from mltask.scheduler import drive
from mltask.verifier import Verifier
from tests.dishonest import (
    ADVERSARIES,
    CHEATS,
    RUNG_ADVERSARIES,
    Colluders,
    InlineBackend,
    InlineReferee,
    claim_failed,
    fake_best,
    hide_best,
    inflate,
    outdated,
    run_inline,
    run_local,
)
from tests.support import climbing_task, results, task_dict, write_task

STRUCTURAL = {"skip_trial", "other_subtask", "malformed", "huge"}
# Cheats that fake every result they write: the first subtask's check catches them. (Not the copier: its
# copies are all checked, but on this decision tree on iris configurations often predict alike on the
# fold checked, so a copy can pass: banned in 99 of 100 harness runs of this shape, bench/verification.py.)
BLATANT = STRUCTURAL | {"inflate", "random_scores", "plausible_lazy", "claim_failed", "fake_best", "hide_best"}


def _search(**options: Any) -> dict[str, Any]:
    """24 trials in 6 subtasks of 4, 5 folds: a provider's first subtask meets a warm-up check (of two of its
    trials) with probability 1 - 0.631**4 = 84%, each further one while none was planned too; inflated fakes
    are contenders."""
    data = task_dict(**{"n_trials": 24, "cv": {"kind": "stratified", "folds": 5}, **options})
    data["subtasks_count"] = 6
    return data


def _scores(task: Any) -> dict[str, float | None]:
    return {json.dumps(r.params, sort_keys=True): r.value for r in task.store.trials()}


@pytest.fixture(scope="module")
def honest(tmp_path_factory: pytest.TempPathFactory) -> dict[str, float | None]:
    task, _, status = run_inline(_search(), tmp_path_factory.mktemp("honest") / "out", {"a": None, "b": None})
    assert status == "finished"
    return _scores(task)


# Lies that only sampling can catch: a saboteur lowering good trials is caught when a check
# lands on one (weighted towards them by their neighbours' scores), not for certain, so the
# true best can stay hidden in some runs (README, "What sampling cannot catch cheaply";
# bench/verification.py measures how often). The other guarantees hold for it too. (The
# replaying adversary, which lowers the best too, fakes all but one trial of each subtask:
# the warm-up's check of two of them catches it.)
SAMPLED_ONLY = {"lower_good"}


def _assert_guarantees(task: Any, cheaters: set[str], honest: dict[str, float | None],
                       outcome: bool = True) -> None:
    """What holds whatever the draws: honest never banned, failures re-run, the best re-run in full and,
    unless ``outcome`` is false (a lie only sampling catches), the honest best."""
    bans = set(task.store.bans())
    assert bans <= cheaters, bans
    verdicts = task.store.verdicts()
    reruns = {json.loads(v["checked"])[0][0] for v in verdicts if v["kind"] == "failure"}
    for row in task.store.trials():
        assert row.provider not in bans  # nothing a banned provider reported survives
        if row.state == "failed" and row.result and "gave up" not in (row.result.get("error") or ""):
            assert row.number in reruns or row.verified == "full", row.number  # every claimed failure checked
    best = task.best_trial()
    assert best.verified == "full"
    if not outcome:
        return
    assert best.value == max(v for v in honest.values() if v is not None)  # the outcome is the honest one
    assert _scores(task)[json.dumps(best.params, sort_keys=True)] == honest[json.dumps(best.params, sort_keys=True)]


@pytest.mark.parametrize("cheat", sorted(CHEATS))
def test_cheater_is_caught_and_nothing_it_faked_survives(cheat: str, tmp_path: Path, honest: dict) -> None:
    task, backend, status = run_inline(_search(), tmp_path / "out", {"honest": None, "cheat": CHEATS[cheat]})
    assert status == "finished"
    assert backend.faked["cheat"] > 0
    _assert_guarantees(task, {"cheat"}, honest)
    if cheat in BLATANT:
        assert set(task.store.bans()) == {"cheat"}
        failed = [v for v in task.store.verdicts() if not v["ok"]]
        assert failed and all(v["provider"] == "cheat" for v in failed)
        if cheat in STRUCTURAL:
            assert failed[0]["kind"] == "structure"
        # Every settled trial holds the honest score: the final study is the honest study.
        assert _scores(task) == honest
        assert all(r.provider == "honest" for r in task.store.trials())


@pytest.mark.parametrize("adversary", sorted(ADVERSARIES))
def test_adversaries_cannot_change_the_outcome(adversary: str, tmp_path: Path, honest: dict) -> None:
    cheats = {"honest": None, "other": None, "cheat": ADVERSARIES[adversary]()}
    task, _, status = run_inline(_search(), tmp_path / "out", cheats)
    assert status == "finished"
    _assert_guarantees(task, {"cheat"}, honest, outcome=adversary not in SAMPLED_ONLY)
    if adversary == "hide_best":  # a claimed failure is always checked: the saboteur is always caught
        assert set(task.store.bans()) == {"cheat"}


def test_colluders_confirming_each_other_cannot_change_the_outcome(tmp_path: Path, honest: dict) -> None:
    ring = Colluders()
    task, backend, _ = run_inline(_search(), tmp_path / "out", {"honest": None, "c1": ring.cheat, "c2": ring.cheat})
    assert backend.faked["c1"] and backend.faked["c2"]
    _assert_guarantees(task, {"c1", "c2"}, honest)
    assert task.store.bans()  # inflated fakes sit at the top: contenders, checked by the honest one or the requestor


@pytest.mark.slow
@pytest.mark.parametrize("adversary", sorted(CHEATS) + sorted(ADVERSARIES) + ["colluders"])
def test_adversaries_on_real_worker_processes(adversary: str, tmp_path: Path, honest: dict) -> None:
    """The same on the local backend's worker processes and the requestor's real referee pool."""
    if adversary == "colluders":
        ring = Colluders()
        cheats = {"local-1": ring.cheat, "local-2": ring.cheat}
    else:
        cheats = {"local-2": CHEATS.get(adversary) or ADVERSARIES[adversary]()}
    task, _, status = run_local(_search(), tmp_path / "out", cheats, workers=3)
    assert status == "finished"
    _assert_guarantees(task, set(cheats), honest, outcome=adversary not in SAMPLED_ONLY)
    if adversary in BLATANT:
        assert set(task.store.bans()) == set(cheats)


def test_real_worker_processes_have_identities_and_the_liar_is_banned(tmp_path: Path, honest: dict) -> None:
    task, _, status = run_local(_search(), tmp_path / "out", {"local-1": inflate}, workers=2)
    assert status == "finished"
    assert set(task.store.bans()) == {"local-1"}
    assert _scores(task) == honest


def test_faked_best_never_wins(tmp_path: Path, honest: dict) -> None:
    for seed in range(5):
        task, _, _ = run_inline(_search(), tmp_path / f"out{seed}", {"honest": None, "cheat": fake_best}, seed=seed)
        best = task.best_trial()
        assert best.value == max(v for v in honest.values() if v is not None)
        assert best.verified == "full" and best.provider == "honest"


def _hide_best_unless_checking(doc: dict, subtask: Any, rng: Any) -> dict:
    """hide_best in its own work, honest when sent folds to check: only its claimed failures can betray it."""
    return doc if any(t.folds is not None for t in subtask.trials) else hide_best(doc, subtask, rng)


def test_a_claimed_failure_is_rerun_elsewhere_and_refereed(tmp_path: Path, honest: dict) -> None:
    task, backend, _ = run_inline(_search(), tmp_path / "out", {"honest": None, "cheat": _hide_best_unless_checking})
    assert backend.faked["cheat"]
    failures = [v for v in task.store.verdicts() if v["kind"] == "failure"]
    assert [v["by"] for v in failures] == ["requestor"]  # the checker disagreed; only the referee judges
    assert not failures[0]["ok"] and "failed in one run and ok in the other" in failures[0]["reason"]
    [failure_check] = [c for c in task.store.checks() if c["kind"] == "failure" and c["state"] == "failed"]
    checkers = {s["provider"] for s in task.store.subtasks("check")
                if json.loads(s["trial_numbers"]) == [failure_check["units"][0][0]]}
    assert checkers == {"honest"}  # the whole trial went to the other provider first
    assert set(task.store.bans()) == {"cheat"} and _scores(task) == honest


def _confirm_failures(doc: dict, subtask: Any, rng: Any) -> dict:
    """An accomplice: sent one whole trial (what a claimed failure's check looks like), it says it failed too."""
    return claim_failed(doc, subtask, rng) if len(subtask.trials) == 1 and subtask.trials[0].folds is None else doc


def test_a_failure_confirmed_by_an_accomplice_is_refereed_in_a_small_network(tmp_path: Path) -> None:
    """With few providers a random checker is likely an accomplice: every confirmed failure is re-run."""
    from mltask.definition import parse_definition
    from mltask.task import HyperparameterSearchTask

    task = HyperparameterSearchTask.create(parse_definition(_search()), tmp_path, tmp_path / "out")
    backend = InlineBackend({"honest": None, "hider": hide_best, "accomplice": _confirm_failures})
    backend.start(task.resources_dir, tmp_path / "scratch")
    verifier = Verifier(task, InlineReferee(task.problem, task.resources_dir))
    for provider in backend.cheats:
        verifier.saw(provider)
    backend.submit("hider", task.next_subtask("hider"), 60)
    verifier.settle(*backend.wait(1), 1.0)
    [check] = [c for c in verifier._checks.values() if c.kind == "failure"]
    check.assignee = "accomplice"  # the draw the hider hopes for
    backend.submit("accomplice", verifier.hand_checks(["accomplice"])["accomplice"], 60)
    verifier.collect(*backend.wait(1), 1.0)
    assert [(v["by"], v["ok"]) for v in task.store.verdicts() if v["kind"] == "failure"] == [("accomplice", 1)]
    while check.id in verifier._checks:  # the referee re-runs it (twice, before blaming anyone)
        verifier.poll()
    assert set(task.store.bans()) == {"hider", "accomplice"}
    assert task.store.trial(check.units[0][0]).state == "running"  # the hidden configuration is sent again


def test_no_false_rejections_across_seeds(tmp_path: Path) -> None:
    for seed in range(15):
        data = _search(seed=seed, algorithm="tpe")
        task, _, status = run_inline(data, tmp_path / f"out{seed}", {"a": None, "b": None, "c": None}, seed=seed)
        assert status == "finished"
        assert all(v["ok"] for v in task.store.verdicts()), seed
        assert task.store.bans() == {}


def test_checks_go_to_other_providers_as_ordinary_subtasks(tmp_path: Path) -> None:
    task, _, _ = run_inline(_search(), tmp_path / "out", {"a": None, "b": None, "c": None})
    searches = {s["subtask_id"]: s for s in task.store.subtasks("search")}
    checks = task.store.subtasks("check")
    assert checks and all(c["state"] == "checked" and c["seconds_out"] is not None for c in checks)
    cross = [v for v in task.store.verdicts() if v["by"] != "requestor"]
    assert cross
    for verdict in cross:  # run by another provider than the one whose result it checks
        assert verdict["by"] != searches[verdict["subtask_id"]]["provider"] and verdict["ok"]
    ids = [s["subtask_id"] for s in task.store.subtasks()]
    assert ids == sorted(ids) and all(i.startswith("s") for i in ids)  # one numbering: a check id says nothing
    statuses = {r.verified for r in task.store.trials()}
    assert "cross" in statuses and "full" in statuses


def test_a_single_provider_is_checked_by_the_requestor(tmp_path: Path) -> None:
    task, _, _ = run_inline(_search(), tmp_path / "out", {"solo": None})
    verdicts = task.store.verdicts()
    assert verdicts and all(v["by"] == "requestor" and v["ok"] for v in verdicts)
    assert not task.store.subtasks("check")


def _best_reruns(task: Any) -> dict[int, int]:
    """How often the requestor re-ran each fold of the best trial (and agreed)."""
    best = task.best_trial()
    assert best.verified == "full"
    runs: dict[int, int] = {}
    for v in task.store.verdicts():
        if v["ok"] and v["by"] == "requestor" and v["subtask_id"] == best.subtask_id:
            for number, fold in json.loads(v["checked"]):
                if number == best.number:
                    for f in range(5) if fold is None else [fold]:
                        runs[f] = runs.get(f, 0) + 1
    return runs


def test_the_best_re_run_skips_folds_the_requestor_already_re_ran(tmp_path: Path) -> None:
    """Regression: the best's full re-run repeated the fold its contender check had re-run and agreed."""
    task, _, _ = run_inline(_search(), tmp_path / "out", {"solo": None})
    assert _best_reruns(task) == dict.fromkeys(range(5), 1)  # every fold re-run by the requestor, none twice


def test_the_best_re_run_skips_folds_re_ran_before_a_stop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: after a resume the best's re-run forgot the folds the requestor had re-run before the stop."""
    from mltask.definition import parse_definition
    from mltask.task import HyperparameterSearchTask

    def stop(self: Verifier) -> bool:
        raise KeyboardInterrupt  # the requestor stops just before the best's final re-run

    task = HyperparameterSearchTask.create(parse_definition(_search()), tmp_path, tmp_path / "out")
    backend = InlineBackend({"solo": None})
    backend.start(task.resources_dir, tmp_path / "scratch")
    with monkeypatch.context() as patch:
        patch.setattr(Verifier, "best_verified", stop)
        with pytest.raises(KeyboardInterrupt):
            drive(task, backend, timeout=600, verifier=Verifier(task, InlineReferee(task.problem, task.resources_dir)))
    task.store.close()
    again = HyperparameterSearchTask.load(tmp_path / "out")
    best = again.best_trial()  # every search trial is settled: this one is the best
    assert any(v["by"] == "requestor" and v["subtask_id"] == best.subtask_id for v in again.store.verdicts())
    assert drive(again, backend, timeout=600,
                 verifier=Verifier(again, InlineReferee(again.problem, again.resources_dir))) == "finished"
    assert _best_reruns(again) == dict.fromkeys(range(5), 1)


def test_checks_are_drawn_from_the_os_not_the_task_seed(tmp_path: Path) -> None:
    plans = []
    for run in range(2):
        task, _, _ = run_inline(_search(), tmp_path / f"out{run}", {"a": None, "b": None}, seed=0)
        plans.append(sorted(v["checked"] + v["subtask_id"] for v in task.store.verdicts()))
        verifier = Verifier(task, InlineReferee(task.problem, task.resources_dir))
        assert isinstance(verifier.rng, secrets.SystemRandom) and verifier.policy.rng is verifier.rng
    assert plans[0] != plans[1]  # same task, same seed, other checks


class _HeldReferee(InlineReferee):
    """A referee whose answers come back only once the search has no subtask left in flight."""

    def __init__(self, task: Any) -> None:
        super().__init__(task.problem, task.resources_dir)
        self.task = task
        self.accepted_while_held = 0

    def poll(self, timeout: float = 0.0) -> list:
        if self._done and not self.task.finished():
            self.accepted_while_held = sum(s["state"] == "accepted" for s in self.task.store.subtasks("search"))
            return []
        return super().poll(timeout)


def test_checks_never_hold_up_handing_out_and_collecting(tmp_path: Path) -> None:
    from mltask.definition import parse_definition
    from mltask.task import HyperparameterSearchTask

    task = HyperparameterSearchTask.create(parse_definition(_search()), tmp_path, tmp_path / "out")
    backend = InlineBackend({"honest": None, "cheat": hide_best})
    backend.start(task.resources_dir, tmp_path / "scratch")
    referee = _HeldReferee(task)
    assert drive(task, backend, timeout=300, verifier=Verifier(task, referee)) == "finished"
    assert referee.accepted_while_held >= 4  # the search went on while the failure re-runs waited
    assert set(task.store.bans()) == {"cheat"}


def test_figures_in_results_and_report(tmp_path: Path) -> None:
    task, _, _ = run_inline(_search(), tmp_path / "out", {"honest": None, "cheat": inflate, "other": None})
    task.store.set_meta("status", "finished")
    from rich.console import Console

    finish(task.store, task.output_dir, Console(quiet=True), timing={})
    v = results(task.output_dir)["verification"]
    assert v["banned_providers"].keys() == {"cheat"} and v["rejected_trials"] >= 1
    assert v["verified_full"] >= 1 and v["verified_cross"] + v["verified_spot"] + v["unverified"] > 0
    compute = task.store.compute_seconds()
    assert v["overhead"] == round((compute["check"] + compute["requestor"]) / compute["useful"], 4) > 0
    doc = results(task.output_dir)
    assert {t["verified"] for t in doc["trials"]} <= {"full", "spot", "cross", "none"}
    assert "verified" in (task.output_dir / "results.csv").read_text().splitlines()[0].split(",")
    report = (task.output_dir / "report.md").read_text()
    assert "banned providers: cheat" in report and "verification overhead" in report and "| verified |" in report


def _huge_compute_time(doc: dict, subtask: Any, rng: Any) -> dict:
    doc["compute_time"] = 1e7  # the schema's bound (1e300 is refused outright): absurd, but well-formed
    return doc


def test_overhead_is_measured_by_the_requestor_not_claimed_by_providers(tmp_path: Path) -> None:
    """Regression: a provider reporting compute_time 1e300 made the overhead 0.0%; now any claim is ignored."""
    task, _, _ = run_inline(_search(), tmp_path / "out", {"a": _huge_compute_time, "b": _huge_compute_time})
    compute = task.store.compute_seconds()
    assert 0 < compute["useful"] < 600 and compute["check"] + compute["requestor"] > 0
    task.store.set_meta("status", "finished")
    from rich.console import Console

    finish(task.store, task.output_dir, Console(quiet=True), timing={})
    assert results(task.output_dir)["verification"]["overhead"] > 1e-3


def test_disabled_best_check_is_reported_loudly(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_task(_search(verification={"verify_best": False, "budget": 0}), workers=1, output=out, quiet=True)
    assert "WARNING: the best configuration was NOT verified" in (out / "report.md").read_text()
    assert results(out)["verification"]["verified_full"] == 0


def test_inline_backend_is_the_honest_provider(tmp_path: Path, honest: dict) -> None:
    task, _, _ = run_inline(_search(), tmp_path / "out", {"solo": None})
    assert _scores(task) == honest


def test_provider_on_other_versions_is_dropped_not_banned(tmp_path: Path, honest: dict) -> None:
    task, _, status = run_inline(_search(), tmp_path / "out", {"honest": None, "old": outdated})
    assert status == "finished" and task.store.bans() == {}
    reason = json.loads(task.store.meta_value("dropped"))["old"]
    assert "sklearn 0.24.2" in reason and "mltask image build" in reason
    assert [v["kind"] for v in task.store.verdicts() if not v["ok"]] == ["version"]
    assert _scores(task) == honest


def test_no_provider_on_the_right_versions_says_how_to_fix_it(tmp_path: Path) -> None:
    with pytest.raises(TaskError, match="mltask image build"):
        run_inline(_search(), tmp_path / "out", {"old": outdated})


def test_planned_checks_survive_a_stop(tmp_path: Path) -> None:
    from mltask.definition import parse_definition
    from mltask.task import HyperparameterSearchTask

    task = HyperparameterSearchTask.create(parse_definition(_search()), tmp_path, tmp_path / "out")
    backend = InlineBackend({"a": None, "b": hide_best})
    backend.start(task.resources_dir, tmp_path / "scratch")
    verifier = Verifier(task, InlineReferee(task.problem, task.resources_dir))
    for provider in ("a", "b"):
        verifier.saw(provider)
        backend.submit(provider, task.next_subtask(provider), 60)
    for completion in backend.wait(1) + backend.wait(1):
        verifier.settle(completion, 0.1)  # planned, never run: the requestor stops here
    planned = task.store.checks("planned")
    assert any(c["kind"] == "failure" and c["provider"] == "b" for c in planned)
    task.store.close()
    again = HyperparameterSearchTask.load(tmp_path / "out")
    resumed = Verifier(again, InlineReferee(again.problem, again.resources_dir))
    assert resumed.busy() and {c.id for c in resumed._checks.values()} == {c["id"] for c in planned}


def test_an_older_state_is_refused_with_one_line(tmp_path: Path) -> None:
    run_task(_search(n_trials=4), workers=1, output=tmp_path / "out", quiet=True)
    with sqlite3.connect(tmp_path / "out" / "state.db") as conn:
        conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    from mltask.runner import resume_task

    with pytest.raises(TaskError, match="schema version 1, this mltask reads version 3; finish the task") as err:
        resume_task(tmp_path / "out", quiet=True)
    assert "\n" not in str(err.value)


# -- determinism (issue 9 item 7) ----------------------------------------------------------


def test_null_random_state_is_filled_with_the_trial_seed() -> None:
    from sklearn.ensemble import RandomForestClassifier

    spec = TrialSpec(number=0, params={"random_state": None, "n_estimators": 3}, seed=42)
    assert trial_params(RandomForestClassifier(), spec)["random_state"] == 42
    fixed = TrialSpec(number=0, params={"random_state": 1}, seed=42)
    assert trial_params(RandomForestClassifier(), fixed)["random_state"] == 1


def test_null_random_state_bans_no_honest_worker(tmp_path: Path) -> None:
    """Regression: ``"random_state": [null, 1]`` made re-runs differ and the verifier ban honest workers."""
    data = _search(estimator="sklearn.ensemble.ExtraTreesClassifier",
                   search_space={"random_state": [None, 1], "n_estimators": {"type": "int", "low": 2, "high": 6}},
                   n_trials=12, verification={"budget": 1.0})
    data["subtasks_count"] = 6
    out = tmp_path / "out"
    run_task(data, workers=2, output=out, quiet=True)
    doc = results(out)
    assert doc["status"] == "finished" and doc["verification"]["banned_providers"] == {}
    assert doc["counts"]["complete"] == 12


UNSEEDED = '''
import random

def fit_and_score(params, X_train, y_train, X_valid, y_valid, seed):
    return params["a"] + random.random()
'''


def test_a_script_that_ignores_its_seed_stops_the_task_and_bans_nobody(tmp_path: Path) -> None:
    (tmp_path / "noisy.py").write_text(UNSEEDED)
    data = task_dict(estimator=None, scoring=None, script={"file": "noisy.py"}, n_trials=8,
                     search_space={"a": {"type": "float", "low": 0, "high": 1}})
    data.update(resources=["noisy.py"], subtasks_count=4)
    out = tmp_path / "out"
    with pytest.raises(TaskError) as err:
        run_task(write_task(tmp_path, data), workers=2, output=out, quiet=True)
    message = str(err.value)
    assert message.startswith("options.script: this script is not deterministic given `seed` (trial ")
    assert "seed every random source from the `seed` argument" in message and "\n" not in message
    assert results(out)["verification"]["banned_providers"] == {}


RUNGS = {"resource": "n_samples", "min_resource": 12, "max_resource": 108, "reduction_factor": 3}


@pytest.mark.parametrize("kind", ["promote_bad", "prune_good"])
def test_a_low_rung_liar_is_caught_on_real_worker_processes(kind: str, tmp_path: Path) -> None:
    """Multi-fidelity: a provider faking scores below the maximum resource only (to promote a bad configuration
    or stop a good one) lies in its first answer; with a budget that checks every answer, checks re-run it at
    the rung's resource: it is banned, none of its evaluations survive, and every score left is the honest
    one. (Which trials climb depends on the order answers arrive in, so the best may differ from an honest
    run's; it is re-run in full at the maximum resource.) How often the default budget catches it:
    bench/verification.py."""
    data = _search(fidelity=RUNGS, verification={"budget": 1.0})
    honest, _, _ = run_inline(data, tmp_path / "honest" / "out", {"a": None, "b": None})
    truth = {(r["number"], r["rung"]): r["value"] for r in honest.store.rungs()}
    task, backend, status = run_local(data, tmp_path / "out", {"local-1": RUNG_ADVERSARIES[kind](108)}, workers=2)
    assert status == "finished" and backend.faked["local-1"]
    assert set(task.store.bans()) == {"local-1"}
    rungs = task.store.rungs()
    assert rungs and all(r["provider"] != "local-1" for r in rungs)
    assert all(r["value"] == truth[r["number"], r["rung"]] for r in rungs if (r["number"], r["rung"]) in truth)
    best = task.best_trial()
    assert best is not None, "no trial reached max_resource"
    assert best.verified == "full" and max(r["resource"] for r in rungs if r["number"] == best.number) == 108


def test_a_rung_answer_whose_basis_a_ban_voided_sends_the_trial_back_to_its_first_rung(tmp_path: Path) -> None:
    """A liar's inflated first rung promoted a bad trial and its next rung went to an honest provider; after
    the ban that answer's basis is void: the trial climbs again from its first rung, where honest scores prune
    it, and it is never sent again."""
    from mltask.protocol import SubtaskResult
    from mltask.provider import evaluate_subtask
    from tests.dishonest import RungLiar

    dry = climbing_task(tmp_path, "dry")
    first = [dry.next_subtask("x").trials[0] for _ in range(4)]
    worst = min(range(4), key=lambda i: first[i].params["a"])  # pruned at the first rung once honestly scored
    task = climbing_task(tmp_path, "out")

    def answer(subtask: Any, cheat: Any = None) -> None:
        result = evaluate_subtask(subtask, task.resources_dir)
        if cheat is not None:
            result = SubtaskResult.model_validate(cheat(json.loads(result.model_dump_json()), subtask, None))
        assert task.accept(result)

    sent = [task.next_subtask("liar" if i == worst else "honest") for i in range(4)]  # as in the dry run
    for i, subtask in enumerate(sent):
        answer(subtask, RungLiar(9, delta=10.0) if i == worst else None)
    def sent_for_worst() -> Any:
        """The next subtask carrying the worst trial; others are answered honestly on the way."""
        while (subtask := task.next_subtask("honest")).trials[0].number != worst:
            answer(subtask)
        return subtask

    stale = sent_for_worst()
    assert [(t.number, t.resource) for t in stale.trials] == [(worst, 3)]  # the lie promoted it
    task.ban("liar", "a check failed")
    answer(stale)  # its basis is void: the trial climbs again from its first rung
    again = sent_for_worst()
    assert [(t.number, t.resource) for t in again.trials] == [(worst, 1)]
    answer(again)
    assert task.store.trial(worst).state == "pruned" and task.store.top_rung(worst) == 0
    while (subtask := task.next_subtask("honest")) is not None:
        assert worst not in {t.number for t in subtask.trials}
        answer(subtask)
    assert task.finished() or not task.has_pending_subtasks()


def test_a_ban_sends_each_climbing_trial_once(tmp_path: Path) -> None:
    """Regression: a banned provider's trials were re-queued once per batch they had been sent in, and a
    multi-fidelity trial is sent in several (a rung each, with other companions), so each rung ran twice and
    the second answer promoted a pruned trial, whose next rung then crashed the search (UpdateFinishedTrialError)."""
    from mltask.provider import evaluate_subtask

    task = climbing_task(tmp_path, "out", batch=2)
    first, second = task.next_subtask("banned"), task.next_subtask("banned")
    # Answered out of order, the promotions mix the batches: the trials climb in other company (here
    # (2, 3), (0, 1), then (1, 2) and (1, 4)), all of it from the provider banned below.
    for subtask in (second, first, None, None):
        subtask = subtask or task.next_subtask("banned")
        assert task.accept(evaluate_subtask(subtask, task.resources_dir))
    task.ban("banned", "a check failed")
    sent = []
    while (subtask := task.next_subtask("honest")) is not None:
        sent += [(t.number, t.resource) for t in subtask.trials]
        assert task.accept(evaluate_subtask(subtask, task.resources_dir))
    assert len(sent) == len(set(sent)), sorted(sent)  # no rung evaluation twice
    assert task.finished()
    assert {r["provider"] for r in task.store.rungs()} == {"honest"}
