"""A provider network in virtual time, and a synthetic objective to search on it.

What the scale benchmark (``bench/scale.py``) and its fast test run: the real task type, the
real scheduler loop (:func:`mltask.scheduler.drive`) and the real verifier, driving hundreds
or thousands of simulated providers from one process, as :mod:`optuna.testing` lets Optuna
test its samplers without training anything. Nothing sleeps: :class:`SimBackend` keeps an
event queue; ``submit`` schedules a subtask's end at now + its duration, ``wait`` pops the
next event and moves the virtual clock to it.

The objective (:func:`fit_and_score`, a training script any task can name) is evaluated for
real, in microseconds, so the verifier's re-runs reproduce honest providers bit for bit;
what it *would* cost is a cost model, virtual seconds per (trial, fold), heavy-tailed in the
parameters. Every evaluation in this process, wherever it runs, is charged to
:data:`METER`. The backend knows which evaluations it ran for providers, so the rest is the
requestor's own compute: today the verifier's re-runs, which run inside the dispatch loop
and stall it, so the backend moves its clock on by them before it does anything else.

The network: providers of different speeds, a share of subtasks lost to crashes or hangs
past the timeout, honest providers leaving (mid-subtask: a fault) and others joining.

A verification policy is measured as it runs for real, provided everything it times comes
from a clock it is given (here :meth:`SimBackend.clock`) and its requestor-side re-runs go
to a pool it is given (here :class:`SimReferee`, the pool in virtual time); re-runs inside
the loop itself are charged as a stall.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import json
import math
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np

from mltask.backends.base import Backend, Completion
from mltask.protocol import RESULT_FILE, SubtaskDefinition, dumps
from mltask.provider import evaluate_subtask

# A provider's behaviour: rewrite the honest result (a JSON document) before the requestor
# reads it; bytes are written as they are, None writes nothing. Same shape as the cheats of
# tests/dishonest.py.
Behaviour = Callable[[dict[str, Any], SubtaskDefinition, random.Random], "dict[str, Any] | bytes | None"]

# -- the synthetic objective --------------------------------------------------------------

SEARCH_SPACE: dict[str, Any] = {
    "x": {"type": "float", "low": 0.0, "high": 1.0},
    "y": {"type": "float", "low": 0.0, "high": 1.0},
    "lr": {"type": "float", "low": 1e-4, "high": 1.0, "log": True},
    "depth": {"type": "int", "low": 1, "high": 12},
}
FOLD_SECONDS = 6.0  # median virtual cost of one (trial, fold)
COST_SIGMA = 1.0  # lognormal spread of the cost over configurations
COST_CAP = 3.0  # in sigmas: the slowest configuration costs e^3 = 20x the median
NOISE = 0.01  # seeded noise per fold, on top of a smooth function of the parameters
ROWS = 60  # rows of the (index-only) dataset the folds are cut from
SCRIPT = "objective.py"
DATA = "rows.npz"


class Meter:
    """Virtual seconds of objective evaluated in this process so far (any thread).

    Kept in integer nanoseconds so that differences are exact: a run's figures must not
    depend on how much an earlier run in the same process charged.
    """

    def __init__(self) -> None:
        self._ns = 0
        self._lock = threading.Lock()

    def charge(self, seconds: float) -> None:
        with self._lock:
            self._ns += round(seconds * 1e9)

    @property
    def ns(self) -> int:
        return self._ns


METER = Meter()


def _uniform(*key: object) -> float:
    """A number in (0, 1) fixed by ``key``: cheap, well mixed, the same in every process."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "little") + 0.5) / 2.0**64


def fold_seconds(params: dict[str, Any]) -> float:
    """Virtual cost of one fold of a configuration: lognormal over configurations, capped."""
    return _fold_seconds(tuple(sorted(params.items())))


@functools.lru_cache(maxsize=1 << 16)
def _fold_seconds(params: tuple[tuple[str, Any], ...]) -> float:
    z = NormalDist().inv_cdf(_uniform("cost", params))
    return FOLD_SECONDS * math.exp(COST_SIGMA * max(-COST_CAP, min(COST_CAP, z)))


def diverges(params: dict[str, Any]) -> bool:
    """About 1% of the space fails every time, as a learning rate too high for a deep model does."""
    return params["lr"] > 0.5 and params["depth"] >= 11


def quality(params: dict[str, Any]) -> float:
    """The smooth part of the score; its maximum, 0.9, is at x=0.62, y=0.35, lr=0.006, depth=7."""
    return (0.9 - 0.3 * (params["x"] - 0.62) ** 2 - 0.2 * (params["y"] - 0.35) ** 2
            - 0.02 * (math.log10(params["lr"]) + 2.2) ** 2 - 0.002 * (params["depth"] - 7) ** 2)


def fit_and_score(params: dict[str, Any], X_train: np.ndarray, y_train: np.ndarray, X_valid: np.ndarray,
                  y_valid: np.ndarray, seed: int) -> tuple[float, np.ndarray]:
    """The training script: a score from the parameters, the seed and the fold, in microseconds.

    The dataset's only column is the row index, so the first validation row names the fold.
    """
    METER.charge(fold_seconds(params))
    if diverges(params):
        raise FloatingPointError("training diverged: lr too high for this depth")
    fold = int(X_valid[0, 0])
    score = quality(params) + NOISE * random.Random(seed * 100_003 + fold).gauss(0.0, 1.0)
    return score, np.array([score, float(fold)])


def trial_seconds(params: dict[str, Any], folds: int) -> float:
    """What evaluating a configuration honestly costs: every fold, or the one that diverges."""
    return fold_seconds(params) * (1 if diverges(params) else folds)


def synthetic_task(directory: Path, *, n_trials: int, trials_per_subtask: int, folds: int, seed: int,
                   verification: dict[str, Any] | None = None) -> dict[str, Any]:
    """A task searching the synthetic objective; its resources are written to ``directory``.

    Random search: trial *n*'s configuration does not depend on what came back, so a run
    with cheaters searches the same configurations as an honest run with the same seed.
    """
    directory.mkdir(parents=True, exist_ok=True)
    (directory / SCRIPT).write_text(f"from {__name__} import fit_and_score  # noqa: F401\n", encoding="utf-8")
    np.savez(directory / DATA, X=np.arange(ROWS, dtype=float).reshape(-1, 1), y=np.zeros(ROWS))
    cv = {"kind": "holdout", "test_size": 0.2} if folds == 1 else {"kind": "kfold", "folds": folds}
    options: dict[str, Any] = {
        "script": {"file": SCRIPT}, "dataset": {"npz": DATA}, "search_space": SEARCH_SPACE, "cv": cv,
        "algorithm": "random", "n_trials": n_trials, "seed": seed,
    }
    if verification is not None:
        options["verification"] = verification
    return {
        "type": "ml_hyperparameter_search", "name": "scale", "timeout": "1000:00:00", "subtask_timeout": "00:40:00",
        "subtasks_count": math.ceil(n_trials / trials_per_subtask),
        "resources": [str(directory / SCRIPT), str(directory / DATA)], "options": options,
    }


# -- the network --------------------------------------------------------------------------

@dataclass(frozen=True)
class Network:
    """How simulated providers behave apart from what they answer; times in virtual seconds."""

    fault_rate: float = 0.02  # subtasks never answered: half crash (no result), half hang past the timeout
    speed_sigma: float = 0.25  # providers' speeds: lognormal around the reference core, capped at 2 sigmas
    session_seconds: float = 20_000.0  # mean time an honest provider stays before it leaves
    rejoin_seconds: float = 1_000.0  # mean delay before a new provider takes a leaver's place


@dataclass
class _Run:
    token: int
    subtask: SubtaskDefinition
    honest: str  # the honest result, as JSON
    started: float
    fault: str | None  # None, "crash", "hang" or "left"


@dataclass
class _Ledger:
    """The backend's own clock and accounts, for the figures."""

    busy: float = 0.0  # provider-seconds spent on subtasks
    waiting: float = 0.0  # provider-seconds idle while work waited for the requestor to hand it out
    requestor: float = 0.0  # virtual seconds of objective the requestor evaluated itself
    cost: dict[str, float] = field(default_factory=dict)  # subtask id -> reference-core seconds it costs
    faked: dict[str, int] = field(default_factory=dict)  # provider -> trials it answered untruthfully


class SimBackend(Backend):
    """Providers that answer in virtual time; ``behaviours`` maps each to a cheat or ``None`` (honest).

    Honest providers come and go (:class:`Network`); the others stay, to do the most harm.
    ``demand`` says whether the task has work to hand out: a provider idle while there is
    none is not counted as waiting.
    """

    name = "simulated"

    def __init__(self, behaviours: dict[str, Behaviour | None], network: Network = Network(), seed: int = 0,
                 demand: Callable[[], bool] = lambda: True) -> None:
        self.behaviours = dict(behaviours)
        self.initial_providers = len(behaviours)
        self.network = network
        self.rng = random.Random(seed)
        self.demand = demand
        self.now = 0.0
        self.ledger = _Ledger(faked={p: 0 for p in behaviours})
        self._speed = {p: self._draw_speed() for p in behaviours}
        self._idle: dict[str, float] = {p: 0.0 for p in behaviours}  # provider -> idle since
        self._running: dict[str, _Run] = {}
        self._events: list[tuple[float, int, str, str, int]] = []  # (time, seq, kind, provider, token)
        self._leaves: dict[str, float] = {}  # honest provider -> when it leaves
        self._seq = 0
        self._joins = 0  # joins scheduled and not yet happened
        self._joined = 0
        self._metered = METER.ns
        self._starved_at = 0.0  # last time the task had nothing to hand out
        self.truth: dict[tuple[str, int], Any] = {}  # (params, seed) -> its honest TrialResult, every fold
        for provider, behaviour in behaviours.items():
            if behaviour is None:
                self._schedule_leave(provider)

    # -- Backend ------------------------------------------------------------------------

    def start(self, resources_dir: Path, scratch_dir: Path) -> None:
        self.resources_dir, self.scratch_dir = resources_dir, scratch_dir
        scratch_dir.mkdir(parents=True, exist_ok=True)

    def expecting_providers(self) -> bool:
        return self._joins > 0

    def idle_providers(self) -> list[str]:
        """Idle providers still here: one whose time to leave passed while the requestor was busy is gone."""
        self._catch_up()
        return [p for p in self._idle if self._leaves.get(p, math.inf) > self.now]

    def submit(self, provider: str, subtask: SubtaskDefinition, timeout: float) -> None:
        self._catch_up()
        since = self._idle.pop(provider)
        self.ledger.waiting += self.now - max(since, self._starved_at)
        before = METER.ns
        result = evaluate_subtask(subtask, self.resources_dir)
        cost = (METER.ns - before) / 1e9
        self._metered = METER.ns  # the provider's compute, not the requestor's
        self.ledger.cost[subtask.subtask_id] = cost
        for spec, trial in zip(subtask.trials, result.trials, strict=True):
            if getattr(spec, "folds", None) is None:
                self.truth[trial_key(spec.params, spec.seed)] = trial
        duration = cost / self._speed[provider]
        draw = self.rng.random()
        fault = "crash" if draw < self.network.fault_rate / 2 else "hang" if draw < self.network.fault_rate else None
        if fault == "crash":
            duration *= self.rng.random()
        elif fault == "hang" or duration > timeout:
            fault, duration = "hang", timeout
        self._seq += 1
        self._running[provider] = _Run(self._seq, subtask, dumps(result), self.now, fault)
        self._push(self.now + duration, "done", provider, self._seq)

    def wait(self, timeout: float) -> list[Completion]:
        """The next subtask to end (one at a time: each is settled before the next is read)."""
        self._catch_up()
        if not self.demand():
            self._starved_at = self.now
        while self._events:
            at, _, kind, provider, token = heapq.heappop(self._events)
            run = self._running.get(provider)
            if kind == "done" and (run is None or run.token != token):
                continue  # the provider left before it ended
            self.now = max(self.now, at)
            if kind == "wake":
                return []  # a re-run beside the loop ended: the loop polls for it
            if kind == "join":
                self._joins -= 1
                self._idle[provider] = at
                self._schedule_leave(provider)
                return []
            if kind == "leave":
                self._schedule_join()
                if run is None:
                    self._idle.pop(provider, None)
                    continue
                run.fault = "left"
            del self._running[provider]
            self.ledger.busy += max(at, run.started) - run.started  # a leave overdue after a stall: not before
            if kind == "done":
                self._idle[provider] = at
            return [self._deliver(provider, run)]
        return []

    def close(self) -> None:
        self._catch_up()
        self._running.clear()
        self._events.clear()

    def clock(self) -> float:
        """The virtual time now (the requestor's re-runs so far included), for its measurements and the figures."""
        self._catch_up()
        return self.now

    # -- internals ----------------------------------------------------------------------

    def _catch_up(self) -> None:
        """Charge what the requestor evaluated since we last looked, and stall the clock by it."""
        spent = (METER.ns - self._metered) / 1e9
        if spent > 0:
            self._metered = METER.ns
            self.ledger.requestor += spent
            self.now += spent

    def _deliver(self, provider: str, run: _Run) -> Completion:
        if run.fault == "hang":
            return Completion(provider, run.subtask, None, error="timed out")
        if run.fault == "left":
            return Completion(provider, run.subtask, None, error="the provider left the network")
        out = self.scratch_dir / provider
        out.mkdir(exist_ok=True)
        (out / RESULT_FILE).unlink(missing_ok=True)
        if run.fault == "crash":
            return Completion(provider, run.subtask, out)  # no result file: the worker died
        behaviour = self.behaviours.get(provider)
        if behaviour is None:
            (out / RESULT_FILE).write_text(run.honest)
            return Completion(provider, run.subtask, out)
        written = behaviour(json.loads(run.honest), run.subtask, self.rng)
        self.ledger.faked[provider] += faked_trials(json.loads(run.honest), written)
        if isinstance(written, bytes):
            (out / RESULT_FILE).write_bytes(written)
        elif written is not None:
            (out / RESULT_FILE).write_text(json.dumps(written))
        return Completion(provider, run.subtask, out)

    def _draw_speed(self) -> float:
        return math.exp(self.network.speed_sigma * max(-2.0, min(2.0, self.rng.gauss(0.0, 1.0))))

    def _push(self, at: float, kind: str, provider: str, token: int = 0) -> None:
        self._seq += 1
        heapq.heappush(self._events, (at, self._seq, kind, provider, token))

    def _schedule_leave(self, provider: str) -> None:
        self._leaves[provider] = self.now + self.rng.expovariate(1.0 / self.network.session_seconds)
        self._push(self._leaves[provider], "leave", provider)

    def _schedule_join(self) -> None:
        self._joined += 1
        provider = f"joined{self._joined}"
        self.behaviours[provider] = None
        self._speed[provider] = self._draw_speed()
        self._joins += 1
        self._push(self.now + self.rng.expovariate(1.0 / self.network.rejoin_seconds), "join", provider)


class SimReferee:
    """The requestor's re-run pool in virtual time: ``workers`` cores beside the dispatch loop.

    Implements :class:`mltask.referee.Referee`: a re-run is evaluated at once (for real,
    in microseconds) and its answer held until the virtual time its core would finish it;
    its compute is the requestor's, but it does not stall the loop.
    """

    def __init__(self, backend: SimBackend, problem: Any, resources_dir: Path, workers: int = 1) -> None:
        self.backend, self.problem, self.resources_dir = backend, problem, resources_dir
        self._free = [0.0] * workers  # when each core is free, a heap
        self._done: list[tuple[float, int, Any, Any, float]] = []  # (at, seq, key, result, seconds)
        self._seq = 0

    def submit(self, key: Any, trial: Any) -> None:
        from mltask.provider import evaluator_for

        backend = self.backend
        backend._catch_up()
        before = METER.ns
        result = evaluator_for(self.problem, self.resources_dir).evaluate(trial, getattr(trial, "folds", None))
        backend._metered = METER.ns  # compute beside the loop: no stall
        seconds = (METER.ns - before) / 1e9
        backend.ledger.requestor += seconds
        end = max(backend.now, heapq.heappop(self._free)) + seconds
        heapq.heappush(self._free, end)
        self._seq += 1
        heapq.heappush(self._done, (end, self._seq, key, result, seconds))
        backend._push(end, "wake", "")

    def poll(self, timeout: float = 0.0) -> list[tuple[Any, Any, float]]:
        backend = self.backend
        backend._catch_up()
        if timeout > 0 and self._done and not backend._running:  # nothing else can happen first: wait for it
            backend.now = max(backend.now, self._done[0][0])
        out = []
        while self._done and self._done[0][0] <= backend.now:
            _, _, key, result, seconds = heapq.heappop(self._done)
            out.append((key, result, seconds))
        return out

    def cancel(self, keys: Any) -> set[Any]:
        """Nothing: every re-run here is charged to a virtual core when submitted, so it has
        started, and its answer comes back to be accounted for."""
        return set()

    def pending(self) -> int:
        return len(self._done)

    def lend(self, cores: int) -> None:
        """Nothing: the simulated providers are other machines, and lend no core (see Backend.spare_cores)."""

    def close(self) -> None:
        self._done.clear()


def trial_key(params: dict[str, Any], seed: int) -> tuple[str, int]:
    """What identifies a trial's work whatever number it is sent under."""
    return json.dumps(params, sort_keys=True), seed


def faked_trials(honest: dict[str, Any], written: dict[str, Any] | bytes | None) -> int:
    """How many of a subtask's trials an answer gets wrong (a malformed answer: all of them)."""
    if written is None:
        return 0  # no answer looks like a crash; it fakes nothing
    count = len(honest["trials"])
    if not isinstance(written, dict) or (written.get("task_id"), written.get("subtask_id")) != (
            honest["task_id"], honest["subtask_id"]):
        return count
    said = {t.get("number"): t for t in written.get("trials", []) if isinstance(t, dict)}
    return sum(said.get(t["number"]) != t for t in honest["trials"])


# -- the figures --------------------------------------------------------------------------

FAKED_ENOUGH = 10  # an adversary that faked this many trials must have been caught


@dataclass
class Figures:
    """One simulated run, measured from the task's store and the backend's clock."""

    providers: int
    trials: int
    provider_busy: float  # busy / (busy + idle while work waited to be handed out)
    requestor_cores: float  # requestor verification compute / makespan
    overhead: float  # all verification compute / useful compute
    faked: dict[str, int]  # adversary -> trials it faked
    banned: set[str]  # adversaries banned
    faked_left: int  # trials whose final result is not what an honest evaluation gives
    left_by: dict[str, int]  # the same by the provider whose result it is, and whether it was banned
    lost: int  # trials given up on (failed after every attempt) though they evaluate fine
    outcome_changed: bool  # the reported best is not the honest best of the same configurations
    false_bans: int  # honest providers banned
    makespan: float
    useful: float  # reference-core seconds of one honest evaluation of every trial
    requestor_records: dict[str, float]  # the requestor's re-runs as its verdicts record them, by kind of check

    @property
    def eligible(self) -> set[str]:
        return {p for p, n in self.faked.items() if n >= FAKED_ENOUGH}


def measure(task: Any, backend: SimBackend, adversaries: set[str]) -> Figures:
    """The figures of a finished run; ``adversaries`` are the providers that lie (not the merely outdated).

    Compute is in reference-core seconds of the cost model: the requestor's as the backend
    metered it (all of its evaluations, in the loop or beside it), check subtasks' as the
    providers were charged for them, the search's as one honest evaluation of every trial.
    """
    from mltask.protocol import TrialSpec
    from mltask.provider import evaluator_for

    makespan = backend.clock()
    cv = task.problem.cv
    folds = 1 if cv.kind == "holdout" else cv.folds
    rows = task.store.trials()
    checks = sum(backend.ledger.cost.get(s["subtask_id"], 0.0) for s in task.store.subtasks()
                 if s.get("purpose") == "check")
    useful = sum(trial_seconds(r.params, folds) for r in rows)
    evaluator = evaluator_for(task.problem, task.resources_dir)
    truth = {r.number: backend.truth.get(trial_key(r.params, r.seed)) or evaluator.evaluate(
        TrialSpec(number=r.number, params=r.params, seed=r.seed)) for r in rows}
    faked_left = lost = 0
    left_by: dict[str, int] = {}
    bans = set(task.store.bans())
    for row in rows:
        honest = truth[row.number]
        if row.result is None:
            continue
        if str(row.result.get("error", "")).startswith("gave up after"):
            lost += honest.status == "ok"
        elif (row.result.get("status"), row.result.get("fold_scores"), row.result.get("fold_fingerprints")) != (
                honest.status, honest.fold_scores, honest.fold_fingerprints):
            faked_left += 1
            who = f"{row.provider}{' (banned)' if row.provider in bans else ''}"
            left_by[who] = left_by.get(who, 0) + 1
    sign = 1.0 if task.direction == "maximize" else -1.0
    honest_best = max((sign * t.mean_score for t in truth.values() if t.status == "ok"), default=None)
    best = task.best_trial()
    reported = None if best is None else truth[best.number]
    changed = (reported is None or reported.status != "ok" or sign * reported.mean_score != honest_best
               or best.value != reported.mean_score)
    honest_providers = {p for p, b in backend.behaviours.items() if b is None}
    ledger = backend.ledger
    return Figures(
        providers=backend.initial_providers, trials=len(rows),
        provider_busy=ledger.busy / max(ledger.busy + ledger.waiting, 1e-12),
        requestor_cores=ledger.requestor / max(makespan, 1e-12), overhead=(ledger.requestor + checks) / useful,
        faked={p: ledger.faked[p] for p in adversaries}, banned=bans & adversaries, faked_left=faked_left,
        left_by=left_by,
        lost=lost, outcome_changed=changed, false_bans=len(bans & honest_providers), makespan=makespan,
        useful=useful, requestor_records=requestor_records(task, folds),
    )


def requestor_records(task: Any, folds: int) -> dict[str, float]:
    """The requestor's re-runs as the store records them, by kind of check (to cross-check the meter).

    A policy that records where each check ran and what it cost is taken at its word;
    before that (every check on the requestor, real seconds), the cost of the units checked.
    """
    params = {r.number: r.params for r in task.store.trials()}
    records: dict[str, float] = {}
    for verdict in task.store.verdicts():
        if "by" in verdict:
            seconds = verdict["seconds"] if verdict["by"] == "requestor" else 0.0
        else:
            seconds = sum(trial_seconds(params[n], folds) if f is None else fold_seconds(params[n])
                          for n, f in json.loads(verdict["checked"]))
        records[verdict["kind"]] = records.get(verdict["kind"], 0.0) + seconds
    return records
