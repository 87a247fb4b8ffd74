"""The task JSON a requestor writes: golemcli's envelope with the search in ``options``.

Everything here is a pydantic model with ``extra="forbid"``, so a misspelt field is an error
naming it rather than a silently ignored setting. These models only check what can be
checked without touching the disk or importing estimators; :mod:`mltask.task` resolves the
rest (resource files, estimator, scorer, dataset columns) when the task is created.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mltask.errors import TaskError, pydantic_error_to_task_error
from mltask.space import SearchSpace

TASK_TYPE_ID = "ml_hyperparameter_search"
TASK_TYPE_NAME = "ML hyperparameter search"
BUILTIN_DATASETS = ("iris", "wine", "digits", "breast_cancer", "diabetes")
ALGORITHMS = ("grid", "random", "qmc", "tpe", "cmaes")

_DURATION = re.compile(r"^(\d+):(\d+):(\d+)$")


def duration_seconds(text: str) -> int:
    """Seconds in a golemcli duration ``HH:MM:SS`` (golemcli allowed ``00:60:00``, so do we)."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a duration; write HH:MM:SS, e.g. 00:10:00")
    h, m, s = (int(g) for g in match.groups())
    total = h * 3600 + m * 60 + s
    if total <= 0:
        raise ValueError("duration must be positive, e.g. 00:10:00")
    return total


def _check_duration(text: str) -> str:
    duration_seconds(text)
    return text


Duration = Annotated[str, AfterValidator(_check_duration)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PipelineSpec(_Strict):
    """``{"pipeline": [["scaler", "sklearn.preprocessing.StandardScaler"], ["svc", "sklearn.svm.SVC"]]}``."""

    pipeline: list[tuple[str, str]] = Field(min_length=1)

    @field_validator("pipeline")
    @classmethod
    def _unique_names(cls, steps: list[tuple[str, str]]) -> list[tuple[str, str]]:
        names = [name for name, _ in steps]
        if len(set(names)) != len(names):
            raise ValueError("step names repeat; give each step its own name")
        if any("__" in n or not n for n in names):
            raise ValueError("step names must be non-empty and contain no '__'")
        return steps


EstimatorSpec = str | PipelineSpec


class ScriptSpec(_Strict):
    """A training script among the resources: tune anything, not only scikit-learn.

    The file defines ``fit_and_score(params, X_train, y_train, X_valid, y_valid, seed)``
    returning a float, or ``(score, predictions)`` so verification can also compare the
    predictions. It is called once per CV fold.
    """

    file: str = Field(description="File name of the script, listed in `resources`.")
    function: str = Field(default="fit_and_score", description="Name of the function to call.")
    direction: Literal["maximize", "minimize"] = Field(
        default="maximize", description="Whether the script's score is better higher or lower."
    )


class DatasetSpec(_Strict):
    """Exactly one of ``builtin``, ``csv`` (with ``target``) or ``npz`` (arrays X and y)."""

    builtin: Literal["iris", "wine", "digits", "breast_cancer", "diabetes"] | None = Field(
        default=None, description="A scikit-learn toy dataset, loaded on the provider."
    )
    csv: str | None = Field(default=None, description="CSV file name, listed in `resources`.")
    target: str | None = Field(default=None, description="Target column of the CSV file.")
    npz: str | None = Field(default=None, description="NPZ file name with arrays X and y, listed in `resources`.")

    @model_validator(mode="after")
    def _exactly_one(self) -> DatasetSpec:
        given = [k for k in ("builtin", "csv", "npz") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of builtin, csv or npz")
        if self.csv is not None and not self.target:
            raise ValueError("a csv dataset needs `target`, the name of the label column")
        if self.csv is None and self.target is not None:
            raise ValueError("`target` only applies to csv datasets; remove it")
        return self

    @property
    def file(self) -> str | None:
        return self.csv or self.npz


class CVSpec(_Strict):
    """How each configuration is scored; the same seeded splits serve every trial."""

    kind: Literal["auto", "kfold", "stratified", "holdout"] = Field(
        default="auto", description="auto: stratified for classifiers, kfold otherwise (as scikit-learn's check_cv)."
    )
    folds: int = Field(default=5, ge=2, le=100, description="Number of folds (kfold, stratified).")
    test_size: float = Field(default=0.25, gt=0, lt=1, description="Validation fraction for holdout.")
    shuffle: bool = Field(default=True, description="Shuffle before splitting.")
    seed: int | None = Field(default=None, description="Seed of the splits; default: the task seed.")


class VerificationOptions(_Strict):
    """How results from untrusted providers are checked (see the README's verification section).

    Results are accepted at once and checked later by re-running samples of (trial, fold)
    evaluations on another, randomly chosen provider, with the requestor as referee when
    they disagree. ``budget`` bounds what sampled checks may cost; claimed failures and the
    best trial are re-run on the requestor whatever it says (``verify_best``).
    """

    budget: float = Field(
        default=0.05, ge=0, le=1,
        description="Most sampled-check compute as a fraction of useful compute (0 turns sampling off).",
    )
    verify_best: bool = Field(
        default=True, description="Re-run claimed failures, and the best trial in full before it is reported.",
    )
    referee_workers: int = Field(
        default=1, ge=1, le=64, description="Processes on the requestor that re-run disputed and final checks.",
    )
    rel_tolerance: float = Field(default=1e-9, ge=0, le=1, description="Relative tolerance on fold scores.")
    abs_tolerance: float = Field(default=1e-12, ge=0, description="Absolute tolerance on fold scores.")


class ProviderOptions(_Strict):
    """What one provider gets: the docker backend's container limits, the Golem demand.

    Trials run with one BLAS thread each, so one CPU per provider is the natural size;
    the memory limit is what kills a configuration that grows past it (a failed trial,
    not a hung task).
    """

    cpus: float = Field(default=1.0, gt=0, le=256, description="CPU threads per provider.")
    memory_gib: float = Field(default=2.0, gt=0, le=1024, description="Memory per provider, GiB; exceeding it kills.")
    storage_gib: float = Field(default=2.0, gt=0, le=100_000, description="Disk per provider, GiB (Golem demand).")
    image: str | None = Field(
        default=None, max_length=200, description="Provider Docker image; default mltask-provider:<version>."
    )


class GolemOptions(_Strict):
    """Where and how the golem backend finds providers; the price limit is the task's ``bid``."""

    image_hash: str | None = Field(
        default=None, pattern=r"^[0-9a-f]{56}$",
        description="sha3-224 of the provider image's .gvmi, printed by `mltask image gvmi`.",
    )
    image_url: str | None = Field(
        default=None, pattern=r"^https?://\S+$", max_length=500,
        description="Where providers download the .gvmi; default: the Golem image registry.",
    )
    subnet: str | None = Field(
        default=None, pattern=r"^[A-Za-z0-9_.\-]{1,64}$", description="Golem subnet; default $YAGNA_SUBNET or public."
    )
    payment_driver: str | None = Field(
        default=None, pattern=r"^[a-z0-9\-]{1,32}$",
        description="Payment driver; default $YAGNA_PAYMENT_DRIVER or erc20.",
    )
    payment_network: str | None = Field(
        default=None, pattern=r"^[a-z0-9\-]{1,32}$",
        description="Payment network; default $YAGNA_PAYMENT_NETWORK or holesky (a testnet).",
    )
    budget: float = Field(default=1.0, gt=0, le=1_000_000, description="Most GLM the task may spend; it stops before.")
    market_timeout: Duration = Field(default="00:05:00", description="Wait for offers at most this long, HH:MM:SS.")


class SearchOptions(_Strict):
    """The search itself: what to tune, on what data, how to score, which algorithm."""

    estimator: EstimatorSpec | None = Field(
        default=None, description="Import path of a scikit-learn estimator, or a pipeline of steps."
    )
    script: ScriptSpec | None = Field(default=None, description="A training script instead of an estimator.")
    dataset: DatasetSpec = Field(description="The data to train and validate on.")
    search_space: SearchSpace = Field(
        description="name -> parameter (int, float, categorical, fixed); a list is categorical, a scalar fixed."
    )
    scoring: str | None = Field(
        default=None, description="scikit-learn scorer name; default accuracy (classifiers) or r2 (regressors)."
    )
    cv: CVSpec = Field(default=CVSpec(), description="Cross-validation; see options.cv.")
    algorithm: Literal["grid", "random", "qmc", "tpe", "cmaes"] = Field(
        default="tpe", description="Optuna sampler: grid, random, qmc (scrambled Sobol), tpe, cmaes (needs cmaes)."
    )
    n_trials: int | None = Field(default=None, ge=1, le=1_000_000, description="Default 20; grid: the grid size.")
    seed: int = Field(default=0, ge=0, lt=2**32, description="Seeds the sampler, the CV splits and every trial.")
    output_path: str | None = Field(default=None, description="Results directory; default mltask-results/<name>.")
    allowed_modules: list[str] = Field(
        default=["sklearn."], description="Import-path prefixes providers may import estimators from."
    )
    max_attempts: int = Field(
        default=3, ge=1, le=20, description="Sends of a subtask before its trials count as failed (crash, timeout)."
    )
    max_provider_failures: int = Field(
        default=3, ge=1, le=1000, description="Failures in a row after which a provider is dropped."
    )
    verification: VerificationOptions = Field(
        default=VerificationOptions(), description="Checks of provider results; see options.verification."
    )
    provider: ProviderOptions = Field(
        default=ProviderOptions(), description="Resources per provider; see options.provider."
    )
    golem: GolemOptions = Field(default=GolemOptions(), description="The golem backend; see options.golem.")

    @model_validator(mode="after")
    def _one_model(self) -> SearchOptions:
        if (self.estimator is None) == (self.script is None):
            raise ValueError("give exactly one of estimator or script")
        if self.script is not None and self.scoring is not None:
            raise ValueError("scoring does not apply to a script (it returns its own score); remove it")
        return self


class TaskDefinition(_Strict):
    """The golemcli-style envelope: ``golemcli tasks create task.json`` with our type."""

    type: str = Field(default=TASK_TYPE_ID, description=f"{TASK_TYPE_ID!r} (or {TASK_TYPE_NAME!r}).")
    name: str = Field(
        default="mltask", min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.\- ]+$",
        description="Task name; names the default output dir.",
    )
    timeout: Duration = Field(default="01:00:00", description="Whole task, HH:MM:SS.")
    subtask_timeout: Duration = Field(default="00:10:00", description="One subtask, HH:MM:SS.")
    subtasks_count: int | None = Field(
        default=None, ge=1, le=100_000, description="Subtasks the trials are split into; default one per 5 trials."
    )
    bid: float = Field(default=1.0, ge=0, description="Highest price per hour accepted on Golem.")
    resources: list[str] = Field(default=[], description="Files sent to providers, relative to the task file.")
    options: SearchOptions = Field(description="The search; see the tables below.")

    @field_validator("type")
    @classmethod
    def _our_type(cls, value: str) -> str:
        if value not in (TASK_TYPE_ID, TASK_TYPE_NAME):
            raise ValueError(f"unknown task type {value!r}; use {TASK_TYPE_ID!r}")
        return TASK_TYPE_ID

    @property
    def timeout_seconds(self) -> int:
        return duration_seconds(self.timeout)

    @property
    def subtask_timeout_seconds(self) -> int:
        return duration_seconds(self.subtask_timeout)


def parse_definition(data: Any) -> TaskDefinition:
    """Validate a task already parsed from JSON, as a :class:`TaskError` on failure."""
    if not isinstance(data, dict):
        raise TaskError("task", "the task JSON must be an object; see `mltask tasks template`")
    try:
        return TaskDefinition.model_validate(data)
    except ValidationError as exc:
        raise pydantic_error_to_task_error(exc) from None


def load_definition(path: Path) -> TaskDefinition:
    """Read and validate a task file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TaskError(str(path), "no such task file; check the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TaskError(str(path), f"cannot read the task file ({exc})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TaskError(str(path), f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    return parse_definition(data)


def template() -> dict[str, Any]:
    """A minimal valid task, for ``mltask tasks template``."""
    return {
        "type": TASK_TYPE_ID,
        "name": "iris-svc",
        "timeout": "00:10:00",
        "subtask_timeout": "00:02:00",
        "subtasks_count": 4,
        "bid": 1.0,
        "resources": [],
        "options": {
            "estimator": "sklearn.svm.SVC",
            "dataset": {"builtin": "iris"},
            "search_space": {
                "C": {"type": "float", "low": 0.01, "high": 100.0, "log": True},
                "gamma": {"type": "float", "low": 0.0001, "high": 1.0, "log": True},
            },
            "scoring": "accuracy",
            "algorithm": "tpe",
            "n_trials": 20,
            "seed": 0,
        },
    }
