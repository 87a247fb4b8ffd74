"""Turn a validated task definition into a checked, self-contained :class:`Problem`.

pydantic checks shapes; this module checks everything that needs the disk or an import:
resource files exist and get hashed (and copied next to the task state, so a task never
depends on files that may move), the dataset loads and has its target column, the estimator
imports from an allowed module and has the parameters the search space names, the scorer
exists, the splits can be made, text columns reach an estimator that can take them. Each
failure is a :class:`TaskError` naming the field, raised before any trial runs.
"""

from __future__ import annotations

import difflib
import math
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

from mltask.data import Dataset, load_dataset
from mltask.definition import TaskDefinition
from mltask.errors import TaskError
from mltask.problem import build_estimator, load_script, make_splits
from mltask.protocol import Problem, ResourceRef
from mltask.provider import file_sha256
from mltask.samplers import make_sampler

DEFAULT_TRIALS = 20
TRIALS_PER_SUBTASK = 5
_RESOURCE_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,200}$")


@dataclass(frozen=True)
class Resolved:
    problem: Problem
    n_trials: int
    subtasks_count: int
    direction: str


def resolve(definition: TaskDefinition, base_dir: Path, resources_dir: Path) -> Resolved:
    """Check ``definition`` against the world; copy its resources into ``resources_dir``."""
    opts = definition.options
    refs = _collect_resources(definition.resources, base_dir, resources_dir)
    names = {r.name for r in refs}
    if opts.dataset.file is not None and opts.dataset.file not in names:
        field = "options.dataset.csv" if opts.dataset.csv else "options.dataset.npz"
        raise TaskError(field, f"{opts.dataset.file!r} is not among the resources; add its path to `resources`")
    if opts.script is not None and opts.script.file not in names:
        raise TaskError("options.script.file",
                        f"{opts.script.file!r} is not among the resources; add it to `resources`")
    data = load_dataset(opts.dataset, resources_dir)

    if opts.script is not None:
        load_script(opts.script, resources_dir)
        classifier, scoring, direction = False, None, opts.script.direction
    else:
        probe = Problem(
            estimator=opts.estimator, script=None, dataset=opts.dataset, scoring=None, cv=opts.cv,
            allowed_modules=opts.allowed_modules, resources=refs,
        )
        estimator = build_estimator(probe)
        _check_param_names(estimator, list(opts.search_space.params))
        from sklearn.base import is_classifier

        classifier = is_classifier(estimator)
        scoring = _check_scoring(opts.scoring or ("accuracy" if classifier else "r2"))
        direction = "maximize"  # scikit-learn scorers are greater-is-better (neg_* for errors)
        _check_text_columns(estimator, opts.search_space.fixed_values(), data)

    kind = opts.cv.kind if opts.cv.kind != "auto" else ("stratified" if classifier else "kfold")
    cv = opts.cv.model_copy(update={"kind": kind, "seed": opts.cv.seed if opts.cv.seed is not None else opts.seed})
    try:
        make_splits(cv, data)
    except ValueError as exc:
        raise TaskError("options.cv", f"cannot split the dataset: {exc}") from None

    make_sampler(opts.algorithm, opts.search_space, opts.seed)  # raises on an unusable space
    n_trials = _trial_budget(definition)
    count = min(definition.subtasks_count or math.ceil(n_trials / TRIALS_PER_SUBTASK), n_trials)
    problem = Problem(
        estimator=opts.estimator, script=opts.script, dataset=opts.dataset, scoring=scoring, cv=cv,
        allowed_modules=opts.allowed_modules, resources=refs,
    )
    return Resolved(problem, n_trials, count, direction)


def _collect_resources(paths: list[str], base_dir: Path, resources_dir: Path) -> list[ResourceRef]:
    refs: list[ResourceRef] = []
    resources_dir.mkdir(parents=True, exist_ok=True)  # parents: the output dir itself
    for i, raw in enumerate(paths):
        field = f"resources[{i}]"
        path = (base_dir / raw).resolve()
        if not path.is_file():
            raise TaskError(field, f"{raw!r} is not a file (paths are relative to the task file); check it")
        if not _RESOURCE_NAME.match(path.name):
            raise TaskError(field, f"file name {path.name!r} has characters providers refuse; rename it")
        if any(r.name == path.name for r in refs):
            raise TaskError(field, f"two resources are named {path.name!r}; providers see names only, rename one")
        shutil.copyfile(path, resources_dir / path.name)
        copy = resources_dir / path.name
        refs.append(ResourceRef(name=path.name, sha256=file_sha256(copy), size=copy.stat().st_size))
    return refs


def _check_param_names(estimator: object, names: list[str]) -> None:
    valid = estimator.get_params(deep=True)  # type: ignore[attr-defined]
    for name in names:
        if name not in valid:
            close = difflib.get_close_matches(name, list(valid), n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"valid names include {', '.join(sorted(valid)[:8])}"
            raise TaskError(f"options.search_space.{name}", f"not a parameter of the estimator; {hint}")


def _check_scoring(name: str) -> str:
    from sklearn.metrics import get_scorer_names

    names = get_scorer_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"did you mean {close[0]!r}?" if close else "see sklearn.metrics.get_scorer_names()"
        raise TaskError("options.scoring", f"unknown scorer {name!r}; {hint}")
    return name


def _check_text_columns(estimator: object, fixed: dict, data: Dataset) -> None:
    """Text columns are fine only if the pipeline encodes them: try it on a few rows."""
    text = data.non_numeric_features
    if not text:
        return
    from sklearn.base import clone

    sample = slice(0, min(len(data.y), 200))
    try:
        with warnings.catch_warnings():  # a probe on 200 rows: its ConvergenceWarning says nothing of the search
            warnings.simplefilter("ignore")
            clone(estimator).set_params(**fixed).fit(data.X[sample], data.y[sample])
    except Exception as exc:  # whatever the estimator raises, the cause is the text columns
        raise TaskError(
            "options.dataset",
            f"columns {', '.join(text[:5])} hold text and the estimator cannot take it "
            f"({type(exc).__name__}); encode them, or add an encoder step (e.g. OneHotEncoder) to the pipeline",
        ) from None


def _trial_budget(definition: TaskDefinition) -> int:
    opts = definition.options
    if opts.algorithm != "grid":
        return opts.n_trials or DEFAULT_TRIALS
    size = opts.search_space.grid_size()
    if opts.n_trials is not None and opts.n_trials < size:
        raise TaskError(
            "options.n_trials",
            f"the grid has {size} configurations but the budget is {opts.n_trials} trials; "
            "raise n_trials, shrink the grid, or use random search",
        )
    return size
