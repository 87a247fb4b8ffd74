"""``run_task``: create a task, run it on a backend, write results. The CLI is a thin shell on it."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from mltask.backends import make_backend
from mltask.console import SearchProgress, failure_lines, leaderboard, phase
from mltask.definition import TaskDefinition, load_definition, parse_definition
from mltask.errors import AllTrialsFailed, Interrupted, TaskError
from mltask.outdir import RESOURCES_DIR, SCRATCH_DIR, STATE_FILE, claim, output_path, seal
from mltask.problem import estimator_paths
from mltask.protocol import Problem
from mltask.report import REPORT_FILE, verification_lines, write_report
from mltask.results import (
    MODEL_FILE,
    RESULTS_CSV,
    RESULTS_JSON,
    Summary,
    format_value,
    refit_best,
    summarize,
    write_results,
)
from mltask.scheduler import drive
from mltask.store import StateLock, Store, require_state, state_errors
from mltask.task import HyperparameterSearchTask


@dataclass(frozen=True)
class RunResult:
    output_dir: Path
    summary: Summary
    model_path: Path | None

    @property
    def best(self) -> dict[str, Any] | None:
        return self.summary.best

    def trials_dataframe(self) -> Any:
        """The trials as Optuna's ``Study.trials_dataframe()`` gives them (a pandas DataFrame)."""
        from mltask.optuna_export import trials_dataframe

        return trials_dataframe(self.output_dir)


def run_task(
    task: str | Path | dict[str, Any] | TaskDefinition,
    *,
    backend: str = "local",
    workers: int | None = None,
    image: str | None = None,
    output: str | Path | None = None,
    force: bool = False,
    resources_root: str | Path | Iterable[str | Path] | None = None,
    quiet: bool = False,
    console: Console | None = None,
) -> RunResult:
    """Run a search end to end; ``task`` is a task file, its parsed JSON or a definition.

    Resources must lie in the task file's folder (the current dir for a dict or a
    definition) or in a ``resources_root`` dir, which the caller names, never the task.
    ``force`` replaces a previous task in the output dir, once the new one proves valid.
    """
    console = console or Console(stderr=True, quiet=quiet)
    definition, base_dir = _definition(task)
    output_dir = output_path(output, definition.options.output_path, definition.name)
    make_backend(backend, workers, definition, image=image).check()  # before any write
    roots = [resources_root] if isinstance(resources_root, (str, Path)) else list(resources_root or ())
    with claim(output_dir):
        with phase(console, f"resolving {definition.name}: loading the dataset, checking the estimator and resources"):
            search = HyperparameterSearchTask.create(definition, base_dir, output_dir, force=force,
                                                     resources_roots=[Path(r) for r in roots])
        return _sealed(search, backend, workers, image, quiet, console)


def resume_task(
    output_dir: str | Path,
    *,
    task: str | Path | dict[str, Any] | TaskDefinition | None = None,
    backend: str = "local",
    workers: int | None = None,
    image: str | None = None,
    quiet: bool = False,
    console: Console | None = None,
) -> RunResult:
    """Carry on a stopped, crashed or aborted task from its state file.

    ``task`` optionally gives an updated definition; only the changes
    :func:`mltask.task.compatible_update` allows are accepted.
    """
    console = console or Console(stderr=True, quiet=quiet)
    update = _definition(task)[0] if task is not None else None
    output_dir = Path(output_dir)
    require_state(output_dir / STATE_FILE)  # before the lock file: never write into a dir that holds no task
    with StateLock.acquire(output_dir):
        search = HyperparameterSearchTask.load(output_dir, update=update)
        progress = search.progress()
        done = progress.done + progress.failed
        _say(console, f"resuming {search.definition.name}: {done} of {search.n_trials} trials done")
        return _sealed(search, backend, workers, image, quiet, console)


def abort_task(output_dir: str | Path) -> str | None:
    """Ask a running task to stop (it checks every second); return its status before the call.

    Only a running task (or one whose process died while running) is asked to stop and marked
    aborted; a finished, failed or already stopped one is left as it is.
    """
    store = Store.open(Path(output_dir) / STATE_FILE)
    try:
        status = store.meta_value("status")
        if status in (None, "running"):
            store.set_meta("abort_requested", "1")
            store.set_meta("status", "aborted")
        return status
    finally:
        store.close()


def _sealed(search: HyperparameterSearchTask, backend: str, workers: int | None, image: str | None, quiet: bool,
            console: Console) -> RunResult:
    """:func:`_execute`, then the result files made private, however it ends."""
    try:
        return _execute(search, backend, workers, image, quiet, console)
    finally:
        seal(search.output_dir)


def _execute(search: HyperparameterSearchTask, backend: str, workers: int | None, image: str | None, quiet: bool,
             console: Console) -> RunResult:
    """Drive ``search`` on a backend, then write results for whatever finished.

    Ctrl-C stops the workers and keeps the state (every store write is a transaction, so a
    second Ctrl-C while cleaning up cannot corrupt it: it ends as :class:`Interrupted`,
    which names the output dir to resume). A search whose every trial failed raises
    :class:`AllTrialsFailed` once its results are written.
    """
    output_dir = search.output_dir
    store = search.store
    store.set_meta("status", "running")
    started = time.monotonic()
    status = "finished"
    stopped: TaskError | None = None
    try:
        with make_backend(backend, workers, search.definition, image=image,
                          preload=preload_modules(search.problem)) as runner:
            plural = "s" if runner.workers != 1 else ""
            with phase(console, f"starting the {backend} backend ({runner.workers} provider{plural})"):
                runner.start(search.resources_dir, output_dir / SCRATCH_DIR)
            with SearchProgress(console, search.n_trials, search.definition.name, enabled=not quiet,
                                errors=store.errors) as bar:
                bar.update(search.progress(), force=True)
                try:
                    status = drive(search, runner, timeout=search.definition.timeout_seconds, on_update=bar.update)
                except KeyboardInterrupt:
                    status = "interrupted"
                except TaskError as exc:  # no provider can go on (market timeout, budget, bans): keep what finished
                    status, stopped = "stopped", exc
                bar.update(search.progress(), force=True)
                costs = runner.costs()
                if costs:
                    store.set_meta("costs", json.dumps(costs))
        shutil.rmtree(output_dir / SCRATCH_DIR, ignore_errors=True)
        store.set_meta("status", status)
        result = finish(store, output_dir, console, timing=_timing(store, time.monotonic() - started))
    except KeyboardInterrupt:
        raise Interrupted(output_dir) from None
    finally:
        store.close()
    if status != "finished":
        _say(console, f"{status}; to carry on: mltask tasks resume {output_dir}")
    if stopped is not None:
        raise stopped
    if result.summary.status == "failed":
        raise AllTrialsFailed(result.summary.counts()["failed"], result.summary.errors(), output_dir)
    return result


def _timing(store: Store, seconds: float) -> dict[str, float]:
    """This run's search time added to the earlier runs' (a resumed task's time is their sum)."""
    total = float(store.meta_value("search_seconds") or 0.0) + seconds
    runs = int(store.meta_value("runs") or 0) + 1
    store.set_meta("search_seconds", repr(total))
    store.set_meta("runs", str(runs))
    return {"search_seconds": round(total, 3), "runs": runs}


def finish(store: Store, output_dir: Path, console: Console, timing: dict[str, float]) -> RunResult:
    """Refit the best model, write every result file, print the leaderboard and what went wrong.

    A search that ran to its end without one trial completing has ``failed``, whatever its
    driver says: like scikit-learn's "All N fits failed", it must not pass for a result.
    """
    meta = store.meta()
    summary = summarize(store, meta.get("status", "running"))
    if summary.status == "finished" and not summary.complete:
        store.set_meta("status", "failed")
        summary = dataclasses.replace(summary, status="failed")
    problem = Problem.model_validate_json(meta["problem"])
    t0 = time.monotonic()
    model_path, refit_warnings = refit_best(output_dir, problem, summary, output_dir / RESOURCES_DIR)
    timing["refit_seconds"] = round(time.monotonic() - t0, 3)
    write_results(output_dir, summary, extra={"timing": timing}, extra_warnings=refit_warnings)
    write_report(output_dir, summary, [_model_note(problem, model_path), *refit_warnings], timing)
    if summary.complete:
        console.print(leaderboard(summary))
    if summary.status != "failed":  # else the error raised names them
        for line in failure_lines(summary):
            _say(console, line)
    for line in [*verification_lines(summary), *refit_warnings]:
        _say(console, line.removeprefix("- ").replace("**", ""))
    best = summary.best
    if best is not None:
        params = ", ".join(f"{k}={format_value(v)}" for k, v in best["params"].items())
        _say(console, f"best: trial {best['number']} {summary.scoring} = {best['mean_test_score']:.6g}; {params}")
    _say(console, f"status: {summary.status}; results in {output_dir}/ ({RESULTS_JSON}, {RESULTS_CSV}, {REPORT_FILE})")
    return RunResult(output_dir, summary, model_path)


def _model_note(problem: Problem, model_path: Path | None) -> str:
    if model_path is not None:
        return f"refit model: `{MODEL_FILE}` (the best configuration fitted on all the data)"
    if problem.estimator is None:
        return "no refit model (script tasks return scores only)"
    return "no refit model: no trial completed"


def _say(console: Console, line: str) -> None:
    """A plain line, never wrapped: paths and commands must survive copy and paste."""
    console.print(line, highlight=False, soft_wrap=True, markup=False)


def show(output_dir: Path) -> Summary:
    store = Store.open(Path(output_dir) / STATE_FILE)
    try:
        with state_errors(store.path):
            return summarize(store, store.meta().get("status", "running"))
    finally:
        store.close()


def _definition(task: str | Path | dict[str, Any] | TaskDefinition) -> tuple[TaskDefinition, Path]:
    if isinstance(task, TaskDefinition):
        return task, Path.cwd()
    if isinstance(task, dict):
        return parse_definition(task), Path.cwd()
    path = Path(task)
    return load_definition(path), path.resolve().parent


def preload_modules(problem: Problem) -> tuple[str, ...]:
    """Modules for the local workers to import once, before forking.

    Without the splitters, scorers and datasets a replaced worker spent 1.2 s importing
    scikit-learn before its first trial (0.19 s with them), which a worker killed every
    second never got past.
    """
    paths = estimator_paths(problem.estimator)
    modules = {p.rpartition(".")[0] for p in paths if any(p.startswith(a) for a in problem.allowed_modules)}
    modules |= {"sklearn.model_selection", "sklearn.metrics"}
    if problem.dataset.builtin:
        modules.add("sklearn.datasets")
    return tuple(sorted(modules))


__all__ = ["RunResult", "TaskError", "abort_task", "resume_task", "run_task", "show"]
