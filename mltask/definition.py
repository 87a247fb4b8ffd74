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

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from mltask.errors import TaskError, json_path, located, pydantic_error_to_task_error
from mltask.estimators import EstimatorObject
from mltask.space import SearchSpace

TASK_TYPE_ID = "ml_hyperparameter_search"
TASK_TYPE_NAME = "ML hyperparameter search"
BUILTIN_DATASETS = ("iris", "wine", "digits", "breast_cancer", "diabetes")
ALGORITHMS = ("grid", "random", "qmc", "tpe", "cmaes")
N_SAMPLES = "n_samples"  # the fidelity resource that subsamples each training fold

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

    @field_validator("pipeline", mode="before")
    @classmethod
    def _check_steps(cls, steps: Any) -> Any:
        """Name the step at fault and the fix; the type check after this would only say "not a string"."""
        if not isinstance(steps, list):
            return steps
        seen: dict[str, int] = {}
        for i, step in enumerate(steps):
            if not (isinstance(step, (list, tuple)) and len(step) == 2 and all(isinstance(p, str) for p in step)):
                raise located('a step is a [name, import path] pair, e.g. ["svc", "sklearn.svm.SVC"]', i)
            name, path = step
            if not name or "__" in name:
                raise located(f"step name {name!r} must be non-empty and contain no '__' (it separates "
                              "a step from its parameter, as in svc__C); rename it", i)
            if not path:
                raise located("the import path is empty; give the estimator's, e.g. sklearn.svm.SVC", i)
            if name in seen:
                raise located(f"step name {name!r} is also step {seen[name]}'s; give each step its own name", i)
            seen[name] = i
        return steps


def _estimator_kind(value: Any) -> str:
    # A discriminated union reports only the chosen member's errors: a bad pipeline gets
    # pipeline errors, not "Input should be a valid string" from the import-path member.
    if isinstance(value, EstimatorObject) or (isinstance(value, dict) and ("class" in value or "class_" in value)):
        return "EstimatorObject"
    return "PipelineSpec" if isinstance(value, (dict, PipelineSpec)) else "str"


EstimatorSpec = Annotated[
    Annotated[str, Tag("str")] | Annotated[PipelineSpec, Tag("PipelineSpec")]
    | Annotated[EstimatorObject, Tag("EstimatorObject")],
    Discriminator(_estimator_kind),
]


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
    npz: str | None = Field(
        default=None, description="NPZ file name with arrays X and y (or a table GolemSearchCV wrote), listed in "
        "`resources`."
    )
    groups: str | None = Field(
        default=None, description="Column (csv) or array (npz) holding each row's group, for the group CV kinds."
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> DatasetSpec:
        given = [k for k in ("builtin", "csv", "npz") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of builtin, csv or npz")
        if self.builtin is not None and self.groups is not None:
            raise ValueError("built-in datasets have no groups; use a csv or npz dataset with a groups column")
        if self.csv is not None and not self.target:
            raise ValueError("a csv dataset needs `target`, the name of the label column")
        if self.csv is None and self.target is not None:
            raise ValueError("`target` only applies to csv datasets; remove it")
        return self

    @property
    def file(self) -> str | None:
        return self.csv or self.npz


MAX_METRICS = 20
_METRIC_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,100}$")
CV_KINDS = ("auto", "kfold", "stratified", "holdout", "shuffle_split", "stratified_shuffle_split", "group",
            "stratified_group", "timeseries", "repeated_kfold", "repeated_stratified")
GROUP_KINDS = ("group", "stratified_group")
STRATIFIED_KINDS = ("stratified", "stratified_shuffle_split", "stratified_group", "repeated_stratified")
_SHUFFLE_SPLITS = ("holdout", "shuffle_split", "stratified_shuffle_split")
MAX_SPLITS = 100


class CVSpec(_Strict):
    """How each configuration is scored; the same seeded splits serve every trial.

    Each kind is the scikit-learn splitter of that name, built from these fields: ``kfold``
    KFold, ``stratified`` StratifiedKFold, ``holdout`` one ShuffleSplit (or the last rows
    when not shuffled), ``shuffle_split`` / ``stratified_shuffle_split`` (Stratified)ShuffleSplit,
    ``group`` / ``stratified_group`` (Stratified)GroupKFold on ``options.dataset.groups``,
    ``timeseries`` TimeSeriesSplit, ``repeated_kfold`` / ``repeated_stratified``
    Repeated(Stratified)KFold.
    """

    kind: Literal[CV_KINDS] = Field(  # type: ignore[valid-type]
        default="auto", description="auto: stratified for classifiers, kfold otherwise (as scikit-learn's check_cv); "
        "also holdout, shuffle_split, stratified_shuffle_split, group, stratified_group (need dataset.groups), "
        "timeseries, repeated_kfold, repeated_stratified."
    )
    folds: int = Field(default=5, ge=1, le=MAX_SPLITS, description="Number of folds, or of splits (shuffle splits, "
                       "timeseries).")
    repeats: int = Field(default=10, ge=1, le=MAX_SPLITS, description="Repetitions of the folds (repeated kinds).")
    test_size: float | None = Field(
        default=None, gt=0, description="Validation rows: a fraction below 1 or a count (holdout, shuffle splits: "
        "default 0.25 for holdout, 0.1 otherwise; timeseries: a count, default rows / (folds + 1)).",
    )
    train_size: float | None = Field(
        default=None, gt=0, description="Training rows of the shuffle splits: a fraction or a count; default the rest."
    )
    gap: int = Field(default=0, ge=0, description="Rows left out between training and validation (timeseries).")
    max_train_size: int | None = Field(default=None, ge=1, description="Most training rows per split (timeseries).")
    shuffle: bool = Field(default=True, description="Shuffle before splitting (not for timeseries).")
    seed: int | None = Field(default=None, ge=0, lt=2**32, description="Seed of the splits; default: the task seed.")

    @field_validator("test_size", "train_size")
    @classmethod
    def _fraction_or_count(cls, value: float | None) -> float | None:
        if value is not None and value >= 1 and value != int(value):
            raise ValueError("give a fraction below 1 or a whole number of rows")
        return int(value) if value is not None and value >= 1 else value

    @model_validator(mode="after")
    def _fits_kind(self) -> CVSpec:
        if self.kind not in ("holdout", "shuffle_split", "stratified_shuffle_split") and self.folds < 2:
            raise ValueError(f"{self.kind} needs at least 2 folds")
        if self.kind == "timeseries" and isinstance(self.test_size, float):
            raise ValueError("timeseries takes test_size as a number of rows, not a fraction")
        if self.kind not in _SHUFFLE_SPLITS and self.train_size is not None:
            raise ValueError("train_size applies to holdout and the shuffle splits only; remove it")
        if self.n_splits > MAX_SPLITS:
            raise ValueError(f"folds x repeats is {self.n_splits}, more than {MAX_SPLITS} splits; use fewer")
        return self

    @property
    def n_splits(self) -> int:
        """How many (train, validation) splits each configuration is scored on."""
        if self.kind == "holdout":
            return 1
        return self.folds * self.repeats if self.kind.startswith("repeated") else self.folds


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
        description="Payment network; default $YAGNA_PAYMENT_NETWORK or hoodi (a testnet; yagna's default).",
    )
    budget: float = Field(default=1.0, gt=0, le=1_000_000, description="Most GLM the task may spend; it stops before.")
    market_timeout: Duration = Field(default="00:05:00", description="Wait for offers at most this long, HH:MM:SS.")


class FidelitySpec(_Strict):
    """Multi-fidelity search: each configuration is scored at growing resources and the worst are stopped early.

    Rungs are ``min_resource * reduction_factor**k`` while below ``max_resource``, then
    ``max_resource``; a configuration is promoted to the next rung when it ranks in the top
    ``1 / reduction_factor`` of its rung so far (asynchronous successive halving, Optuna's
    ``SuccessiveHalvingPruner``), or by brackets of those (``hyperband``).
    """

    resource: str = Field(
        min_length=1, max_length=200, description="`n_samples` (each training fold is subsampled to the rung's size, "
        "stratified for classifiers; validation folds stay whole), or the estimator (or script) parameter that sets "
        "the amount of work, e.g. `max_iter` or `hgb__max_iter`; it must not also be searched.",
    )
    min_resource: Annotated[int, Field(gt=0)] | Annotated[float, Field(gt=0, allow_inf_nan=False)] = Field(
        description="The first rung's resource."
    )
    max_resource: Annotated[int, Field(gt=0)] | Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = Field(
        default=None, description="The last rung's resource; null: every training row (n_samples only)."
    )
    reduction_factor: int = Field(
        default=3, ge=2, le=100, description="Each rung has this many times the resource of the one before and "
        "keeps about 1 / this of its configurations."
    )
    schedule: Literal["asha", "hyperband"] = Field(
        default="asha", description="asha: one ladder from min_resource; hyperband: brackets of it starting at "
        "each rung."
    )

    @model_validator(mode="after")
    def _ordered(self) -> FidelitySpec:
        if self.max_resource is not None and self.min_resource >= self.max_resource:
            raise ValueError(f"min_resource {self.min_resource} must be below max_resource {self.max_resource}")
        return self


class SearchOptions(_Strict):
    """The search itself: what to tune, on what data, how to score, which algorithm."""

    estimator: EstimatorSpec | None = Field(
        default=None, description="Import path of a scikit-learn estimator, a pipeline of steps, or an estimator "
        "object {\"class\": import path, \"params\": {...}} (nested estimators too)."
    )
    script: ScriptSpec | None = Field(default=None, description="A training script instead of an estimator.")
    dataset: DatasetSpec = Field(description="The data to train and validate on.")
    search_space: SearchSpace = Field(
        description="name -> parameter (int, float, categorical, fixed); a list is categorical, a scalar fixed."
    )
    scoring: str | list[str] | dict[str, str] | None = Field(
        default=None, description="scikit-learn scorer name; default accuracy (classifiers) or r2 (regressors). "
        "Several: a list of names, or a dict of metric name -> scorer name, all scored on each fold's one fitted "
        "model; `refit_metric` names the one the search optimises.",
    )
    refit_metric: str | None = Field(
        default=None, description="With several scorers: the metric that ranks trials and picks the best (default "
        "the first)."
    )
    return_train_score: bool = Field(
        default=False, description="Also score each fold's training rows, as scikit-learn's return_train_score."
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
    fidelity: FidelitySpec | None = Field(
        default=None, description="Multi-fidelity search (successive halving); absent: every configuration gets the "
        "whole resource. See options.fidelity."
    )
    provider: ProviderOptions = Field(
        default=ProviderOptions(), description="Resources per provider; see options.provider."
    )
    golem: GolemOptions = Field(default=GolemOptions(), description="The golem backend; see options.golem.")

    @model_validator(mode="after")
    def _one_model(self) -> SearchOptions:
        if (self.estimator is None) == (self.script is None):
            raise ValueError("give exactly one of estimator or script")
        if self.script is not None and (self.scoring is not None or self.return_train_score):
            raise ValueError("scoring and return_train_score do not apply to a script (it returns its own score); "
                             "remove them")
        fidelity = self.fidelity
        if fidelity is not None and fidelity.resource in self.search_space.params:
            raise located(f"{fidelity.resource!r} is the fidelity resource, set by each rung; remove it from the "
                          "search space (or choose another resource)", "fidelity", "resource")
        if fidelity is not None and fidelity.resource != N_SAMPLES and fidelity.max_resource is None:
            raise located(f"a parameter resource ({fidelity.resource}) needs max_resource, the value a full "
                          "evaluation uses; give it", "fidelity", "max_resource")
        metrics = self.metrics
        if self.refit_metric is not None and self.refit_metric not in metrics:
            raise ValueError(f"refit_metric {self.refit_metric!r} is not one of the scorers "
                             f"({', '.join(metrics) or 'give scoring as a list or dict first'})")
        return self

    @field_validator("scoring")
    @classmethod
    def _metric_names(cls, scoring: Any) -> Any:
        names = scoring if isinstance(scoring, (list, dict)) else []
        if isinstance(scoring, (list, dict)) and not 1 <= len(scoring) <= MAX_METRICS:
            raise ValueError(f"give 1 to {MAX_METRICS} scorers")
        if isinstance(scoring, list) and len(set(scoring)) != len(scoring):
            raise ValueError("a scorer is listed twice; list each once")
        bad = next((n for n in names if not _METRIC_NAME.match(n)), None)
        if bad is not None:
            raise located("metric names are 1-100 letters, digits, '_', '-' or '.' (they name result columns)", bad)
        return scoring

    @property
    def metrics(self) -> dict[str, str]:
        """Metric name -> scorer name when several are scored; empty for one scorer."""
        if isinstance(self.scoring, list):
            return {name: name for name in self.scoring}
        return dict(self.scoring) if isinstance(self.scoring, dict) else {}


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
        default=None, ge=1, le=100_000,
        description="Subtasks the trials are split into; default one per trial for tpe and cmaes "
        "(adaptive samplers learn between subtasks), one per 5 trials otherwise.",
    )
    bid: float = Field(default=1.0, ge=0, description="Highest price per hour accepted on Golem.")
    resources: list[str] = Field(
        default=[], description="Files sent to providers, relative to the task file and inside its folder "
        "(or a --resources-root)."
    )
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
        data = json.loads(text, object_pairs_hook=_object)
    except json.JSONDecodeError as exc:
        raise TaskError(str(path), f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    repeated = _find_repeated(data, [])
    if repeated is not None:
        raise TaskError(json_path(repeated), "this key appears twice in the task file (JSON would keep only the "
                        "last one silently); remove one of them")
    return parse_definition(data)


class _Repeated(dict):  # type: ignore[type-arg]
    """A JSON object in which ``key`` appeared more than once."""

    key: str


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads``' object hook: keep the pairs, and mark an object that repeats a key.

    Only marked, not raised: the hook sees an object before its parents, so the path to
    it is known only once the whole document is parsed (:func:`_find_repeated`).
    """
    obj = dict(pairs)
    if len(obj) == len(pairs):
        return obj
    seen: set[str] = set()
    marked = _Repeated(obj)
    marked.key = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
    return marked


def _find_repeated(value: Any, path: list[str | int]) -> list[str | int] | None:
    """The path to the first repeated key, depth first in document order."""
    if isinstance(value, dict):
        for key, item in value.items():
            found = _find_repeated(item, [*path, key])
            if found is not None:
                return found
        return [*path, value.key] if isinstance(value, _Repeated) else None
    if isinstance(value, list):
        for i, item in enumerate(value):
            found = _find_repeated(item, [*path, i])
            if found is not None:
                return found
    return None


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
