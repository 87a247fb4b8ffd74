"""Resume at scale: a task with 10,000 finished trials starts scheduling again within 2 s.

Builds a 10,000-trial random search of trivial trials (DummyClassifier on iris, holdout),
then, in a fresh process each time, resumes it with 100 more trials allowed and times how
long until the first new subtask is scheduled: from process start (imports included) and
the load alone (reading the store, checking resources, rebuilding the study). Prints the
state DB size and the requestor's peak RSS while creating and while resuming (target
<= 300 MB). The peer is Optuna's own resume: ``optuna.load_study`` on an RDB (SQLite)
storage holding the same 10,000 trials, then ``study.ask()``, measured in the same run.

    python bench/resume.py [--trials N] [--repeats R] [--quick]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TASK = {
    "type": "ml_hyperparameter_search", "name": "resume-bench", "timeout": "02:00:00",
    "options": {
        "estimator": "sklearn.dummy.DummyClassifier", "dataset": {"builtin": "iris"},
        "search_space": {"strategy": ["most_frequent", "prior", "stratified", "uniform"],
                         "constant": {"type": "int", "low": 0, "high": 1000}},
        "cv": {"kind": "holdout"}, "algorithm": "random", "seed": 0,
    },
}


def _task(n_trials: int) -> dict:
    task = json.loads(json.dumps(TASK))
    task["options"]["n_trials"] = n_trials
    task["subtasks_count"] = max(1, n_trials // 100)
    return task


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(args: list[str]) -> dict:
    """Run one phase in a fresh interpreter, so RSS and import time are its own."""
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def phase_create(output: Path, n_trials: int) -> dict:
    from mltask import run_task

    started = time.perf_counter()
    run_task(_task(n_trials), workers=2, output=output, quiet=True)
    return {"seconds": time.perf_counter() - started, "rss_mb": _peak_rss_mb()}


def phase_resume(output: Path, n_trials: int, process_start: float) -> dict:
    from mltask.definition import parse_definition
    from mltask.task import HyperparameterSearchTask

    started = time.perf_counter()
    grown = _task(n_trials)
    grown["options"]["n_trials"] = n_trials + 100
    task = HyperparameterSearchTask.load(output, update=parse_definition(grown))
    subtask = task.next_subtask("bench")
    assert subtask is not None and task.progress().done + task.progress().failed >= n_trials
    loaded = time.perf_counter() - started
    task.store.close()
    return {"load_seconds": loaded, "from_start_seconds": time.time() - process_start, "rss_mb": _peak_rss_mb()}


def phase_optuna(storage_dir: Path, n_trials: int, process_start: float) -> dict:
    """The peer: Optuna's RDB storage resumed the way its users do it."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"sqlite:///{storage_dir / 'optuna.db'}"
    if not (storage_dir / "optuna.db").exists():
        study = optuna.create_study(study_name="s", storage=url, sampler=optuna.samplers.RandomSampler(seed=0))
        dists = {"strategy": optuna.distributions.CategoricalDistribution(["most_frequent", "prior"]),
                 "constant": optuna.distributions.IntDistribution(0, 1000)}
        study.add_trials([optuna.trial.create_trial(params={"strategy": "prior", "constant": i % 1000},
                                                    distributions=dists, value=0.5) for i in range(n_trials)])
        return {}
    started = time.perf_counter()
    study = optuna.load_study(study_name="s", storage=url, sampler=optuna.samplers.RandomSampler(seed=0))
    study.ask({"constant": optuna.distributions.IntDistribution(0, 1000)})
    assert len(study.trials) >= n_trials
    return {"load_seconds": time.perf_counter() - started, "from_start_seconds": time.time() - process_start,
            "rss_mb": _peak_rss_mb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="2,000 trials, 3 repeats")
    parser.add_argument("--phase", choices=["create", "resume", "optuna"], help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--started", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase == "create":
        print(json.dumps(phase_create(args.dir, args.trials)))
        return
    if args.phase == "resume":
        print(json.dumps(phase_resume(args.dir, args.trials, args.started)))
        return
    if args.phase == "optuna":
        print(json.dumps(phase_optuna(args.dir, args.trials, args.started)))
        return
    n, repeats = (2000, 3) if args.quick else (args.trials, args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        created = _child(["--phase", "create", "--dir", str(base / "task"), "--trials", str(n)])
        db = base / "task" / "state.db"
        print(f"created {n} trials in {created['seconds']:.1f} s; requestor peak RSS {created['rss_mb']:.0f} MB; "
              f"state.db {db.stat().st_size / 1e6:.1f} MB", flush=True)
        _child(["--phase", "optuna", "--dir", str(base), "--trials", str(n), "--started", "0"])
        ours, peer = [], []
        for _ in range(repeats):  # side by side, fresh copies so every resume sees the same state
            work = base / "copy"
            subprocess.run(["rm", "-rf", str(work)], check=True)
            subprocess.run(["cp", "-a", str(base / "task"), str(work)], check=True)
            ours.append(_child(["--phase", "resume", "--dir", str(work), "--trials", str(n),
                                "--started", str(time.time())]))
            peer.append(_child(["--phase", "optuna", "--dir", str(base), "--trials", str(n),
                                "--started", str(time.time())]))

    def median(runs: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in runs)

    print(f"resume of {n} finished trials, median of {repeats}:")
    print(f"  mltask: first subtask scheduled {median(ours, 'from_start_seconds'):.2f} s after process start "
          f"(target <= 2 s), load {median(ours, 'load_seconds'):.2f} s, peak RSS {median(ours, 'rss_mb'):.0f} MB "
          f"(target <= 300 MB)")
    print(f"  Optuna load_study (SQLite RDB) + ask: {median(peer, 'from_start_seconds'):.2f} s after process start, "
          f"load {median(peer, 'load_seconds'):.2f} s, peak RSS {median(peer, 'rss_mb'):.0f} MB")
    ratio_start = median(ours, "from_start_seconds") / median(peer, "from_start_seconds")
    print(f"  ratio mltask / Optuna: from start {ratio_start:.2f}, "
          f"load {median(ours, 'load_seconds') / median(peer, 'load_seconds'):.2f}")


if __name__ == "__main__":
    main()
