"""What verification costs and what it catches, on real runs and in the dishonest-provider harness.

(a) overhead at the defaults (all verification compute, wherever it ran, over the compute of
    the accepted search subtasks, both measured by the requestor) on every template with 8+
    subtasks, local backend, 2 workers; goal <= 5%;
(b) the same on the shapes v1 paid most for: holdout CV with one trial per subtask (one
    check unit is a whole trial), on the random forest and the SVC templates;
(c) per adversary (``tests/dishonest.py``), in runs where it faked anything: the share of
    runs it was banned in, and of runs whose reported best is the honest best; (d) honest
    runs with a false ban (goal 0).
(c) and (d) run 3 inline providers (one of them the adversary; two colluders for
``colluders``) on a 40-trial, 10-subtask, 5-fold task; (e) and (f) repeat them on a
multi-fidelity version of it (ASHA over training rows, ``options.fidelity``), with two more
adversaries that lie only below the maximum resource, to steer which configurations are
trained further: ``promote_bad`` inflates its bad low-rung scores, ``prune_good`` lowers its
good ones (``tests.dishonest.RungLiar``). Under ASHA which configurations climb depends on the
order answers arrive in, and a ban re-queues work, so there a best other than the honest
run's is not necessarily the adversary's doing.

    python bench/verification.py [--quick] [--runs N] [--only KIND ...] [--trials T --subtasks S]

``--only`` measures just (c) and (d) for the named adversaries, many runs of one cheaply;
``--trials 24 --subtasks 6`` is the shape of ``tests/test_verification.py``'s searches.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mltask import run_task  # noqa: E402
from tests.dishonest import ADVERSARIES, CHEATS, RUNG_ADVERSARIES, Cheat, Colluders, run_inline  # noqa: E402
from tests.support import task_dict  # noqa: E402

TEMPLATES = ROOT / "task_templates"


def _overhead(task: Path | dict[str, Any], label: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        run_task(task, workers=2, output=Path(tmp) / "o", quiet=True)
        v = json.loads((Path(tmp) / "o" / "results.json").read_text())["verification"]
    print(f"{label}: verification overhead {100 * v['overhead']:.1f}% of useful compute (goal <= 5%); "
          f"{v['verified_full']} full, {v['verified_spot']} spot, {v['verified_cross']} cross, "
          f"{v['unverified']} unchecked", flush=True)


def overheads(quick: bool) -> None:
    for template in sorted(TEMPLATES.glob("*.json")):
        if not quick and json.loads(template.read_text()).get("subtasks_count", 0) >= 8:
            _overhead(template, f"(a) {template.stem}")
    for name in ("breast_cancer_rf_random", "digits_svc_tpe"):
        data = json.loads((TEMPLATES / f"{name}.json").read_text())
        data["options"]["cv"] = {"kind": "holdout"}
        data["subtasks_count"] = data["options"]["n_trials"]
        _overhead(data, f"(b) {name}, holdout CV, one trial per subtask")
        if quick:
            return


SHAPE = {"trials": 40, "subtasks": 10}


def _task(seed: int) -> dict[str, Any]:
    data = task_dict(n_trials=SHAPE["trials"], seed=seed, cv={"kind": "stratified", "folds": 5})
    data["subtasks_count"] = SHAPE["subtasks"]
    return data


FIDELITY = {"resource": "n_samples", "min_resource": 12, "max_resource": 108, "reduction_factor": 3}


def _fidelity_task(seed: int) -> dict[str, Any]:
    """The same search with successive halving over 12, 36 and 108 of iris's 120 training rows per fold."""
    data = _task(seed)
    data["options"]["fidelity"] = FIDELITY
    return data


def catch_rates(runs: int, make_task: Callable[[int], dict[str, Any]], labels: tuple[str, str],
                extra: dict[str, Callable[[], Cheat]] | None = None, only: list[str] | None = None) -> None:
    """Catch and outcome rates per adversary (those in ``only`` if given) on ``make_task``'s search;
    ``labels`` name the two figures."""
    kinds: dict[str, Callable[[], Cheat] | None] = {
        **{k: (lambda c=c: c) for k, c in CHEATS.items()}, **ADVERSARIES, "colluders": None, **(extra or {})}
    if only:
        kinds = {kind: kinds[kind] for kind in only}
    with tempfile.TemporaryDirectory() as tmp:
        honest_best, false_bans = {}, 0
        for seed in range(runs):
            task, _, _ = run_inline(make_task(seed), Path(tmp) / f"h{seed}" / "out",
                                    {"a": None, "b": None, "c": None}, seed=seed)
            honest_best[seed] = task.best_trial().value
            false_bans += bool(task.store.bans())
        for kind, make in kinds.items():
            faking = caught = outcome = 0
            for seed in range(runs):
                if make is None:
                    ring = Colluders()
                    cheats = {"honest": None, "c1": ring.cheat, "c2": ring.cheat}
                else:
                    cheats = {"honest": None, "other": None, "cheat": make()}
                bad = {name for name, cheat in cheats.items() if cheat is not None}
                task, backend, _ = run_inline(make_task(seed), Path(tmp) / f"{kind}{seed}" / "out", cheats, seed=seed)
                if not any(backend.faked[name] for name in bad):
                    continue
                faking += 1
                caught += bad <= set(task.store.bans())
                outcome += task.best_trial().value == honest_best[seed]
            print(f"{labels[0]} {kind}: caught in {caught}/{faking} runs where it faked, reported best is the honest "
                  f"best in {outcome}/{faking}", flush=True)
    print(f"{labels[1]} honest runs with a false ban: {false_bans}/{runs} (goal 0)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one real run and 5 simulated runs per adversary")
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--only", nargs="+", metavar="KIND", help="(c) and (d) for these adversaries only")
    parser.add_argument("--trials", type=int, default=SHAPE["trials"], help="trials per harness search")
    parser.add_argument("--subtasks", type=int, default=SHAPE["subtasks"], help="subtasks per harness search")
    args = parser.parse_args()
    SHAPE.update(trials=args.trials, subtasks=args.subtasks)
    if args.only:
        catch_rates(args.runs, _task, ("(c)", "(d)"), only=args.only)
        return
    overheads(args.quick)
    runs = 5 if args.quick else args.runs
    catch_rates(runs, _task, ("(c)", "(d)"))
    top = FIDELITY["max_resource"]
    catch_rates(runs, _fidelity_task, ("(e) multi-fidelity,", "(f) multi-fidelity,"),
                {kind: (lambda make=make: make(top)) for kind, make in RUNG_ADVERSARIES.items()})


if __name__ == "__main__":
    main()
