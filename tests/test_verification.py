"""Dishonest providers are caught; honest ones never are; the best reported is the honest best."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mltask.backends.local import LocalBackend
from mltask.errors import TaskError
from mltask.runner import finish, run_task
from tests.dishonest import CHEATS, fake_best, inflate, outdated, run_inline, sometimes
from tests.support import results, task_dict

STRUCTURAL = {"skip_trial", "other_subtask", "malformed", "huge"}


def _search(**options: Any) -> dict[str, Any]:
    data = task_dict(n_trials=24, **options)
    data["subtasks_count"] = 12
    return data


def _scores(task: Any) -> dict[str, float | None]:
    return {json.dumps(r.params, sort_keys=True): r.value for r in task.store.trials()}


@pytest.fixture(scope="module")
def honest(tmp_path_factory: pytest.TempPathFactory) -> dict[str, float | None]:
    task, _, status = run_inline(_search(), tmp_path_factory.mktemp("honest") / "out", {"a": None, "b": None})
    assert status == "finished"
    return _scores(task)


@pytest.mark.parametrize("cheat", sorted(CHEATS))
def test_cheater_is_caught_and_nothing_it_faked_survives(cheat: str, tmp_path: Path, honest: dict) -> None:
    task, backend, status = run_inline(_search(), tmp_path / "out", {"honest": None, "cheat": CHEATS[cheat]})
    assert status == "finished"
    assert backend.faked["cheat"] > 0
    bans = task.store.bans()
    assert set(bans) == {"cheat"}, bans
    verdicts = task.store.verdicts()
    failed = [v for v in verdicts if not v["ok"]]
    assert failed and all(v["provider"] == "cheat" for v in failed)
    expected = {"structure"} if cheat in STRUCTURAL else {"spot", "best"} if cheat == "fake_best" else {"spot"}
    assert failed[0]["kind"] in expected
    # Every settled trial holds the honest score: the final study is the honest study.
    assert _scores(task) == honest
    assert all(r.provider == "honest" for r in task.store.trials())


def test_faked_best_never_wins(tmp_path: Path, honest: dict) -> None:
    for seed in range(10):
        task, _, _ = run_inline(_search(), tmp_path / f"out{seed}", {"honest": None, "cheat": fake_best}, seed=seed)
        best = task.best_trial()
        assert best.value == max(v for v in honest.values() if v is not None)
        assert best.verified == "full" and best.provider == "honest"


def test_occasional_faker_is_caught(tmp_path: Path) -> None:
    caught = 0
    for seed in range(10):
        backend_cheat = sometimes(inflate, 0.2)
        task, backend, _ = run_inline(_search(), tmp_path / f"out{seed}", {"honest": None, "cheat": backend_cheat},
                                      seed=seed)
        if backend.faked["cheat"]:
            assert "cheat" in task.store.bans()
            caught += 1
    assert caught >= 5  # the fakes happened in most runs, and each such run caught them


def test_no_false_rejections_across_seeds(tmp_path: Path) -> None:
    for seed in range(25):
        data = _search(seed=seed, algorithm="tpe")
        task, _, status = run_inline(data, tmp_path / f"out{seed}", {"a": None, "b": None, "c": None}, seed=seed)
        assert status == "finished"
        assert all(v["ok"] for v in task.store.verdicts()), seed
        assert task.store.bans() == {}


def test_figures_in_results_and_report(tmp_path: Path) -> None:
    task, _, _ = run_inline(_search(), tmp_path / "out", {"honest": None, "cheat": inflate})
    task.store.set_meta("status", "finished")
    from rich.console import Console

    finish(task.store, task.output_dir, Console(quiet=True), timing={})
    v = results(task.output_dir)["verification"]
    assert v["banned_providers"].keys() == {"cheat"} and v["rejected_trials"] >= 2
    assert v["verified_full"] >= 1 and v["verified_spot"] + v["unverified"] > 0
    assert 0 < v["overhead"] < 1
    report = (task.output_dir / "report.md").read_text()
    assert "banned providers: cheat" in report and "re-run overhead" in report


def test_disabled_best_check_is_reported_loudly(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_task(_search(verification={"verify_best": False, "budget": 0}), workers=1, output=out, quiet=True)
    assert "WARNING: the best configuration was NOT verified" in (out / "report.md").read_text()
    assert results(out)["verification"]["verified_full"] == 0


class _TamperingLocal(LocalBackend):
    """Real worker processes, one of which lies about its scores."""

    def wait(self, timeout: float):  # type: ignore[no-untyped-def]
        done = super().wait(timeout)
        for completion in done:
            path = (completion.output_dir or Path("/nonexistent")) / "result.json"
            if completion.provider == "local-1" and path.exists():
                doc = inflate(json.loads(path.read_text()), completion.subtask, None)  # type: ignore[arg-type]
                path.write_text(json.dumps(doc))
        return done


def test_real_worker_processes_have_identities_and_the_liar_is_banned(tmp_path: Path, honest: dict) -> None:
    from mltask.definition import parse_definition
    from mltask.scheduler import drive
    from mltask.task import HyperparameterSearchTask

    task = HyperparameterSearchTask.create(parse_definition(_search()), tmp_path, tmp_path / "out")
    with _TamperingLocal(workers=2) as backend:
        backend.start(task.resources_dir, tmp_path / "scratch")
        assert drive(task, backend, timeout=300) == "finished"
    assert set(task.store.bans()) == {"local-1"}
    assert _scores(task) == honest


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
