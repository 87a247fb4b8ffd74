"""Turn a validated task definition into a checked, self-contained :class:`Problem`.

pydantic checks shapes; this module checks everything that needs the disk or an import:
resource files exist, lie where a task file may reach, and get hashed (and copied next to
the task state, so a task never depends on files that may move), the dataset loads and has
its target column, the estimator imports from an allowed module and has the parameters the
search space names, the scorer exists, the splits can be made, text columns reach an
estimator that can take them. Each failure is a :class:`TaskError` naming the field, raised before any trial runs.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import shutil
import stat
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath

import numpy as np

from mltask.data import Dataset, load_dataset
from mltask.definition import GROUP_KINDS, N_SAMPLES, STRATIFIED_KINDS, FidelitySpec, TaskDefinition
from mltask.errors import TaskError
from mltask.param_values import check_param, estimator_params
from mltask.problem import build_estimator, load_script, make_splits
from mltask.protocol import Problem, ResourceRef
from mltask.provider import file_sha256
from mltask.samplers import make_sampler
from mltask.space import SearchSpace

DEFAULT_TRIALS = 20
TRIALS_PER_SUBTASK = 5
# An adaptive sampler learns from finished trials, so every trial in flight is proposed
# without the results of the others: with 2 providers and subtasks of 5, half of a 20-trial
# TPE search went out before anything came back, and it trailed sequential TPE (ratio of
# regrets 1.19 at 20 trials, 0.99 with one trial per subtask; bench/tpe_batched.py).
ADAPTIVE_TRIALS_PER_SUBTASK = {"tpe": 1, "cmaes": 1}
_RESOURCE_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,200}$")


@dataclass(frozen=True)
class Resolved:
    problem: Problem
    n_trials: int
    subtasks_count: int
    direction: str
    max_resource: float | None = None  # multi-fidelity: the last rung's resource, resolved


def resolve(definition: TaskDefinition, base_dir: Path, resources_dir: Path,
            resources_roots: Sequence[Path] = ()) -> Resolved:
    """Check ``definition`` against the world; copy its resources into ``resources_dir``.

    Resources are files under ``base_dir`` (the task file's folder) or a ``resources_roots`` dir.
    """
    opts = definition.options
    refs = _collect_resources(definition.resources, base_dir, resources_dir, resources_roots)
    names = {r.name for r in refs}
    if opts.dataset.file is not None and opts.dataset.file not in names:
        field = "options.dataset.csv" if opts.dataset.csv else "options.dataset.npz"
        raise TaskError(field, _not_listed(opts.dataset.file, names))
    if opts.script is not None and opts.script.file not in names:
        raise TaskError("options.script.file", _not_listed(opts.script.file, names))
    data = load_dataset(opts.dataset, resources_dir)

    if opts.script is not None:
        load_script(opts.script, resources_dir)
        classifier, scoring, direction = False, None, opts.script.direction
        metrics, refit_metric = {}, None
    else:
        probe = Problem(
            estimator=opts.estimator, script=None, dataset=opts.dataset, scoring=None, cv=opts.cv,
            allowed_modules=opts.allowed_modules, resources=refs,
        )
        estimator = build_estimator(probe)
        _check_param_names(estimator, list(opts.search_space.params))
        _check_param_values(opts.search_space)
        from sklearn.base import is_classifier

        classifier = is_classifier(estimator)
        metrics = {name: _check_scoring(scorer, f"options.scoring.{name}") for name, scorer in opts.metrics.items()}
        refit_metric = (opts.refit_metric or next(iter(metrics))) if metrics else None
        default = "accuracy" if classifier else "r2"
        scoring = metrics[refit_metric] if refit_metric else _check_scoring(opts.scoring or default)  # type: ignore
        direction = "maximize"  # scikit-learn scorers are greater-is-better (neg_* for errors)
        _check_text_columns(estimator, opts.search_space.fixed_values(), data)

    kind = opts.cv.kind if opts.cv.kind != "auto" else ("stratified" if classifier else "kfold")
    if kind in GROUP_KINDS and data.groups is None:
        raise TaskError("options.dataset.groups", f"cv kind {kind} splits by group: name the column (csv) or array "
                        "(npz) holding each row's group")
    cv = opts.cv.model_copy(update={"kind": kind, "seed": opts.cv.seed if opts.cv.seed is not None else opts.seed})
    try:
        splits = make_splits(cv, data)
    except ValueError as exc:
        raise TaskError("options.cv", f"cannot split the dataset: {exc}") from None
    max_resource = None
    if opts.fidelity is not None:
        # Subsamples are stratified as the evaluator does it: for classifiers and stratified CV kinds.
        max_resource = _check_fidelity(opts.fidelity, None if opts.script is not None else estimator, data, splits,
                                       classifier or kind in STRATIFIED_KINDS)
    make_sampler(opts.algorithm, opts.search_space, opts.seed)  # raises on an unusable space
    n_trials = _trial_budget(definition)
    per_subtask = ADAPTIVE_TRIALS_PER_SUBTASK.get(opts.algorithm, TRIALS_PER_SUBTASK)
    count = min(definition.subtasks_count or math.ceil(n_trials / per_subtask), n_trials)
    problem = Problem(
        estimator=opts.estimator, script=opts.script, dataset=opts.dataset, scoring=scoring, cv=cv,
        allowed_modules=opts.allowed_modules, resources=refs, metrics=metrics, refit_metric=refit_metric,
        return_train_score=opts.return_train_score, resource=opts.fidelity.resource if opts.fidelity else None,
    )
    return Resolved(problem, n_trials, count, direction, max_resource)


def _check_fidelity(fidelity: FidelitySpec, estimator: object | None, data: Dataset, splits: list,
                    stratified: bool) -> float:
    """A resource the rungs can set: an estimator parameter, or row counts every training fold can give;
    returns the maximum resource (``null`` for ``n_samples``: the smallest training fold's rows).

    A script takes any parameter resource (its ``params`` are its own), and ``n_samples``.
    ``n_samples`` must leave each class of a stratified subsample at least two rows, as
    scikit-learn's halving search requires, and cannot exceed the smallest training fold.
    """
    field = "options.fidelity"
    if fidelity.resource != N_SAMPLES:
        if estimator is not None:
            _check_param_names(estimator, [fidelity.resource], f"{field}.resource")
        assert fidelity.max_resource is not None  # the definition requires it for a parameter
        return fidelity.max_resource
    for name in ("min_resource", "max_resource"):
        value = getattr(fidelity, name)
        if value is not None and value != int(value):
            raise TaskError(f"{field}.{name}", f"n_samples counts training rows; give a whole number, not {value}")
    smallest = min(len(train) for train, _ in splits)
    if fidelity.max_resource is not None and fidelity.max_resource > smallest:
        raise TaskError(f"{field}.max_resource", f"{fidelity.max_resource} is more than the {smallest} training "
                        "rows of the smallest CV fold; lower it, or give null for all of them")
    if fidelity.min_resource >= smallest:
        raise TaskError(f"{field}.min_resource", f"{fidelity.min_resource} leaves nothing to halve: the smallest "
                        f"training fold has {smallest} rows; lower it")
    if stratified:
        classes = len(np.unique(data.y))
        if fidelity.min_resource < 2 * classes:
            raise TaskError(f"{field}.min_resource", f"{fidelity.min_resource} rows cannot hold 2 of each of the "
                            f"{classes} classes, as a stratified subsample needs; give at least {2 * classes}")
    return fidelity.max_resource if fidelity.max_resource is not None else smallest


def _collect_resources(paths: list[str], base_dir: Path, resources_dir: Path,
                       roots: Sequence[Path]) -> list[ResourceRef]:
    """Copy each listed file into ``resources_dir``, under the name it is listed with.

    Resources go to every provider, so a task file (perhaps found on the internet) must not
    be able to name the requestor's other files: an SSH key, ``/proc/self/environ``. Each must
    be a regular file inside the task file's folder or a root the user named, where links lead
    too, and not hidden (``.ssh``, ``.env``): no absolute path, ``..`` or link out of them.
    """
    allowed = [base_dir.resolve(), *(_root(r) for r in roots)]
    resources_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(resources_dir, 0o755)  # a container's own user reads it through its mount; the output dir is private
    refs: list[ResourceRef] = []
    for i, raw in enumerate(paths):
        field = f"resources[{i}]"
        name = PurePath(raw).name  # a link's own name, not its target's: the name the task uses
        source = _confined(raw, base_dir, allowed, field)
        if not _RESOURCE_NAME.match(name):
            raise TaskError(field, f"file name {name!r} has characters providers refuse; rename it")
        if any(r.name == name for r in refs):
            raise TaskError(field, f"two resources are named {name!r}; providers see names only, rename one")
        copy = resources_dir / name
        _copy_regular_file(source, copy, raw, field)
        refs.append(ResourceRef(name=name, sha256=file_sha256(copy), size=copy.stat().st_size))
    return refs


def _root(path: Path) -> Path:
    if not path.is_dir():
        raise TaskError("--resources-root", f"{str(path)!r} is not a directory; check the path")
    return path.resolve()


def _confined(raw: str, base_dir: Path, allowed: list[Path], field: str) -> Path:
    """Where resource ``raw`` really is, if that is inside an allowed root (links resolved)."""
    real = Path(os.path.realpath(base_dir / raw))
    for root in allowed:
        if real.is_relative_to(root):
            hidden = [part for part in real.relative_to(root).parts if part.startswith(".")]
            if hidden:
                raise TaskError(field, f"{raw!r} is hidden or in a hidden folder ({hidden[0]}), where secrets live; "
                                "a resource must be a plain data file - move it, or name its folder with "
                                "--resources-root DIR")
            return real
    raise TaskError(field, f"{raw!r} leads outside {allowed[0]} (an absolute path, '..' or a link out); a task file "
                    "may send providers only files in its own folder - copy the file there, or allow its folder "
                    "with --resources-root DIR")


def _copy_regular_file(source: Path, copy: Path, raw: str, field: str) -> None:
    """Copy ``source`` if it is a regular file, checked on the open file (no FIFO, device, folder)."""
    try:
        fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)  # O_NONBLOCK: a FIFO must not hang us
    except FileNotFoundError:
        raise TaskError(field, f"{raw!r} is not a file (paths are relative to the task file); check it") from None
    except OSError as exc:
        raise TaskError(field, f"{raw!r} cannot be read ({exc.strerror}); check it") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise TaskError(field, f"{raw!r} is not a regular file (a folder, FIFO or device); list data files only")
    with os.fdopen(fd, "rb") as src, open(copy, "xb") as dst:
        shutil.copyfileobj(src, dst)
    os.chmod(copy, 0o644)  # readable by a container's own user, as the folder


def _not_listed(value: str, names: set[str]) -> str:
    name = PurePath(value).name
    if name != value:
        also = "" if name in names else f", and list {value!r} in `resources`"
        return f"takes the file's name as listed in `resources` (e.g. {name!r}), not a path{also}"
    listed = ", ".join(sorted(names)) or "none"
    return f"{value!r} is not among the resources (listed: {listed}); add its path to `resources`"


def _check_param_names(estimator: object, names: list[str], field: str | None = None) -> None:
    valid = estimator.get_params(deep=True)  # type: ignore[attr-defined]
    for name in names:
        if name not in valid:
            close = difflib.get_close_matches(name, list(valid), n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"valid names include {', '.join(sorted(valid)[:8])}"
            raise TaskError(field or f"options.search_space.{name}", f"not a parameter of the estimator; {hint}")


def _check_param_values(space: SearchSpace) -> None:
    """The rule providers apply again before they configure an estimator (no paths, no caches)."""
    for name, values in space.candidate_values().items():
        for value in values:
            check_param(name, value, f"options.search_space.{name}")


def _check_scoring(name: str, field: str = "options.scoring") -> str:
    from sklearn.metrics import get_scorer_names

    names = get_scorer_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"did you mean {close[0]!r}?" if close else "see sklearn.metrics.get_scorer_names()"
        raise TaskError(field, f"unknown scorer {name!r}; {hint}")
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
            clone(estimator).set_params(**estimator_params(fixed)).fit(data.rows(sample), data.y[sample])
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
