"""``mltask``: golemcli-style commands for the ML hyperparameter search task type.

    mltask types
    mltask tasks create TASK.json [--backend local|docker|golem] [--workers N] [--output DIR] [--force]
                       [--resources-root DIR]...
    mltask tasks resume DIR [--task TASK.json]
    mltask tasks abort DIR
    mltask tasks show DIR
    mltask tasks export DIR --optuna FILE
    mltask tasks template
    mltask tasks schema
    mltask image build [--base IMAGE] [--tag TAG] [--allow-modules PREFIX ...] [--with PACKAGE ...]
    mltask image gvmi [--tag TAG] [--output FILE] [--push-to USER/REPO:TAG]
    mltask app [--root DIR] [--host 127.0.0.1] [--port N] [--no-browser] [--max-upload-mb N]

Every user mistake ends as one line on stderr naming the field and the fix, exit code 2; so
does a search whose every trial failed (after writing its results, with the most common
errors and their counts). A search stopped early (timeout, Ctrl-C, abort) exits 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console

from mltask import __version__
from mltask.backends import BACKENDS
from mltask.errors import EXIT_USAGE, TaskError
from mltask.registry import TASK_TYPES


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mltask", description="ML hyperparameter search as a Golem task type.")
    parser.add_argument("--version", action="version", version=f"mltask {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("types", help="list the task types mltask provides")
    tasks = sub.add_parser("tasks", help="create and inspect tasks").add_subparsers(dest="action", required=True)
    create = tasks.add_parser("create", help="run a search described by a task JSON file")
    create.add_argument("task", type=Path, help="task JSON file")
    # str, not Path: Path("") is ".", and an empty --output must be refused, not mean the current dir
    create.add_argument("--output", default=None, help="results dir (default: options.output_path)")
    create.add_argument("--force", action="store_true", help="replace a previous task in the output dir")
    create.add_argument("--resources-root", type=Path, action="append", default=[], metavar="DIR",
                        help="also allow resources from DIR (default: only the task file's folder); repeatable")
    _run_options(create)
    resume = tasks.add_parser("resume", help="carry on a stopped, crashed or aborted task")
    resume.add_argument("dir", type=Path, help="the task's output dir")
    resume.add_argument("--task", type=Path, default=None, help="updated task JSON (timeouts, bid, more trials)")
    _run_options(resume)
    abort = tasks.add_parser("abort", help="stop a running task; it can be resumed later")
    abort.add_argument("dir", type=Path)
    export = tasks.add_parser("export", help="write a task's trials for other tools (an Optuna study)")
    export.add_argument("dir", type=Path)
    export.add_argument("--optuna", type=Path, required=True, metavar="FILE",
                        help="Optuna study file: a journal, or SQLite for .db/.sqlite/.sqlite3 (optuna-dashboard FILE)")
    show = tasks.add_parser("show", help="print the leaderboard of a task's output dir")
    show.add_argument("dir", type=Path)
    tasks.add_parser("template", help="print a minimal valid task JSON")
    tasks.add_parser("schema", help="print the JSON Schema of a task")
    image = sub.add_parser("image", help="the provider image").add_subparsers(dest="action", required=True)
    build = image.add_parser("build", help="build the provider Docker image from docker/Dockerfile")
    build.add_argument("--base", default=None, help="base image (default: python:X.Y-slim-bookworm of this Python)")
    build.add_argument("--tag", default=None, help="image tag (default: mltask-provider:VERSION)")
    build.add_argument("--allow-modules", action="append", default=[], metavar="PREFIX",
                       help="also let its providers import estimators from PREFIX (e.g. xgboost.); sklearn. always")
    build.add_argument("--with", dest="extras", action="append", default=[], metavar="PACKAGE",
                       help="also install PACKAGE (e.g. lightgbm, xgboost-cpu) at the version installed here, and "
                       "allow its modules; repeatable")
    gvmi = image.add_parser("gvmi", help="convert the provider image to a GVMI for Golem providers (gvmkit-build)")
    gvmi.add_argument("--tag", default=None, help="Docker image to convert (default: mltask-provider:VERSION)")
    gvmi.add_argument("--output", type=Path, default=Path("mltask-provider.gvmi"), help="GVMI file to write")
    gvmi.add_argument("--push-to", default=None, help="push to the Golem registry as USER/REPO:TAG (anonymous)")
    app = sub.add_parser("app", help="the web app: start, watch and inspect tasks in a browser")
    app.add_argument("--root", type=Path, default="mltask-results", help="where tasks live (default: %(default)s)")
    app.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    app.add_argument("--port", type=int, default=None, help="port (default: the first free one from 8686)")
    app.add_argument("--no-browser", action="store_true", help="only print the URL")
    app.add_argument("--max-upload-mb", type=float, default=100.0, help="largest file the form accepts (default: 100)")
    return parser


def _run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", default="local", choices=BACKENDS, help="where subtasks run (default: local)")
    parser.add_argument("--workers", type=_positive, default=None, help="providers at once (default: CPU count)")
    parser.add_argument("--image", default=None, help="docker: provider image (default: options.provider.image)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or leaderboard")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    out = Console()
    try:
        if args.command == "app":
            from mltask.app.server import serve

            serve(args.root, args.host, args.port, not args.no_browser, args.max_upload_mb)
        elif args.command == "types":
            for info in TASK_TYPES.values():
                out.print(f"[bold]{info.id}[/]  {info.name}: {info.description}", highlight=False)
        elif args.command == "image" and args.action == "build":
            from mltask.image import DEFAULT_TAG, build_image

            built = build_image(args.base, args.tag or DEFAULT_TAG, log=lambda line: out.print(line, highlight=False),
                                allow_modules=tuple(args.allow_modules), extras=tuple(args.extras))
            print(f"{built.tag} {built.id} {built.size / 1e6:.0f} MB")
        elif args.command == "image":
            from mltask.image import DEFAULT_TAG, build_gvmi

            gvmi = build_gvmi(args.tag or DEFAULT_TAG, args.output, args.push_to,
                              log=lambda line: out.print(line, highlight=False))
            print(f"{gvmi.path} {gvmi.size / 1e6:.0f} MB\nimage hash (options.golem.image_hash): {gvmi.hash}")
            where = ("pushed to the Golem registry: providers find it by hash" if args.push_to else
                     "serve this file over HTTP(S) where providers can reach it and set options.golem.image_url "
                     "(or push it with --push-to USER/REPO:TAG)")
            out.print(where, highlight=False)
        elif args.action == "template":
            print(json.dumps(TASK_TYPES["ml_hyperparameter_search"].defaults(), indent=2))
        elif args.action == "schema":
            print(json.dumps(TASK_TYPES["ml_hyperparameter_search"].schema(), indent=2))
        elif args.action == "export":
            from mltask.optuna_export import describe_export, export_study

            study = export_study(args.dir, args.optuna)
            out.print(describe_export(study, args.optuna), highlight=False, soft_wrap=True, markup=False)
        elif args.action == "show":
            from mltask.console import failure_lines, leaderboard
            from mltask.runner import show

            summary = show(args.dir)
            counts = summary.counts()
            running = f", {counts['running']} running" if counts["running"] else ""
            out.print(
                f"{summary.name} ({summary.task_id}): {summary.status}; {counts['complete']} complete, "
                f"{counts['failed']} failed{running} of {counts['planned']}", highlight=False
            )
            out.print(leaderboard(summary))
            for line in failure_lines(summary):
                out.print(line, highlight=False, markup=False)
        elif args.action == "abort":
            from mltask.runner import abort_task

            status = abort_task(args.dir)
            if status in (None, "running"):
                said = (f"abort requested (a running task stops within a second); resume with: "
                        f"mltask tasks resume {args.dir}")
            elif status in ("finished", "failed"):
                said = f"the task in {args.dir} already ended ({status}); nothing to abort"
            else:
                said = (f"the task in {args.dir} is not running ({status}); nothing to abort - carry on with: "
                        f"mltask tasks resume {args.dir}")
            out.print(said, highlight=False, soft_wrap=True)
        else:
            from mltask.runner import resume_task, run_task

            if args.action == "resume":
                result = resume_task(
                    args.dir, task=args.task, backend=args.backend, workers=args.workers, image=args.image,
                    quiet=args.quiet
                )
            else:
                result = run_task(
                    args.task, backend=args.backend, workers=args.workers, image=args.image, output=args.output,
                    force=args.force, resources_root=args.resources_root,
                    quiet=args.quiet,
                )
            return 0 if result.summary.status == "finished" else 1
    except TaskError as exc:
        print(f"mltask: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as exc:  # a second Ctrl-C while cleaning up: state is safe (transactions)
        where = getattr(exc, "output_dir", None) or getattr(args, "dir", None)
        tail = f"; the task state is intact - `mltask tasks resume {where}` carries on" if where else ""
        print(f"mltask: stopped at once{tail}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
