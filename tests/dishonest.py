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

import json
import random
import shutil
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

from mltask.backends.base import Backend, Completion
from mltask.backends.local import LocalBackend
from mltask.definition import parse_definition
from mltask.protocol import RESULT_FILE, Problem, SubtaskDefinition, TrialResult, TrialSpec, dumps, result_size_limit
from mltask.provider import evaluate_subtask
from mltask.referee import rerun
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


def single_fold(doc: dict[str, Any], subtask: SubtaskDefinition, rng: random.Random) -> dict[str, Any]:
    """Inflate one fold of one trial only: the smallest lie that moves a score."""
    ok = _ok_trials(doc)
    if ok:
        trial = rng.choice(ok)
        fold = rng.randrange(len(trial["fold_scores"]))
        trial["fold_scores"][fold] = min(1.0, trial["fold_scores"][fold] + 0.2)
        _consistent(trial)
    return doc


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
        trial.update(status="failed", error="MemoryError: out of memory", fold_scores=[], fold_fingerprints=[],
                     fit_times=[], score_times=[], mean_score=None, std_score=None, fingerprint=None)
    return doc


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


def small_faker(doc: dict[str, Any], subtask: SubtaskDefinition, rng: random.Random) -> dict[str, Any]:
    """Inflate one fold of one trial by 0.002: a lie too small to move anything but a close race."""
    ok = _ok_trials(doc)
    if ok:
        trial = rng.choice(ok)
        fold = rng.randrange(len(trial["fold_scores"]))
        trial["fold_scores"][fold] = min(1.0, trial["fold_scores"][fold] + 0.002)
        _consistent(trial)
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
        best = max(ok, key=lambda t: t["mean_score"])
        best.update(status="failed", error="MemoryError: out of memory", fold_scores=[], fold_fingerprints=[],
                    fit_times=[], score_times=[], mean_score=None, std_score=None, fingerprint=None)
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


def patient(cheat: Cheat, honest_subtasks: int) -> Cheat:
    """Honest for its first ``honest_subtasks`` subtasks, to earn trust; then ``cheat``."""
    seen = [0]

    def later(doc: dict[str, Any], subtask: SubtaskDefinition, rng: random.Random) -> Any:
        seen[0] += 1
        return cheat(doc, subtask, rng) if seen[0] > honest_subtasks else doc

    return later


def lazy_one(doc: dict[str, Any], subtask: SubtaskDefinition, rng: random.Random) -> dict[str, Any]:
    """Skip one trial per subtask and report a plausible score for it (its neighbour's)."""
    ok = _ok_trials(doc)
    if len(ok) >= 2:
        fake, model = rng.sample(ok, 2)
        for key in ("fold_scores", "fold_fingerprints", "fingerprint", "mean_score", "std_score"):
            fake[key] = model[key]
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
    "small_faker": lambda: small_faker, "patient_lazy": lambda: patient(lazy_one, 3),
}


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


class InlineReferee:
    """The requestor's re-runs done in this process when submitted (tests only: it blocks the loop)."""

    def __init__(self, problem: Problem, resources_dir: Path) -> None:
        self.problem, self.resources_dir = problem, resources_dir
        self._done: list[tuple[Hashable, TrialResult, float]] = []
        self.submitted = 0

    def submit(self, key: Hashable, trial: TrialSpec) -> None:
        text, seconds = rerun(dumps(self.problem), str(self.resources_dir), dumps(trial))
        self._done.append((key, TrialResult.model_validate_json(text), seconds))
        self.submitted += 1

    def poll(self, timeout: float = 0.0) -> list[tuple[Hashable, TrialResult, float]]:
        done, self._done = self._done, []
        return done

    def pending(self) -> int:
        return len(self._done)

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


def run_local(data: dict[str, Any], output_dir: Path, cheats: dict[str, Cheat], workers: int = 3,
              seed: int = 0) -> tuple[HyperparameterSearchTask, TamperingLocal, str]:
    """Run a whole search on real local worker processes (``local-0``...), some of them cheating."""
    task = HyperparameterSearchTask.create(parse_definition(data), output_dir.parent, output_dir)
    with TamperingLocal(cheats, workers, seed) as backend:
        backend.start(task.resources_dir, output_dir / "scratch")
        status = drive(task, backend, timeout=600)
    return task, backend, status
