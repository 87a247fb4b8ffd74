"""The provider entry point: one subtask in, one result JSON out, in Golem's layout.

Every backend runs this: the local backend calls :func:`run_subtask` inside its worker
processes, the Docker image and Golem providers run ``python -m mltask.provider``, and the
verifier calls it on the requestor to re-run a subtask. Loading the dataset, hashing
resources and building the splits happen once per process and problem, not once per trial.

Run as ``mltask-provider`` (in the image, on a provider), it enforces the image's own
:mod:`~mltask.policy` over what a subtask asks: estimators only from the image's module
prefixes, files only among the subtask's resources. In-process (local backend, verifier)
the requestor runs its own task, and the task's ``allowed_modules`` is its own choice.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import platform
import sys
import time
from pathlib import Path
from typing import Any

from mltask import __version__
from mltask.data import load_dataset
from mltask.errors import TaskError
from mltask.policy import ProviderPolicy, check_named_files, load_policy
from mltask.problem import TrialEvaluator, estimator_paths, make_splits
from mltask.protocol import (
    ERROR_BYTES,
    ERROR_FILE,
    RESULT_FILE,
    SUBTASK_FILE,
    Environment,
    Problem,
    ResourceRef,
    SubtaskDefinition,
    SubtaskResult,
    dumps,
    installed_version,
    write_json_atomic,
)

GOLEM_RESOURCES = Path("/golem/resources")
GOLEM_WORK = Path("/golem/work")
GOLEM_OUTPUT = Path("/golem/output")


@functools.lru_cache(maxsize=1)
def environment() -> Environment:
    """The versions this process scores with; recorded in every result."""
    import numpy
    import scipy
    import sklearn

    return Environment(mltask=__version__, python=platform.python_version(), numpy=numpy.__version__,
                       scipy=scipy.__version__, sklearn=sklearn.__version__)


def environment_for(evaluator: TrialEvaluator) -> Environment:
    """:func:`environment` plus the versions of what this problem imports beyond scikit-learn: the
    estimators' packages (lightgbm...) and pandas for a table, which scores depend on as much."""
    packages = {path.split(".", 1)[0] for path in estimator_paths(evaluator.problem.estimator)} - {"sklearn"}
    if hasattr(evaluator.data.X, "iloc"):
        packages.add("pandas")
    versions = {_distribution(name): installed_version(_distribution(name)) for name in sorted(packages)}
    return environment().model_copy(update={"packages": {k: v for k, v in versions.items() if v}})


def _distribution(module: str) -> str:
    """The distribution that installs top-level ``module`` (its own name for nearly all)."""
    return (_distributions().get(module) or [module])[0]


@functools.lru_cache(maxsize=1)
def _distributions() -> dict[str, list[str]]:
    from importlib import metadata

    return metadata.packages_distributions()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@functools.lru_cache(maxsize=64)
def _cached_sha256(path: Path, size: int, mtime_ns: int) -> str:
    return file_sha256(path)


def check_resources(refs: list[ResourceRef], resources_dir: Path) -> None:
    """Refuse to train on resources other than those the requestor hashed."""
    for ref in refs:
        path = resources_dir / ref.name
        if path.is_symlink() or not path.is_file():
            raise TaskError("resources", f"{ref.name} is missing from {resources_dir}")
        info = path.stat()
        if _cached_sha256(path, info.st_size, info.st_mtime_ns) != ref.sha256:
            raise TaskError("resources", f"{ref.name} does not match its sha256; the resources changed")


def evaluator_for(problem: Problem, resources_dir: Path) -> TrialEvaluator:
    """The evaluator of ``problem``, built once per process (dataset, splits, estimator)."""
    return _evaluator(dumps(problem), resources_dir)


@functools.lru_cache(maxsize=2)
def _evaluator(problem_json: str, resources_dir: Path) -> TrialEvaluator:
    problem = Problem.model_validate_json(problem_json)
    data = load_dataset(problem.dataset, resources_dir)
    return TrialEvaluator(problem, data, make_splits(problem.cv, data), resources_dir)


@functools.lru_cache(maxsize=1)
def _threadpools(_modules: int) -> Any:
    # Finding the BLAS/OpenMP libraries costs ~3 ms: done again only when modules were imported
    # since (a new estimator's package may bring its own OpenMP, as LightGBM does), not per subtask.
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def one_thread() -> Any:
    """Context: one BLAS/OpenMP thread, so scores do not depend on the thread count.

    Regression: a controller made once per process missed the OpenMP of a package imported
    after it, whose pool then ran two threads (the refit test, after the LightGBM tests).
    """
    return _threadpools(len(sys.modules)).limit(limits=1)


def evaluate_subtask(subtask: SubtaskDefinition, resources_dir: Path,
                     policy: ProviderPolicy | None = None) -> SubtaskResult:
    """Train and score every trial of ``subtask`` with one BLAS/OpenMP thread.

    ``policy`` is the provider's own (``None`` on the requestor, running its own task).
    """
    started = time.perf_counter()
    if policy is not None:
        policy.check(subtask.problem)
    check_named_files(subtask.problem)
    check_resources(subtask.problem.resources, resources_dir)
    evaluator = evaluator_for(subtask.problem, resources_dir)
    with one_thread():
        trials = [evaluator.evaluate(trial, trial.folds) for trial in subtask.trials]
    return SubtaskResult(
        task_id=subtask.task_id,
        subtask_id=subtask.subtask_id,
        environment=environment_for(evaluator),
        trials=trials,
        compute_time=time.perf_counter() - started,
    )


def run_subtask(work_dir: Path, resources_dir: Path, output_dir: Path, policy: ProviderPolicy | None = None) -> None:
    """Read ``work_dir/subtask.json``, write ``output_dir/result.json``."""
    subtask = SubtaskDefinition.model_validate_json((work_dir / SUBTASK_FILE).read_bytes())
    result = evaluate_subtask(subtask, resources_dir, policy)
    write_json_atomic(output_dir / RESULT_FILE, dumps(result))


def serve(work_dir: Path, resources_dir: Path, output_dir: Path, policy: ProviderPolicy | None = None,
          notify: Path | None = None, poll: float = 0.02) -> None:
    """Run each subtask that appears as ``work_dir/subtask.json``, in this one process.

    For backends that keep a provider between subtasks (docker): a fresh process per
    subtask pays scikit-learn's import and the dataset load every time, 1.3 s measured in
    the image, which is 13% of a 10 s subtask; here they are paid once per provider. The
    requestor writes each subtask atomically (a new file); the answer is ``result.json``,
    or ``error.txt`` if the provider itself failed, also written atomically, and nothing
    else: the previous answer is removed first. Then a line goes to ``notify`` (the docker
    backend's pipe), which tells the requestor to read the output now, without polling it.
    """
    last: bytes | None = None
    while True:
        try:
            data = (work_dir / SUBTASK_FILE).read_bytes()
        except FileNotFoundError:
            data = None
        if data is None or data == last:
            time.sleep(poll)
            continue
        last = data
        for name in (RESULT_FILE, ERROR_FILE):
            (output_dir / name).unlink(missing_ok=True)
        try:
            run_subtask(work_dir, resources_dir, output_dir, policy)
        except Exception as exc:  # reported as this subtask's failure; the next one may be fine
            try:
                write_json_atomic(output_dir / ERROR_FILE, f"{type(exc).__name__}: {exc}"[:ERROR_BYTES])
            except OSError:  # the output is full (a script filled it): the requestor judges what it holds
                pass
        if notify is not None:
            with open(notify, "wb", buffering=0) as pipe:
                pipe.write(b"\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mltask-provider", description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=GOLEM_WORK, help="dir holding subtask.json")
    parser.add_argument("--resources", type=Path, default=GOLEM_RESOURCES, help="dir holding the resources")
    parser.add_argument("--output", type=Path, default=GOLEM_OUTPUT, help="dir to write result.json to")
    parser.add_argument("--serve", action="store_true", help="stay up and run every new subtask.json (docker)")
    parser.add_argument("--notify", type=Path, default=None, help="with --serve: write a line here after each answer")
    args = parser.parse_args(argv)
    try:
        policy = load_policy()
        if args.serve:
            serve(args.work, args.resources, args.output, policy, args.notify)
        run_subtask(args.work, args.resources, args.output, policy)
    except TaskError as exc:
        print(f"mltask-provider: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:  # includes pydantic's ValidationError
        print(f"mltask-provider: bad subtask: {exc}".splitlines()[0], file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
