"""Verification at scale, simulated: what it costs and what it catches with 50 to 5,000 providers.

The real task type, scheduler loop and verifier drive a simulated network in virtual time
(:mod:`mltask.simulation`): heavy-tailed durations, 2% of subtasks lost to crashes and
hangs, honest providers leaving and joining, and among the providers one of each adversary
of ``tests/dishonest.py`` (20 providers; a larger share would make the bigger sizes cost
more to simulate than they tell: each ban rebuilds the study from the store). Each run
prints nothing; each (policy, size) prints which adversaries were caught, then its figures
as one line, the last line of all being the last size of the last policy::

    scale: providers=500 trials=20000 provider_busy=0.97 requestor_cores=0.4 overhead=3.9% caught=100% ...

- provider_busy: provider busy time over busy time plus idle time while work waited to be
  handed out (a requestor stuck re-running results is such a wait; a task out of work is not);
- requestor_cores: the requestor's verification compute over the run's makespan;
- overhead: all verification compute, wherever it ran, over the compute of the search itself;
- caught: the share of adversaries that faked 10 or more trials that were banned;
- faked_left: faked results still in the final results, summed over runs;
- outcome_changed: runs whose reported best is not the honest best of the same configurations
  (random search: trial n is the same configuration whatever came back, so this is exactly
  the best of an honest run with the same seed, without running it);
- false_bans: honest providers banned, summed over runs.

Compute is counted in reference-core seconds of the cost model (see :mod:`mltask.simulation`),
so the figures do not depend on this machine; nor does anything else printed except the
real seconds each size took.

Policies: ``today`` is mltask at commit ``TODAY`` (before verification v2), run from a copy
of that commit's package extracted from git; ``tree`` is the code in this working tree.

    python bench/scale.py [--providers N ...] [--runs R] [--trials T] [--policy today|tree ...]

Default: both policies at 50, 500 and 5,000 providers with the trials and runs in ``SIZES``
(10,000 trials x 3 runs at 50 providers, so that every adversary gets the 30-odd subtasks
the patient one needs; 20,000 x 1 at 500; 40,000 x 1 at 5,000), about 10-15 minutes on a
loaded 2-core machine. A single run per size says nothing about a rate like
``outcome_changed <= 1%``; ``--runs`` buys more. A run that takes more than ``--budget``
real seconds is stopped and reported as not measured.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TODAY = "2116bfb"  # main when issue 11 (verification v2) was filed
POLICIES = ("today", "tree")
# providers -> (trials per run, runs)
SIZES: dict[int, tuple[int, int]] = {50: (10_000, 3), 500: (20_000, 1), 5000: (40_000, 1)}


@dataclass(frozen=True)
class Shape:
    """The task every run searches."""

    trials_per_subtask: int = 5
    folds: int = 5


def _kinds() -> dict[str, Callable[[Any, str], dict[str, Any]]]:
    """Adversary kinds: each makes its providers (name -> cheat) from the insight and a name suffix."""
    from tests.dishonest import CHEATS, Patient, Replayer, Saboteur, colluders, inflate, outdated, small_fold, sometimes

    def one(make: Callable[[Any, str], Any]) -> Callable[[Any, str], dict[str, Any]]:
        return lambda insight, name: {name: make(insight, name)}

    kinds = {kind: one(lambda insight, name, cheat=cheat: cheat) for kind, cheat in CHEATS.items()}
    kinds.update({
        "occasional": one(lambda insight, name: sometimes(inflate, 0.2)),
        "small_fold": one(lambda insight, name: small_fold),
        "replayer": one(lambda insight, name: Replayer(insight, name)),
        "saboteur_lower": one(lambda insight, name: Saboteur()),
        "saboteur_fail": one(lambda insight, name: Saboteur(fail=True)),
        "patient": one(lambda insight, name: Patient()),
        "outdated": one(lambda insight, name: outdated),
        "colluder": lambda insight, name: colluders(insight, (f"{name}_a", f"{name}_b")),
    })
    return kinds


def cast(insight: Any, kinds: Collection[str] | None = None) -> tuple[dict[str, Any], set[str]]:
    """One adversary of each of ``kinds`` (default every kind), by provider name; and which of them lie.

    Every kind lies except ``outdated``: an honest provider on another scikit-learn, to be
    dropped and never banned.
    """
    cheats: dict[str, Any] = {}
    for kind, make in _kinds().items():
        if kinds is None or kind in kinds:
            cheats.update(make(insight, kind))
    return cheats, {name for name in cheats if kind_of(name) != "outdated"}


class TooSlow(Exception):
    """A run took more real time than its budget: the policy's own loop costs too much at this size."""


def simulate(providers: int, trials: int, seed: int, scratch: Path, shape: Shape = Shape(),
             kinds: Collection[str] | None = None, budget: float = math.inf,
             verification: dict[str, Any] | None = None) -> Any:
    """One search on ``providers`` simulated providers, adversaries of ``kinds`` among them; its figures.

    ``verification`` overrides the task's verification options. Raises :class:`TooSlow`
    once it has taken ``budget`` seconds of real time.
    """
    from mltask.definition import parse_definition
    from mltask.scheduler import drive
    from mltask.simulation import SimBackend, measure, synthetic_task
    from mltask.task import HyperparameterSearchTask
    from tests.dishonest import Insight

    out = scratch / f"run{seed}"
    data = synthetic_task(out / "task", n_trials=trials, trials_per_subtask=shape.trials_per_subtask,
                          folds=shape.folds, seed=seed, verification=verification)
    task = HyperparameterSearchTask.create(parse_definition(data), out, out / "out")
    try:
        insight = Insight(task)
        adversaries, liars = cast(insight, kinds)
        names = [f"p{i}" for i in range(providers - len(adversaries))] + list(adversaries)
        random.Random(seed).shuffle(names)
        backend = SimBackend({n: adversaries.get(n) for n in names}, seed=seed, demand=task.has_pending_subtasks)
        backend.start(task.resources_dir, out / "scratch")
        insight.verifier = verifier = simulated_verifier(task, backend)
        deadline = time.monotonic() + budget

        def watch(progress: Any) -> None:
            if time.monotonic() > deadline:
                raise TooSlow(f"{progress.done + progress.failed} of {trials} trials settled in {budget:.0f} s of "
                              f"real time, at {backend.clock() / 3600:.1f} h of virtual time")

        status = drive(task, backend, timeout=10**9, verifier=verifier, on_update=watch)
        if status != "finished":
            raise RuntimeError(f"the simulated search stopped: {status}")
        figures = measure(task, backend, liars)
        figures.check_costs = check_costs(task, backend, liars)
        policy = getattr(verifier, "policy", None)
        figures.believed = None if policy is None else (policy.spent + policy.committed, policy.useful)
        return figures
    finally:
        task.store.close()
        shutil.rmtree(out, ignore_errors=True)


def simulated_verifier(task: Any, backend: Any) -> Any:
    """The task's verifier on the simulation's clock and re-run pool, where it takes them (today's does not)."""
    from mltask.scheduler import make_verifier
    from mltask.simulation import SimReferee
    from mltask.verifier import Verifier

    if "referee" not in inspect.signature(Verifier).parameters:
        return make_verifier(task)
    workers = task.definition.options.verification.referee_workers
    return Verifier(task, SimReferee(backend, task.problem, task.resources_dir, workers), clock=backend.clock)


def check_costs(task: Any, backend: Any, liars: Collection[str]) -> dict[str, float]:
    """Reference-core seconds of check subtasks (as the providers running them were charged),
    by the kind of check they ran ("failure", "spot", ...), by fate ("answered", "lost": a fault
    or a banned checker, "wrong", "discarded": the checked provider was banned meanwhile), and
    by whether the checked provider lies ("of liars"); keys "kind:<k>", "fate:<f>", "liars"."""
    kinds: dict[frozenset[int], set[str]] = {}
    for check in task.store.checks():
        kinds.setdefault(frozenset(n for n, _ in check["units"]), set()).add(
            f"{check['kind']}{'' if check['provider'] not in liars else '@liar'}")
    out: dict[str, float] = {}
    for sub in task.store.subtasks("check"):
        cost = backend.ledger.cost.get(sub["subtask_id"], 0.0)
        found = kinds.get(frozenset(json.loads(sub["trial_numbers"])), {"unknown"})
        kind = min(found) if len(found) == 1 else "ambiguous"
        wrong = sub["state"] == "rejected" and "trial " in (sub.get("reason") or "")  # else a fault or a ban
        fate = "wrong" if wrong else {"checked": "answered", "rejected": "lost"}.get(sub["state"], sub["state"])
        for key in (f"kind:{kind.split('@')[0]}", f"fate:{fate}", *(["liars"] if kind.endswith("@liar") else [])):
            out[key] = out.get(key, 0.0) + cost
    return out


def _checks(figures: list[Any]) -> str:
    """Check subtasks' compute by kind and fate, as shares of useful compute; and what the policy believed."""
    useful = sum(f.useful for f in figures)
    total: dict[str, float] = {}
    for fig in figures:
        for key, seconds in getattr(fig, "check_costs", {}).items():
            total[key] = total.get(key, 0.0) + seconds
    parts = [f"{key.split(':')[1]} {100 * seconds / useful:.2f}%" for key, seconds in sorted(total.items())
             if key.startswith("kind:")]
    fates = [f"{key.split(':')[1]} {100 * seconds / useful:.2f}%" for key, seconds in sorted(total.items())
             if key.startswith("fate:")]
    believed = [f.believed for f in figures if getattr(f, "believed", None)]
    belief = "" if not believed else (
        f"; the policy believed it spent {100 * sum(b[0] for b in believed) / sum(b[1] for b in believed):.2f}% "
        f"of a useful {sum(b[1] for b in believed) / useful:.3f}x the bench's")
    return (f"check subtasks: {', '.join(parts) or 'none'} ({', '.join(fates)}; of liars' work "
            f"{100 * total.get('liars', 0.0) / useful:.2f}%){belief}")


def kind_of(name: str) -> str:
    """An adversary's kind from its provider name (the colluders are ``colluder_a`` and ``colluder_b``)."""
    return name.split("_")[0] if name.startswith("colluder") else name


def report(figures: list[Any], seconds: float) -> list[str]:
    """The lines of one (policy, size): adversaries caught by kind, then the figures."""
    by_kind: dict[str, list[int]] = {}  # kind -> [faked trials, instances faking >= 10, of them banned]
    for fig in figures:
        for name, faked in fig.faked.items():
            row = by_kind.setdefault(kind_of(name), [0, 0, 0])
            row[0] += faked
            row[1] += name in fig.eligible
            row[2] += name in fig.eligible and name in fig.banned
    eligible = sum(row[1] for row in by_kind.values())
    caught = sum(row[2] for row in by_kind.values())
    missed = [f"{k} {row[2]}/{row[1]}" for k, row in sorted(by_kind.items()) if row[2] < row[1]]
    left: dict[str, int] = {}  # whose results they are
    for fig in figures:
        for who, n in fig.left_by.items():
            left[who] = left.get(who, 0) + n
    by = f" (by {', '.join(f'{who} {n}' for who, n in sorted(left.items()))})" if left else ""
    runs = len(figures)
    busy = sum(f.provider_busy for f in figures) / runs
    cores = sum(f.requestor_cores for f in figures) / runs
    overhead = sum(f.overhead for f in figures) / runs
    changed = sum(f.outcome_changed for f in figures) / runs
    return [
        f"  {runs} run(s) in {seconds:.0f} s; missed (caught/faked 10+): {', '.join(missed) or 'none'}; runs with "
        f"faked results left: {sum(f.faked_left > 0 for f in figures)}{by}; trials lost to retries: "
        f"{sum(f.lost for f in figures)}; virtual makespan {sum(f.makespan for f in figures) / runs / 3600:.1f} h, "
        f"{sum(f.makespan * f.providers / f.useful for f in figures) / runs:.1f}x the search's compute per provider; "
        f"requestor compute: {_requestor(figures)}; {_checks(figures)}",
        f"scale: providers={figures[0].providers} trials={figures[0].trials} provider_busy={busy:.2f} "
        f"requestor_cores={cores:.2g} overhead={100 * overhead:.1f}% "
        f"caught={100 * caught / eligible if eligible else 100:.0f}% faked_left={sum(f.faked_left for f in figures)} "
        f"outcome_changed={100 * changed:.1f}% false_bans={sum(f.false_bans for f in figures)}",
    ]


@contextmanager
def scratch_dir() -> Iterator[Path]:
    """A temporary dir for the runs' state, in memory where there is a tmpfs.

    A simulation's state need not survive a power cut, and on a tmpfs SQLite's fsync per
    transaction (the store's durability, kept as it is) costs nothing; on disk it was a
    third to a half of the harness's time.
    """
    memory = Path("/dev/shm")
    with tempfile.TemporaryDirectory(prefix="mltask-scale-", dir=memory if memory.is_dir() else None) as tmp:
        yield Path(tmp)


def _requestor(figures: list[Any]) -> str:
    """Where the requestor's compute went, by kind of check, as shares of what the backend metered."""
    metered = sum(f.requestor_cores * f.makespan for f in figures)
    kinds: dict[str, float] = {}
    for fig in figures:
        for kind, seconds in fig.requestor_records.items():
            kinds[kind] = kinds.get(kind, 0.0) + seconds
    shares = [f"{kind} {seconds / metered:.0%}" for kind, seconds in sorted(kinds.items()) if seconds]
    unrecorded = 1 - sum(kinds.values()) / metered if metered else 0.0
    return ", ".join([*shares, *([f"not in the store {unrecorded:.0%}"] if unrecorded > 0.005 else [])]) or "none"


def run_policy(sizes: list[tuple[int, int, int]], shape: Shape, budget: float) -> None:
    """Every size with the code importable here; prints as it goes."""
    with scratch_dir() as tmp:
        for providers, trials, runs in sizes:
            started = time.perf_counter()
            try:
                figures = [simulate(providers, trials, seed, tmp, shape, budget=budget) for seed in range(runs)]
            except TooSlow as exc:
                print(f"  {providers} providers: not measured, the simulation was stopped: {exc}", flush=True)
                continue
            for line in report(figures, time.perf_counter() - started):
                print(line, flush=True)


def today_tree(directory: Path) -> Path:
    """mltask as it was at ``TODAY``, plus the simulation module it did not have, in ``directory``."""
    archive = directory / "today.tar"
    with archive.open("wb") as fh:
        done = subprocess.run(["git", "-C", str(ROOT), "archive", TODAY, "mltask"], stdout=fh,
                              stderr=subprocess.PIPE, text=False)
    if done.returncode != 0:
        sys.exit(f"cannot extract mltask at {TODAY} from git ({done.stderr.decode().strip()}); "
                 "run from a clone with its history, or pass --policy tree")
    with tarfile.open(archive) as tar:
        tar.extractall(directory, filter="data")
    shutil.copy(ROOT / "mltask" / "simulation.py", directory / "mltask" / "simulation.py")
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--providers", type=int, nargs="+", default=sorted(SIZES), help="sizes to simulate")
    parser.add_argument("--runs", type=int, help="runs per size (default: see SIZES)")
    parser.add_argument("--trials", type=int, help="trials per run (default: see SIZES)")
    parser.add_argument("--policy", nargs="+", choices=POLICIES, default=list(POLICIES))
    parser.add_argument("--trials-per-subtask", type=int, default=Shape.trials_per_subtask)
    parser.add_argument("--folds", type=int, default=Shape.folds, help="CV folds; 1 means holdout")
    parser.add_argument("--quick", action="store_true", help="one run of 50 providers and 2,000 trials per policy")
    parser.add_argument("--budget", type=float, default=300.0, help="real seconds a run may take (default %(default)s)")
    parser.add_argument("--here", action="store_true", help=argparse.SUPPRESS)  # run with the importable mltask
    args = parser.parse_args()
    if args.quick:
        args.providers, args.trials, args.runs = [50], args.trials or 2_000, args.runs or 1
    sizes = []
    for providers in args.providers:
        trials, runs = SIZES.get(providers, (40 * providers, 1))
        sizes.append((providers, args.trials or trials, args.runs or runs))
    shape = Shape(args.trials_per_subtask, args.folds)
    if args.here:
        run_policy(sizes, shape, args.budget)
        return
    for policy in args.policy:
        print(f"{'today' if policy == 'today' else 'this tree'}'s policy"
              f"{f' (mltask at {TODAY})' if policy == 'today' else ''}:", flush=True)
        with tempfile.TemporaryDirectory(prefix="mltask-today-") as tmp:
            path = [str(today_tree(Path(tmp)))] if policy == "today" else []
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([*path, str(ROOT)]))
            done = subprocess.run([sys.executable, __file__, "--here", *sys.argv[1:]], env=env)
        if done.returncode != 0:
            sys.exit(done.returncode)


if __name__ == "__main__":
    main()
