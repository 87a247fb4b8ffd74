"""What verification costs and what it catches: the four numbers of the verification issue.

(a) re-run overhead (re-run seconds / provider compute seconds) at default settings on
    every template with 8+ subtasks, local backend, 2 workers;
(b) a provider faking 20% of its subtasks in a 50-subtask task: fraction of runs in which
    it is caught (runs where it faked at least once);
(c) a provider faking the best score: fraction caught, and whether the reported best is
    the honest one;
(d) honest runs with rejected results (must be zero).
(b)-(d) use the in-process dishonest-provider harness of the tests on a tiny problem. The
peer for (a) is the provider compute of the same run.

    python bench/verification.py [--quick] [--runs N]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mltask import run_task  # noqa: E402
from tests.dishonest import fake_best, inflate, run_inline, sometimes  # noqa: E402
from tests.support import task_dict  # noqa: E402


def _tiny(seed: int) -> dict:
    data = task_dict(n_trials=100, seed=seed, cv={"kind": "stratified", "folds": 3})
    data["subtasks_count"] = 50
    return data


def overhead_on_templates() -> None:
    for template in sorted((ROOT / "task_templates").glob("*.json")):
        if json.loads(template.read_text()).get("subtasks_count", 0) < 8:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            run_task(template, workers=2, output=Path(tmp) / "o", quiet=True)
            v = json.loads((Path(tmp) / "o" / "results.json").read_text())["verification"]
        print(f"(a) {template.stem}: verification overhead {100 * v['overhead']:.1f}% of provider compute "
              f"(target <= 10%)", flush=True)


def simulate(runs: int) -> None:
    caught = faking_runs = best_caught = best_honest = false_rejections = 0
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(runs):
            task, backend, _ = run_inline(_tiny(seed), Path(tmp) / f"b{seed}" / "out",
                                          {"honest": None, "cheat": sometimes(inflate, 0.2)}, seed=seed)
            if backend.faked["cheat"]:
                faking_runs += 1
                caught += "cheat" in task.store.bans()
            honest, _, _ = run_inline(_tiny(seed), Path(tmp) / f"h{seed}" / "out", {"a": None, "b": None}, seed=seed)
            false_rejections += any(not v["ok"] for v in honest.store.verdicts())
            cheat, _, _ = run_inline(_tiny(seed), Path(tmp) / f"c{seed}" / "out",
                                     {"honest": None, "cheat": fake_best}, seed=seed)
            best_caught += "cheat" in cheat.store.bans()
            best_honest += cheat.best_trial().value == honest.best_trial().value
    print(f"(b) provider faking 20% of its subtasks, 50-subtask task: caught in {caught}/{faking_runs} runs "
          f"= {100 * caught / max(faking_runs, 1):.1f}% (target >= 99%)")
    print(f"(c) faked best score: caught in {best_caught}/{runs} = {100 * best_caught / runs:.1f}%, "
          f"reported best is the honest best in {best_honest}/{runs} (target 100%)")
    print(f"(d) honest runs with a false rejection: {false_rejections}/{runs} (target 0)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20 simulated runs, no templates")
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    if not args.quick:
        overhead_on_templates()
    simulate(20 if args.quick else args.runs)


if __name__ == "__main__":
    main()
