"""``run_task``: create a task, run it on a backend, write results. The CLI is a thin shell on it."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from mltask.backends import make_backend
from mltask.console import SearchProgress, leaderboard
from mltask.definition import PipelineSpec, TaskDefinition, load_definition, parse_definition
from mltask.errors import TaskError
from mltask.outdir import RESOURCES_DIR, SCRATCH_DIR, STATE_FILE, claim, output_path, seal
from mltask.protocol import Problem
from mltask.report import REPORT_FILE, verification_lines, write_report
from mltask.results import (
    MODEL_FILE,
    RESULTS_CSV,
    RESULTS_JSON,
    Summary,
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


def abort_task(output_dir: str | Path) -> None:
    """Ask a running task to stop (it checks every second); a stopped task is marked aborted."""
    store = Store.open(Path(output_dir) / STATE_FILE)
    try:
        store.set_meta("abort_requested", "1")
        if store.meta_value("status") in (None, "running"):
            store.set_meta("status", "aborted")
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
    second Ctrl-C while cleaning up cannot corrupt it); the task can be resumed.
    """
    output_dir = search.output_dir
    search.store.set_meta("status", "running")
    started = time.monotonic()
    status = "finished"
    stopped: TaskError | None = None
    with make_backend(backend, workers, search.definition, image=image,
                      preload=preload_modules(search.problem)) as runner:
        runner.start(search.resources_dir, output_dir / SCRATCH_DIR)
        with SearchProgress(console, search.n_trials, search.definition.name, enabled=not quiet) as bar:
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
                search.store.set_meta("costs", json.dumps(costs))
    search_seconds = time.monotonic() - started
    shutil.rmtree(output_dir / SCRATCH_DIR, ignore_errors=True)
    search.store.set_meta("status", status)
    result = finish(search.store, output_dir, console, timing={"search_seconds": round(search_seconds, 3)})
    search.store.close()
    if status != "finished":
        _say(console, f"{status}; to carry on: mltask tasks resume {output_dir}")
    if stopped is not None:
        raise stopped
    return result


def finish(store: Store, output_dir: Path, console: Console, timing: dict[str, float]) -> RunResult:
    """Refit the best model, write every result file, print the leaderboard."""
    meta = store.meta()
    summary = summarize(store, meta.get("status", "running"))
    problem = Problem.model_validate_json(meta["problem"])
    t0 = time.monotonic()
    model_path = refit_best(output_dir, problem, summary, output_dir / RESOURCES_DIR)
    timing["refit_seconds"] = round(time.monotonic() - t0, 3)
    write_results(output_dir, summary, extra={"timing": timing})
    notes = [f"refit model: `{MODEL_FILE}`" if model_path else "no refit model (script tasks return scores only)"]
    write_report(output_dir, summary, notes)
    if summary.complete:
        console.print(leaderboard(summary))
    for line in verification_lines(summary.verification):
        _say(console, line.removeprefix("- ").replace("**", ""))
    best = summary.best
    if best is not None:
        score = f"{summary.scoring} = {best['mean_test_score']:.6g}"
        _say(console, f"best: trial {best['number']} {score} {best['params']}")
    _say(console, f"status: {summary.status}; results in {output_dir}/ ({RESULTS_JSON}, {RESULTS_CSV}, {REPORT_FILE})")
    return RunResult(output_dir, summary, model_path)


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
    spec = problem.estimator
    paths = [p for _, p in spec.pipeline] if isinstance(spec, PipelineSpec) else [spec] if spec else []
    modules = {p.rpartition(".")[0] for p in paths if any(p.startswith(a) for a in problem.allowed_modules)}
    modules |= {"sklearn.model_selection", "sklearn.metrics"}
    if problem.dataset.builtin:
        modules.add("sklearn.datasets")
    return tuple(sorted(modules))


__all__ = ["RunResult", "TaskError", "abort_task", "resume_task", "run_task", "show"]
