"""A test harness of dishonest providers (not product code).

``InlineBackend`` runs the real provider entry point in this process, synchronously, for a
set of named providers, so hundreds of simulated searches take seconds (with an
``InlineReferee`` for the requestor's re-runs). ``TamperingLocal`` does the same on the local
backend's real worker processes and the real referee pool. A provider may be given a
*cheat*: a function that rewrites its honest result before the requestor reads it, the way
a dishonest machine would write whatever it liked into ``/golem/output``; it also cheats in
the check subtasks it is sent.
"""

from __future__ import annotations

import bisect
import copy
import json
import math
import random
import shutil
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mltask.backends.base import Backend, Completion
from mltask.backends.local import LocalBackend
from mltask.definition import parse_definition
from mltask.problem import combined_fingerprint
from mltask.protocol import (
    RESULT_FILE,
    Problem,
    SubtaskDefinition,
    SubtaskResult,
    TrialResult,
    TrialSpec,
    dumps,
    result_size_limit,
)
from mltask.provider import environment, evaluate_subtask
from mltask.referee import Referee
from mltask.scheduler import drive
from mltask.task import HyperparameterSearchTask
from mltask.verifier import Verifier

Cheat = Callable[[dict[str, Any], SubtaskDefinition, random.Random], "dict[str, Any] | bytes | None"]


def _consistent(trial: dict[str, Any]) -> None:
    """Recompute mean and std so a fake passes the structural checks and needs a re-run."""
    folds = trial["fold_scores"]
    mean = sum(folds) / len(folds)
    trial["mean_score"] = mean
    trial["std_score"] = (sum((f - mean) ** 2 for f in folds) / len(folds)) ** 0.5


def _ok_trials(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [t for t in doc["trials"] if t["status"] == "ok"]


def inflate(doc: dict[str, Any], subtask: SubtaskDefinition, rng: random.Random) -> dict[str, Any]:
    """Report every score higher than it was (capped at a perfect 1.0)."""
    for trial in _ok_trials(doc):
        trial["fold_scores"] = [min(1.0, s + 0.05) for s in trial["fold_scores"]]
        _consistent(trial)
    return doc


def random_scores(doc: dict[str, Any], subtask: SubtaskDefinition, rng: random.Random) -> dict[str, Any]:
    """Skip training and invent scores and predictions."""
    for trial in _ok_trials(doc):
        trial["fold_scores"] = [rng.random() for _ in trial["fold_scores"]]
        trial["fold_fingerprints"] = [f"{rng.getrandbits(256):064x}" for _ in trial["fold_fingerprints"]]
        _consistent(trial)
    return doc


def plausible_lazy(doc: dict[str, Any], subtask: SubtaskDefinition, rng: random.Random) -> dict[str, Any]:
    """Skip training but report believable, mediocre scores (never a new best)."""
    for trial in _ok_trials(doc):
        trial["fold_scores"] = [0.5 for _ in trial["fold_scores"]]
        _consistent(trial)
    return doc


def copy_trial(doc: dict[str, Any], subtask: SubtaskDefinition, rng: random.Random) -> dict[str, Any]:
    """Train one configuration and report its result for every other one too."""
    ok = _ok_trials(doc)
    for trial in ok[1:]:
        for key in ("fold_scores", "fold_fingerprints", "fingerprint", "mean_score", "std_score"):
            trial[key] = ok[0][key]
    return doc


def _bump_one_fold(doc: dict[str, Any], rng: random.Random, delta: float) -> dict[str, Any]:
    ok = _ok_trials(doc)
    if ok:
        trial = rng.choice(ok)
        fold = rng.randrange(len(trial["fold_scores"]))
        trial["fold_scores"][fold] = min(1.0, trial["fold_scores"][fold] + delta)
        _consistent(trial)
    return doc


def single_fold(doc: dict[str, Any], subtask: SubtaskDefinition, rng: random.Random) -> dict[str, Any]:
    """Inflate one fold of one trial only: the smallest lie that moves a score."""
    return _bump_one_fold(doc, rng, 0.2)


def small_fold(doc: dict[str, Any], subtask: SubtaskDefinition, rng: random.Random) -> dict[str, Any]:
    """Inflate one fold of one trial per subtask by 0.002: smaller than most gaps between scores."""
    return _bump_one_fold(doc, rng, 0.002)


def fake_best(doc: dict[str, Any], subtask: SubtaskDefinition, rng: random.Random) -> dict[str, Any]:
    """Train honestly but claim a perfect score for one configuration, to win."""
    ok = _ok_trials(doc)
    if ok:
        trial = rng.choice(ok)
        trial["fold_scores"] = [1.0 for _ in trial["fold_scores"]]
        _consistent(trial)
    return doc


def claim_failed(doc: dict[str, Any], subtask: SubtaskDefinition, rng: random.Random) -> dict[str, Any]:
    """Skip the work and say every configuration crashed."""
    for trial in doc["trials"]:
        _say_failed(trial)
    return doc


def _say_failed(trial: dict[str, Any]) -> None:
    trial.update(status="failed", error="MemoryError: out of memory", fold_scores=[], fold_fingerprints=[],
                 fit_times=[], score_times=[], mean_score=None, std_score=None, fingerprint=None)


def skip_trial(doc: dict[str, Any], subtask: SubtaskDefinition, rng: random.Random) -> dict[str, Any]:
    doc["trials"] = doc["trials"][:-1]
    return doc


def other_subtask(doc: dict[str, Any], subtask: SubtaskDefinition, rng: random.Random) -> dict[str, Any]:
    doc["subtask_id"] = "s999999"
    return doc


def malformed(doc: dict[str, Any], subtask: SubtaskDefinition, rng: random.Random) -> bytes:
    return b'{"task_id": "' + doc["task_id"].encode() + b'", "trials": [{'


def huge(doc: dict[str, Any], subtask: SubtaskDefinition, rng: random.Random) -> bytes:
    return json.dumps(doc).encode() + b" " * result_size_limit(subtask)


def nothing(doc: dict[str, Any], subtask: SubtaskDefinition, rng: random.Random) -> None:
    return None


def outdated(doc: dict[str, Any], subtask: SubtaskDefinition, rng: random.Random) -> dict[str, Any]:
    """Not a cheat: an honest provider on an image built with another scikit-learn."""
    doc["environment"]["sklearn"] = "0.24.2"
    return doc


def lower_good(doc: dict[str, Any], subtask: SubtaskDefinition, rng: random.Random) -> dict[str, Any]:
    """Sabotage: report every good trial (accuracy >= 0.9) a little worse, so a rival's result wins."""
    for trial in _ok_trials(doc):
        if trial["mean_score"] >= 0.9:
            trial["fold_scores"] = [s - 0.03 for s in trial["fold_scores"]]
            _consistent(trial)
    return doc


def hide_best(doc: dict[str, Any], subtask: SubtaskDefinition, rng: random.Random) -> dict[str, Any]:
    """Sabotage: report the subtask's best trial as crashed, so it can never win."""
    ok = _ok_trials(doc)
    if ok:
        _say_failed(max(ok, key=lambda t: t["mean_score"]))
    return doc


def replay_verifier(doc: dict[str, Any], subtask: SubtaskDefinition, rng: random.Random) -> dict[str, Any]:
    """Knows the code and the task seed, and replays what v1's seeded verifier would check.

    v1 drew its spot checks from ``random.Random(task seed)``; this provider trains only the
    trial that replay predicts and invents plausible scores (its neighbour's, noisy) with
    random fingerprints for the rest. Against draws from the OS the prediction is a guess.
    """
    ok = _ok_trials(doc)
    if len(ok) < 2:
        return doc
    replay = random.Random(doc["task_id"] + doc["subtask_id"])
    kept = replay.choice(ok)
    for trial in ok:
        if trial is not kept:
            trial["fold_scores"] = [min(1.0, s + rng.uniform(-0.01, 0.01)) for s in kept["fold_scores"]]
            trial["fold_fingerprints"] = [f"{rng.getrandbits(256):064x}" for _ in trial["fold_fingerprints"]]
            _consistent(trial)
    return doc


class Colluders:
    """Providers sharing state: each fakes its trials and confirms its partners' fakes when it checks them.

    A fake is remembered by (parameters, seed), which a check subtask repeats, so a colluder
    that is sent a partner's trial to check answers with the partner's invented folds.
    """

    def __init__(self) -> None:
        self.fakes: dict[str, dict[str, Any]] = {}

    def cheat(self, doc: dict[str, Any], subtask: SubtaskDefinition, rng: random.Random) -> dict[str, Any]:
        for spec, trial in zip(subtask.trials, doc["trials"], strict=True):
            key = json.dumps([spec.params, spec.seed], sort_keys=True)
            if trial["status"] != "ok":
                continue
            if spec.folds is None:  # our own work: invent it
                fake = {"fold_scores": [min(1.0, s + 0.05) for s in trial["fold_scores"]],
                        "fold_fingerprints": [f"{rng.getrandbits(256):064x}" for _ in trial["fold_scores"]]}
                self.fakes[key] = fake
            elif key in self.fakes:  # a partner's trial sent to us to check: confirm the partner
                fake = {k: [v[f] for f in spec.folds] for k, v in self.fakes[key].items()}
            else:
                continue
            trial.update(fake)
            _consistent(trial)
        return doc


def sometimes(cheat: Cheat, fraction: float) -> Cheat:
    """Cheat on a ``fraction`` of subtasks only, to stay under the radar."""

    def maybe(doc: dict[str, Any], subtask: SubtaskDefinition, rng: random.Random) -> Any:
        return cheat(doc, subtask, rng) if rng.random() < fraction else doc

    return maybe


CHEATS: dict[str, Cheat] = {
    "inflate": inflate, "random_scores": random_scores, "plausible_lazy": plausible_lazy, "copy_trial": copy_trial,
    "single_fold": single_fold, "fake_best": fake_best, "claim_failed": claim_failed, "skip_trial": skip_trial,
    "other_subtask": other_subtask, "malformed": malformed, "huge": huge,
}
# The adversaries of the verification issue, beyond the kinds above (colluders: see Colluders).
ADVERSARIES: dict[str, Callable[[], Cheat]] = {
    "replay_verifier": lambda: replay_verifier, "lower_good": lambda: lower_good, "hide_best": lambda: hide_best,
    "small_fold": lambda: small_fold, "patient": lambda: Patient(3),
}


# -- adversaries that keep state, know the code or work together --------------------------


def _invent(trial: dict[str, Any], pool: list[float], ceiling: float | None, rng: random.Random) -> None:
    """Replace a trial's folds by scores like ``pool`` (scores computed for real), with made-up fingerprints."""
    scores = [rng.choice(pool) + rng.gauss(0.0, 0.002) for _ in trial["fold_scores"]]
    trial["fold_scores"] = scores if ceiling is None else [min(s, ceiling) for s in scores]
    trial["fold_fingerprints"] = [f"{rng.getrandbits(256):064x}" for _ in scores]
    trial["fingerprint"] = combined_fingerprint(trial["fold_fingerprints"])
    _consistent(trial)


class Patient:
    """Honest for its first ``patience`` subtasks, to earn trust; then it trains nothing.

    Once trusted it reports scores like those it computed honestly, so its lies look like its work.
    """

    def __init__(self, patience: int = 20) -> None:
        self.patience = patience
        self.answered = 0
        self.pool: list[float] = []

    def __call__(self, doc: dict[str, Any], subtask: SubtaskDefinition, rng: random.Random) -> dict[str, Any]:
        self.answered += 1
        for trial in _ok_trials(doc):
            if self.answered <= self.patience:
                self.pool.extend(trial["fold_scores"])
            else:
                _invent(trial, self.pool or [0.5], None, rng)
        return doc


class Saboteur:
    """Trains honestly but hides its good configurations, so a worse one wins the search.

    A trial better than the best ``top`` share of what it computed before gets every fold
    lowered by ``drop``, or with ``fail`` is reported as crashed.
    """

    def __init__(self, *, fail: bool = False, top: float = 0.1, drop: float = 0.05) -> None:
        self.fail, self.top, self.drop = fail, top, drop
        self.means: list[float] = []

    def __call__(self, doc: dict[str, Any], subtask: SubtaskDefinition, rng: random.Random) -> dict[str, Any]:
        ok = _ok_trials(doc)
        bar = self.means[int(len(self.means) * (1 - self.top))] if len(self.means) >= 10 else math.inf
        for trial in ok:
            bisect.insort(self.means, trial["mean_score"])
            if trial["mean_score"] < bar:
                continue
            if self.fail:
                _say_failed(trial)
            else:
                trial["fold_scores"] = [s - self.drop for s in trial["fold_scores"]]
                _consistent(trial)
        return doc


class RungLiar:
    """Fakes scores below the maximum resource only, to steer a multi-fidelity search.

    Successive halving trains further only the configurations that rank high at a rung, so a
    low-rung lie changes which ones reach the maximum resource without ever claiming a
    score there: inflated, a configuration worse than the median of what this provider
    computed at that rung is promoted; with ``deflate``, a better one is lowered so it is
    stopped. With nothing computed at a rung yet it lies on everything there. Evaluations at
    ``max_resource`` and checks of others' work are honest.
    """

    def __init__(self, max_resource: float, *, deflate: bool = False, delta: float = 0.1) -> None:
        self.max_resource, self.deflate, self.delta = max_resource, deflate, delta
        self.seen: dict[float, list[float]] = {}

    def __call__(self, doc: dict[str, Any], subtask: SubtaskDefinition, rng: random.Random) -> dict[str, Any]:
        for spec, trial in zip(subtask.trials, doc["trials"], strict=True):
            resource = getattr(spec, "resource", None)
            if trial["status"] != "ok" or spec.folds is not None or resource is None or resource >= self.max_resource:
                continue
            seen = self.seen.setdefault(resource, [])
            median = seen[len(seen) // 2] if seen else None
            bisect.insort(seen, trial["mean_score"])
            if median is not None and (trial["mean_score"] >= median) != self.deflate:
                continue
            sign = -1.0 if self.deflate else 1.0
            trial["fold_scores"] = [min(1.0, s + sign * self.delta) for s in trial["fold_scores"]]
            _consistent(trial)
        return doc


# Adversaries of a multi-fidelity search, made for its maximum resource.
RUNG_ADVERSARIES: dict[str, Callable[[float], Cheat]] = {
    "promote_bad": lambda top: RungLiar(top), "prune_good": lambda top: RungLiar(top, deflate=True),
}


@dataclass
class Insight:
    """What an adversary that knows mltask's code and watches the traffic works with."""

    task: HyperparameterSearchTask
    verifier: Verifier | None = None


def replay_plan(insight: Insight, subtask: SubtaskDefinition, claimed: dict[str, Any],
                provider: str) -> list[tuple[int, int | None]] | None:
    """The (trial, fold) units the verifier will re-run of ``claimed``; ``None`` if its draws cannot be replayed.

    Today's verifier draws from ``random.Random(task seed)``, and the seed reaches providers
    (it seeds the CV splits, and can be recovered from trial seeds). An attacker who also
    sees the order results arrive in replays every draw; this reads the state that replay
    reaches from the verifier instead of recomputing it, and runs the verifier's own
    planning code on a copy. A verifier that draws from the OS leaves nothing to replay.
    """
    verifier = insight.verifier
    rng = getattr(verifier, "_rng", None)
    if type(rng) is not random.Random or not hasattr(verifier, "_plan"):
        return None
    twin = copy.copy(verifier)
    twin._rng = random.Random()
    twin._rng.setstate(rng.getstate())
    twin.seen_providers = set(verifier.seen_providers)
    return twin._plan(subtask, SubtaskResult.model_validate(claimed), provider, insight.task.progress().best_value)


class Replayer:
    """Knows the code and the task seed: trains only what the verifier will re-run, invents the rest.

    Its first answer is honest (it needs real scores to imitate). After that, invented
    scores stay below the best so far, so no invented trial is a contender for the best
    (which the verifier would re-run). Against a verifier it cannot replay it has to guess
    the unit that will be checked. Sent folds of someone else's trial to check, it answers
    honestly, unless ``answers`` shared with a partner hold that trial: then it repeats the
    partner's answer (:func:`colluders`).
    """

    def __init__(self, insight: Insight, name: str, answers: dict[tuple[str, int], dict[str, Any]] | None = None):
        self.insight, self.name = insight, name
        self.answers = {} if answers is None else answers
        self.pool: list[float] = []

    def __call__(self, doc: dict[str, Any], subtask: SubtaskDefinition, rng: random.Random) -> dict[str, Any]:
        honest = json.loads(json.dumps(doc))
        repeated = self._repeat(doc, subtask)
        best = self.insight.task.progress().best_value
        invented = [t for t in _ok_trials(doc) if t["number"] not in repeated]
        if best is None or not self.pool:
            self.pool.extend(s for t in invented for s in t["fold_scores"])
            return self._remember(doc, subtask)
        for trial in invented:
            _invent(trial, self.pool, best - 0.002, rng)
        plan = replay_plan(self.insight, subtask, doc, self.name)
        if plan is None and invented:  # nothing to replay: guess
            guess = rng.choice(invented)
            plan = [(guess["number"], rng.randrange(len(guess["fold_scores"])))]
        truth = {t["number"]: t for t in honest["trials"]}
        numbers = {t["number"] for t in invented}
        for number, fold in plan or []:
            if number not in numbers:
                continue
            trial = next(t for t in doc["trials"] if t["number"] == number)
            for f in range(len(trial["fold_scores"])) if fold is None else [fold]:
                trial["fold_scores"][f] = truth[number]["fold_scores"][f]
                trial["fold_fingerprints"][f] = truth[number]["fold_fingerprints"][f]
                self.pool.append(truth[number]["fold_scores"][f])
            trial["fingerprint"] = combined_fingerprint(trial["fold_fingerprints"])
            _consistent(trial)
        if replay_plan(self.insight, subtask, doc, self.name) not in (None, plan):
            return self._remember(honest, subtask)  # a real fold made a contender: this once, be honest
        return self._remember(doc, subtask)

    def _repeat(self, doc: dict[str, Any], subtask: SubtaskDefinition) -> set[int]:
        """Answer trials (or folds of them, to check) that were answered before as they were; their numbers.

        Folds of a trial nobody it knows answered are left honest: lying to a check is
        contradicting someone, and the requestor referees contradictions.
        """
        handled = set()
        for i, (spec, trial) in enumerate(zip(subtask.trials, doc["trials"], strict=True)):
            said = self.answers.get((json.dumps(spec.params, sort_keys=True), spec.seed))
            folds = getattr(spec, "folds", None)
            if folds is not None:
                handled.add(trial["number"])
                if said is not None and said["status"] == trial["status"] == "ok":
                    trial["fold_scores"] = [said["fold_scores"][f] for f in folds]
                    trial["fold_fingerprints"] = [said["fold_fingerprints"][f] for f in folds]
                    trial["fingerprint"] = combined_fingerprint(trial["fold_fingerprints"])
                    _consistent(trial)
            elif said is not None:
                doc["trials"][i] = dict(said, number=trial["number"])
                handled.add(trial["number"])
        return handled

    def _remember(self, doc: dict[str, Any], subtask: SubtaskDefinition) -> dict[str, Any]:
        for spec, trial in zip(subtask.trials, doc["trials"], strict=True):
            if getattr(spec, "folds", None) is None:
                self.answers[(json.dumps(spec.params, sort_keys=True), spec.seed)] = trial
        return doc


def colluders(insight: Insight, names: tuple[str, str] = ("colluder_a", "colluder_b")) -> dict[str, Replayer]:
    """Two replayers sharing what they answered: asked to check the other's work, one repeats its answer."""
    answers: dict[tuple[str, int], dict[str, Any]] = {}
    return {name: Replayer(insight, name, answers) for name in names}


# -- adversaries of the red-team tests (tests/test_attacks.py) -----------------------------


def _is_check(subtask: SubtaskDefinition) -> bool:
    """A check subtask asks for some folds of trials (a search subtask never sets ``folds``): a provider sees it."""
    return any(t.folds is not None for t in subtask.trials)


def framer(doc: dict[str, Any], subtask: SubtaskDefinition, rng: random.Random) -> dict[str, Any]:
    """Honest on its own work; sent someone else's trials to check, it contradicts them, to get them banned."""
    if _is_check(subtask):
        for trial in _ok_trials(doc):
            trial["fold_scores"] = [s - 0.1 for s in trial["fold_scores"]]
            trial["fold_fingerprints"] = [f"{rng.getrandbits(256):064x}" for _ in trial["fold_fingerprints"]]
            trial["fingerprint"] = combined_fingerprint(trial["fold_fingerprints"])
            _consistent(trial)
    return doc


def dodge_checks(doc: dict[str, Any], subtask: SubtaskDefinition, rng: random.Random) -> dict[str, Any] | None:
    """Honest on its own work, but never answers a check (as if it crashed): every check falls to others."""
    return None if _is_check(subtask) else doc


def check_aware(doc: dict[str, Any], subtask: SubtaskDefinition, rng: random.Random) -> dict[str, Any]:
    """Tells check subtasks from search subtasks: answers checks honestly, invents all its own work."""
    if not _is_check(subtask):
        for trial in _ok_trials(doc):
            _invent(trial, [0.9], None, rng)
    return doc


# Under the verifier's default relative tolerance (1e-9): a re-run "agrees" with the claim.
NUDGE = 1 + 5e-10


def nudge_folds(doc: dict[str, Any], subtask: SubtaskDefinition, rng: random.Random) -> dict[str, Any]:
    """Report every fold score higher by less than the tolerance: wins every tie, and no re-run disagrees."""
    for trial in _ok_trials(doc):
        trial["fold_scores"] = [s * NUDGE for s in trial["fold_scores"]]
        _consistent(trial)
    return doc


def nudge_mean(doc: dict[str, Any], subtask: SubtaskDefinition, rng: random.Random) -> dict[str, Any]:
    """Report every mean score (the value the search ranks by) higher than its folds' mean, within 1e-9."""
    for trial in _ok_trials(doc):
        trial["mean_score"] *= NUDGE
    return doc


def bogus_fingerprint(doc: dict[str, Any], subtask: SubtaskDefinition, rng: random.Random) -> dict[str, Any]:
    """Report a trial fingerprint that is not the hash of its fold fingerprints (results.json shows it)."""
    for trial in _ok_trials(doc):
        trial["fingerprint"] = f"{rng.getrandbits(256):064x}"
    return doc


def secondary_metric(doc: dict[str, Any], subtask: SubtaskDefinition, rng: random.Random) -> dict[str, Any]:
    """With several scorers: an impossible score (7.0) for every metric but the one the search optimises."""
    for trial in _ok_trials(doc):
        for name, scores in trial["metric_scores"].items():
            if scores != trial["fold_scores"]:
                trial["metric_scores"][name] = [7.0 for _ in scores]
    return doc


class FakeThenOutdated:
    """Inflates its first subtask, then claims another scikit-learn: hoping to be dropped (work kept), not banned."""

    def __init__(self) -> None:
        self.answered = 0

    def __call__(self, doc: dict[str, Any], subtask: SubtaskDefinition, rng: random.Random) -> dict[str, Any]:
        self.answered += 1
        return inflate(doc, subtask, rng) if self.answered == 1 else outdated(doc, subtask, rng)


class Withholder:
    """Hides good configurations by faults, not lies: no answer at all to a subtask holding a trial scoring
    ``threshold`` or more (a crash or a timeout, which is never evidence of cheating)."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold

    def __call__(self, doc: dict[str, Any], subtask: SubtaskDefinition, rng: random.Random) -> dict[str, Any] | None:
        return None if any(t["mean_score"] >= self.threshold for t in _ok_trials(doc)) else doc


class InlineBackend(Backend):
    """Named providers that run the provider entry point here, one subtask per ``wait``."""

    name = "inline"

    def __init__(self, cheats: dict[str, Cheat | None], seed: int = 0) -> None:
        self.cheats = cheats
        self.rng = random.Random(seed)
        self.faked: dict[str, int] = {name: 0 for name in cheats}
        self._queue: list[tuple[str, SubtaskDefinition]] = []

    def start(self, resources_dir: Path, scratch_dir: Path) -> None:
        self.resources_dir, self.scratch_dir = resources_dir, scratch_dir

    def idle_providers(self) -> list[str]:
        busy = {p for p, _ in self._queue}
        return [p for p in self.cheats if p not in busy]

    def submit(self, provider: str, subtask: SubtaskDefinition, timeout: float) -> None:
        self._queue.append((provider, subtask))

    def wait(self, timeout: float) -> list[Completion]:
        if not self._queue:
            return []
        provider, subtask = self._queue.pop(0)
        honest = json.loads(dumps(evaluate_subtask(subtask, self.resources_dir)))
        out = self.scratch_dir / provider / subtask.subtask_id
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        cheat = self.cheats[provider]
        written = cheat(json.loads(json.dumps(honest)), subtask, self.rng) if cheat else honest
        if written != honest:
            self.faked[provider] += 1
        if isinstance(written, bytes):
            (out / RESULT_FILE).write_bytes(written)
        elif written is not None:
            (out / RESULT_FILE).write_text(json.dumps(written))
        return [Completion(provider, subtask, out)]

    def close(self) -> None:
        self._queue.clear()


class Unrun(InlineBackend):
    """Inline providers that never run the trials ``skip`` picks and say they failed (as a timeout would).

    Claiming a failure costs the provider nothing, while the requestor re-runs every claimed failure.
    """

    def __init__(self, providers: list[str], skip: Callable[[dict[str, Any]], bool]) -> None:
        super().__init__(dict.fromkeys(providers))
        self.skip = skip

    def wait(self, timeout: float) -> list[Completion]:
        if not self._queue:
            return []
        provider, subtask = self._queue.pop(0)
        run = [t for t in subtask.trials if not self.skip(t.params)]
        done = {} if not run else {t.number: t for t in evaluate_subtask(
            subtask.model_copy(update={"trials": run}), self.resources_dir).trials}
        trials = [done.get(t.number) or TrialResult(number=t.number, params=t.params, seed=t.seed, status="failed",
                                                    error="TimeoutError: took too long") for t in subtask.trials]
        out = self.scratch_dir / provider / subtask.subtask_id
        out.mkdir(parents=True, exist_ok=True)
        answer = SubtaskResult(task_id=subtask.task_id, subtask_id=subtask.subtask_id, environment=environment(),
                               trials=trials, compute_time=1.0)
        (out / RESULT_FILE).write_text(dumps(answer))
        self.faked[provider] += len(run) < len(subtask.trials)
        return [Completion(provider, subtask, out)]


class InlineReferee:
    """The requestor's re-runs done in this process when submitted (tests only: it blocks the loop)."""

    def __init__(self, problem: Problem, resources_dir: Path) -> None:
        self.problem, self.resources_dir = problem, resources_dir
        self._done: list[tuple[Hashable, TrialResult, float]] = []
        self.submitted = 0

    def submit(self, key: Hashable, trial: TrialSpec) -> None:
        from mltask.referee import rerun  # here: bench/scale.py also runs this module against mltask before v2

        text, seconds = rerun(dumps(self.problem), str(self.resources_dir), dumps(trial))
        self._done.append((key, TrialResult.model_validate_json(text), seconds))
        self.submitted += 1

    def poll(self, timeout: float = 0.0) -> list[tuple[Hashable, TrialResult, float]]:
        done, self._done = self._done, []
        return done

    def cancel(self, keys: Iterable[Hashable]) -> set[Hashable]:
        dropped = set(keys) & {entry[0] for entry in self._done}
        self._done = [entry for entry in self._done if entry[0] not in dropped]
        return dropped

    def pending(self) -> int:
        return len(self._done)

    def lend(self, cores: int) -> None:
        """Nothing: re-runs here take no process of their own."""

    def close(self) -> None:
        self._done.clear()


def run_inline(data: dict[str, Any], output_dir: Path, cheats: dict[str, Cheat | None],
               seed: int = 0) -> tuple[HyperparameterSearchTask, InlineBackend, str]:
    """Run a whole search on inline providers; the task, the backend and how it stopped."""
    task = HyperparameterSearchTask.create(parse_definition(data), output_dir.parent, output_dir)
    backend = InlineBackend(cheats, seed)
    backend.start(task.resources_dir, output_dir / "scratch")
    verifier = Verifier(task, InlineReferee(task.problem, task.resources_dir))
    status = drive(task, backend, timeout=600, verifier=verifier)
    return task, backend, status


class TamperingLocal(LocalBackend):
    """The local backend's real worker processes, some of whose answers are rewritten by a cheat.

    The workers compute honestly; a cheating worker's ``result.json`` is rewritten before
    the requestor reads it, as a dishonest machine would write whatever it liked there.
    """

    def __init__(self, cheats: dict[str, Cheat], workers: int, seed: int = 0) -> None:
        super().__init__(workers=workers, preload=("sklearn.tree", "sklearn.model_selection", "sklearn.metrics"))
        self.cheats = cheats
        self.rng = random.Random(seed)
        self.faked = {name: 0 for name in cheats}

    def wait(self, timeout: float) -> list[Completion]:
        done = super().wait(timeout)
        for completion in done:
            cheat = self.cheats.get(completion.provider)
            path = (completion.output_dir or Path("/nonexistent")) / RESULT_FILE
            if cheat is None or not path.exists():
                continue
            honest = json.loads(path.read_text())
            written = cheat(json.loads(json.dumps(honest)), completion.subtask, self.rng)
            self.faked[completion.provider] += written != honest
            if isinstance(written, bytes):
                path.write_bytes(written)
            elif written is None:
                path.unlink()
            else:
                path.write_text(json.dumps(written))
        return done


def run_local(data: dict[str, Any], output_dir: Path, cheats: dict[str, Cheat], workers: int = 3, seed: int = 0,
              referee: Callable[[HyperparameterSearchTask], Referee] | None = None,
              timeout: float = 600) -> tuple[HyperparameterSearchTask, TamperingLocal, str]:
    """Run a whole search on real local worker processes (``local-0``...), some of them cheating.

    ``referee`` makes the requestor's re-runs (default: the real pool the scheduler makes).
    """
    task = HyperparameterSearchTask.create(parse_definition(data), output_dir.parent, output_dir)
    with TamperingLocal(cheats, workers, seed) as backend:
        backend.start(task.resources_dir, output_dir / "scratch")
        verifier = None if referee is None else Verifier(task, referee(task))
        status = drive(task, backend, timeout=timeout, verifier=verifier)
    return task, backend, status
