"""The subtask protocol: what a requestor sends a provider and what comes back.

Both directions are JSON files in Golem's directory layout::

    /golem/resources/   dataset and script files (read-only), checked against sha256
    /golem/work/subtask.json     a SubtaskDefinition
    /golem/output/result.json    a SubtaskResult

A result is untrusted data from a stranger's machine. :func:`read_result` opens it without
following links, bounds its size before parsing, validates it against the schema (finite
numbers, bounded strings and lists) and checks that it answers the subtask that was sent:
same ids, same trials, same parameters, same seeds. Nothing in it is ever executed or
unpickled.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
from importlib import metadata
from pathlib import Path
from statistics import mean, pstdev
from typing import Annotated, ClassVar, Literal

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from mltask.definition import MAX_METRICS, MAX_SPLITS, CVSpec, DatasetSpec, EstimatorSpec, ScriptSpec
from mltask.space import Value

PROTOCOL_VERSION = 1
SUBTASK_FILE = "subtask.json"
RESULT_FILE = "result.json"
ERROR_FILE = "error.txt"  # written instead of a result when the provider itself failed (serve mode)
ERROR_BYTES = 2000
_BASE_RESULT_BYTES = 64 * 1024
_PER_TRIAL_RESULT_BYTES = 32 * 1024
_SCORE_BYTES = 40  # one more float in a result, with its separator
# No honest fit, score or subtask takes longer (116 days); a provider's 1e300 is refused at once.
MAX_SECONDS = 1e7
# Timings of a subtask's trials lie within its compute time (one process, one clock); the
# slack only absorbs float rounding of the sums.
_TIME_SLACK = 1e-6
RESOURCE_NAME = r"^[A-Za-z0-9_.\-]{1,200}$"  # a file name in the resources dir, never a path

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
Seconds = Annotated[float, Field(ge=0, le=MAX_SECONDS, allow_inf_nan=False)]
Digest = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Ident = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")]
Params = dict[Annotated[str, Field(max_length=200)], Value]
MetricName = Annotated[str, Field(max_length=100)]
FoldScores = Annotated[list[FiniteFloat], Field(max_length=MAX_SPLITS)]


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Optional(_Wire):
    """A wire model whose ``omitted`` fields are left out while ``None``.

    Multi-fidelity added fields to the subtask; leaving them out when unused keeps every
    other task's subtasks, state files and problem hashes byte for byte as they were.
    """

    omitted: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _omit_unused(self, handler: SerializerFunctionWrapHandler) -> dict:
        data = handler(self)
        for name in self.omitted:
            if data.get(name, 0) is None:
                del data[name]
        return data


class ResourceRef(_Wire):
    """A file in the resources dir; providers refuse to run if its hash differs."""

    name: Annotated[str, Field(pattern=RESOURCE_NAME)]
    sha256: Digest
    size: int = Field(ge=0)


class Problem(_Optional):
    """What a trial means, resolved by the requestor; identical in every subtask of a task."""

    omitted: ClassVar[frozenset[str]] = frozenset({"resource"})

    estimator: EstimatorSpec | None
    script: ScriptSpec | None
    dataset: DatasetSpec
    scoring: str | None  # the scorer the search optimises (the refit metric's)
    cv: CVSpec
    allowed_modules: list[str]
    resources: list[ResourceRef]
    metrics: dict[str, str] = {}  # with several scorers: every metric name -> scorer name
    refit_metric: str | None = None  # ...and which of them is ``scoring``
    return_train_score: bool = False
    resource: Annotated[str, Field(max_length=200)] | None = Field(
        default=None, description="Multi-fidelity: what a trial's `resource` sets, `n_samples` (training rows per "
        "fold) or a parameter's name."
    )

    def score_names(self) -> list[str]:
        """Names of the scores a trial reports per fold: each metric, or ``score`` for one scorer."""
        return list(self.metrics) or ["score"]


class TrialSpec(_Optional):
    omitted: ClassVar[frozenset[str]] = frozenset({"resource"})

    number: int = Field(ge=0)
    params: Params
    seed: int = Field(ge=0, lt=2**32)
    folds: Annotated[list[Annotated[int, Field(ge=0, lt=100)]], Field(min_length=1, max_length=100)] | None = Field(
        default=None, description="Only these CV folds (a verification check); default every fold."
    )
    resource: Annotated[int, Field(gt=0)] | Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = Field(
        default=None, description="Multi-fidelity: the rung's resource (see Problem.resource); default the whole."
    )

    @field_validator("folds")
    @classmethod
    def _distinct_sorted(cls, folds: list[int] | None) -> list[int] | None:
        if folds is not None and folds != sorted(set(folds)):
            raise ValueError("folds must be distinct and in increasing order")
        return folds


class SubtaskDefinition(_Wire):
    protocol: Literal[1] = PROTOCOL_VERSION
    task_id: Ident
    subtask_id: Ident
    problem: Problem
    trials: list[TrialSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _folds_exist(self) -> SubtaskDefinition:
        folds = problem_folds(self.problem)
        for trial in self.trials:
            if trial.folds is not None and trial.folds[-1] >= folds:
                raise ValueError(f"trial {trial.number} asks for fold {trial.folds[-1]}; the CV has {folds}")
        return self


class TrialResult(_Wire):
    """One configuration's outcome, as in a row of scikit-learn's ``cv_results_``."""

    number: int = Field(ge=0)
    params: Params
    seed: int = Field(ge=0, lt=2**32)
    status: Literal["ok", "failed"]
    fold_scores: list[FiniteFloat] = Field(default=[], max_length=100)
    mean_score: FiniteFloat | None = None
    std_score: FiniteFloat | None = None
    fit_times: list[Seconds] = Field(default=[], max_length=100)
    score_times: list[Seconds] = Field(default=[], max_length=100)
    fold_fingerprints: list[Digest] = Field(
        default=[], max_length=100, description="Per fold, sha256 of the rounded predictions it was scored on."
    )
    fingerprint: Digest | None = Field(default=None, description="sha256 of the fold fingerprints, in order.")
    error: Annotated[str, Field(max_length=2000)] | None = None
    metric_scores: dict[MetricName, FoldScores] = Field(
        default={}, max_length=MAX_METRICS, description="With several scorers: each metric's fold scores."
    )
    train_scores: dict[MetricName, FoldScores] = Field(
        default={}, max_length=MAX_METRICS, description="With return_train_score: each metric's (or `score`'s) "
        "fold scores on the training rows."
    )


class Environment(_Wire):
    """Versions that decide whether two runs can be compared bit for bit."""

    mltask: Annotated[str, Field(max_length=50)]
    python: Annotated[str, Field(max_length=50)]
    numpy: Annotated[str, Field(max_length=50)]
    scipy: Annotated[str, Field(max_length=50)]
    sklearn: Annotated[str, Field(max_length=50)]
    packages: dict[Annotated[str, Field(max_length=50)], Annotated[str, Field(max_length=50)]] = Field(
        default={}, max_length=20, description="Other distributions the problem scores with (lightgbm, pandas...)."
    )

    def mismatch(self, other: Environment) -> str | None:
        """How ``other`` differs in what decides scores (Python's patch level does not).

        ``other.packages`` (what the problem imports beyond scikit-learn) are compared with
        the versions installed here, whatever this process has imported so far.
        """
        ours, theirs = self.model_dump(exclude={"packages"}), other.model_dump(exclude={"packages"})
        ours["python"], theirs["python"] = ours["python"].rsplit(".", 1)[0], theirs["python"].rsplit(".", 1)[0]
        diffs = [f"{key} {theirs[key]} (requestor {ours[key]})" for key in ours if ours[key] != theirs[key]]
        for name, version in sorted(other.packages.items()):
            mine = installed_version(name)
            if mine != version:
                diffs.append(f"{name} {version} (requestor {mine or 'none'})")
        return ", ".join(diffs) or None


def installed_version(distribution: str) -> str | None:
    """The installed version of a distribution, or ``None``."""
    try:
        return metadata.version(distribution)
    except (metadata.PackageNotFoundError, ValueError):
        return None


class SubtaskResult(_Wire):
    protocol: Literal[1] = PROTOCOL_VERSION
    task_id: Ident
    subtask_id: Ident
    environment: Environment
    trials: list[TrialResult]
    compute_time: Seconds


class ResultError(Exception):
    """A result that cannot be accepted as an answer to its subtask, with the reason.

    An honest provider never produces one of these (it writes our schema), so the
    scheduler treats it as a lie, except :class:`MissingResult`, which a crash explains.
    """


class MissingResult(ResultError):
    """No result file at all: a fault (crash, kill), not evidence of cheating."""


def result_size_limit(subtask: SubtaskDefinition) -> int:
    """Largest result a subtask can honestly produce (errors and fold lists are bounded)."""
    problem = subtask.problem
    lists = len(problem.metrics) + (len(problem.score_names()) if problem.return_train_score else 0)
    per_trial = _PER_TRIAL_RESULT_BYTES + _SCORE_BYTES * problem.cv.n_splits * lists
    return _BASE_RESULT_BYTES + per_trial * len(subtask.trials)


def write_json_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_bounded(path: Path, limit: int) -> bytes:
    """Read a regular file that must not be a link nor larger than ``limit`` bytes."""
    try:
        # O_NONBLOCK: opening a FIFO planted as result.json must not hang the requestor.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise MissingResult(f"no {path.name} was written") from None
    except OSError as exc:
        raise ResultError(f"{path.name} cannot be opened safely ({exc.strerror}); links are refused") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # a directory, a FIFO, a device...
        os.close(fd)
        raise ResultError(f"{path.name} is not a regular file")
    with os.fdopen(fd, "rb") as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise ResultError(f"{path.name} is larger than the {limit}-byte bound for this subtask")
    return data


def read_result(output_dir: Path, subtask: SubtaskDefinition) -> SubtaskResult:
    """Read and structurally check the answer to ``subtask`` from ``output_dir``."""
    data = read_bounded(output_dir / RESULT_FILE, result_size_limit(subtask))
    try:
        result = SubtaskResult.model_validate_json(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ResultError(f"result does not match the schema at {where or 'top level'}: {first['msg']}") from None
    check_answers(result, subtask)
    return canonical(result)


def canonical(result: SubtaskResult) -> SubtaskResult:
    """``result`` with what the requestor computes itself from the folds, as the provider's code does:
    each ok trial's mean and std and its fingerprint; a failed trial keeps only its error.

    :func:`check_answers` holds the provider's own figures to the folds only within float
    rounding, and no re-run compares them: taken as sent, a mean nudged by 5e-10 won every tie
    and was reported as the verified best, and any fingerprint went into results.json.
    """
    return result.model_copy(update={"trials": [canonical_trial(t) for t in result.trials]})


def canonical_trial(trial: TrialResult) -> TrialResult:
    """One trial as :func:`canonical` makes it."""
    return trial.model_copy(update=(
        {"mean_score": float(np.mean(trial.fold_scores)), "std_score": float(np.std(trial.fold_scores)),
         "fingerprint": combined_fingerprint(trial.fold_fingerprints)} if trial.status == "ok" else
        {key: TrialResult.model_fields[key].default for key in TrialResult.model_fields
         if key not in ("number", "params", "seed", "status", "error")}))


def combined_fingerprint(fold_fingerprints: list[str]) -> str:
    """The trial's fingerprint: a hash of its folds' fingerprints, in fold order."""
    return hashlib.sha256("".join(fold_fingerprints).encode()).hexdigest()


def check_answers(result: SubtaskResult, subtask: SubtaskDefinition) -> None:
    """The result must answer exactly the trials that were sent, in order, with their seeds."""
    if (result.task_id, result.subtask_id) != (subtask.task_id, subtask.subtask_id):
        raise ResultError(f"result answers subtask {result.subtask_id!r}, not {subtask.subtask_id!r}")
    sent = [(t.number, t.params, t.seed) for t in subtask.trials]
    got = [(t.number, t.params, t.seed) for t in result.trials]
    if sent != got:
        raise ResultError("result trials differ from those sent (numbers, parameters or seeds)")
    all_folds = subtask_folds(subtask)
    for sent_trial, trial in zip(subtask.trials, result.trials, strict=True):
        folds = all_folds if sent_trial.folds is None else len(sent_trial.folds)
        if trial.status == "ok":
            if not (len(trial.fold_scores) == len(trial.fit_times) == len(trial.score_times)
                    == len(trial.fold_fingerprints) == folds):
                raise ResultError(
                    f"trial {trial.number} is ok but lacks its {folds} fold scores, times or fingerprints")
            if trial.mean_score is None or trial.std_score is None:
                raise ResultError(f"trial {trial.number} is ok but lacks its mean or std score")
            if not _close(trial.mean_score, mean(trial.fold_scores)):
                raise ResultError(f"trial {trial.number}: mean_score is not the mean of its fold scores")
            if not _close(trial.std_score, pstdev(trial.fold_scores)):
                raise ResultError(f"trial {trial.number}: std_score is not the deviation of its fold scores")
            _check_score_lists(trial, subtask.problem, folds)
        elif not trial.error:
            raise ResultError(f"trial {trial.number} failed without an error message")
    timed = math.fsum(math.fsum(t.fit_times) + math.fsum(t.score_times) for t in result.trials)
    if timed > result.compute_time * (1 + _TIME_SLACK) + _TIME_SLACK:
        raise ResultError(f"fit and score times add up to {timed:.6g} s, more than the {result.compute_time:.6g} s "
                          "compute time of the subtask")


def _check_score_lists(trial: TrialResult, problem: Problem, folds: int) -> None:
    """Every metric (and train score) the problem asks for, one per fold; the refit metric's are ``fold_scores``."""
    expected = {"metric_scores": list(problem.metrics),
                "train_scores": problem.score_names() if problem.return_train_score else []}
    for kind, names in expected.items():
        lists = getattr(trial, kind)
        if sorted(lists) != sorted(names) or any(len(scores) != folds for scores in lists.values()):
            raise ResultError(f"trial {trial.number}: {kind} must hold {folds} fold scores for each of "
                              f"{names or 'no metric'}")
    if problem.refit_metric is not None and trial.metric_scores[problem.refit_metric] != trial.fold_scores:
        raise ResultError(f"trial {trial.number}: fold_scores are not those of the refit metric "
                          f"{problem.refit_metric}")


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def problem_folds(problem: Problem) -> int:
    """How many CV folds a trial of ``problem`` has."""
    return problem.cv.n_splits


def subtask_folds(subtask: SubtaskDefinition) -> int:
    return problem_folds(subtask.problem)


def dumps(model: BaseModel) -> str:
    return json.dumps(model.model_dump(mode="json"), separators=(",", ":"))
