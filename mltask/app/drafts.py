"""A new task being filled in: its uploads, its validation as the CLI does it, its start.

A draft is a private temporary folder (outside the root) holding the files uploaded for one
new task, under safe names, each within the upload limit. It plays the part of the task
file's folder: the task JSON is written there and checked with the CLI's own code
(``load_definition``, then ``resolve`` into a throwaway resources dir), so the form shows
the CLI's messages, field path and fix, and nothing is written under the root until the
task is valid. A task may name as resources only files uploaded with it (the CLI's rule:
files in the task's own folder); one that would run code on this machine (a training
script, estimators from modules other than scikit-learn) is shown and must be confirmed
first, since checking it imports it. Submitting hands the folder to ``mltask tasks create``,
which copies the resources into the new task's dir; the draft goes once it has.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import secrets
import shutil
import tempfile
import zipfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mltask
from mltask.app import runs
from mltask.app.security import confined
from mltask.backends import BACKENDS
from mltask.definition import TaskDefinition, duration_seconds, load_definition
from mltask.errors import TaskError
from mltask.registry import TASK_TYPES
from mltask.resolution import resolve
from mltask.task import STATE_FILE

TASK_FILE = ".task.json"  # hidden: it can never be listed as a resource
TRUSTED_MODULES = ("sklearn.",)  # what the CLI allows by default; anything else is confirmed first
SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199}$")
_DRAFT_ID = re.compile(r"^[0-9a-f]{16}$")
_MAX_FILES = 16
_SHOW_SCRIPT_BYTES = 200_000
TEMPLATES_DIR = Path(mltask.__file__).resolve().parent.parent / "task_templates"


class UploadRefused(Exception):
    """An upload over the size limit, or one too many: nothing of it is kept."""


def safe_name(filename: str) -> str | None:
    """The upload's base name with anything providers refuse replaced; ``None`` if nothing is left."""
    base = re.split(r"[\\/]", filename)[-1]
    name = re.sub(r"[^A-Za-z0-9_.\-]", "_", base).lstrip(".")[:200]
    return name if SAFE_NAME.match(name) else None


class Drafts:
    """Upload folders of new tasks, under one private temporary dir that goes with the app."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.base = Path(tempfile.mkdtemp(prefix="mltask-app-"))  # 0700
        self._handed_over: set[str] = set()

    def new(self) -> str:
        draft_id = secrets.token_hex(8)
        (self.base / draft_id).mkdir(mode=0o700)
        return draft_id

    def folder(self, draft_id: str | None) -> Path | None:
        if not draft_id or not _DRAFT_ID.match(draft_id) or draft_id in self._handed_over:
            return None
        path = self.base / draft_id
        return path if path.is_dir() else None

    async def upload(self, draft_id: str, filename: str, chunks: AsyncIterator[bytes],
                     declared: int | None) -> dict[str, Any]:
        """Stream one file into the draft, refusing it as soon as it passes the limit."""
        folder = self.folder(draft_id)
        if folder is None:
            raise TaskError("upload", "this form's upload folder is gone (the app restarted?); reload the page")
        name = safe_name(filename)
        if name is None:
            raise TaskError("upload", f"{filename!r} is not a usable file name; rename the file (letters, digits, "
                            "'.', '_', '-')")
        if len([p for p in folder.iterdir() if p.name != TASK_FILE]) >= _MAX_FILES and not (folder / name).exists():
            raise UploadRefused(f"at most {_MAX_FILES} files per task; remove one first")
        limit = f"{self.max_bytes / 1e6:g} MB"
        if declared is not None and declared > self.max_bytes:
            raise UploadRefused(f"{name} is larger than the upload limit of {limit} (mltask app --max-upload-mb)")
        partial = folder / f".partial-{secrets.token_hex(4)}"
        size = 0
        try:
            with open(partial, "xb") as out:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise UploadRefused(f"{name} is larger than the upload limit of {limit} "
                                            "(mltask app --max-upload-mb)")
                    out.write(chunk)
            os.replace(partial, folder / name)
        finally:
            partial.unlink(missing_ok=True)
        return describe(folder / name)

    def remove(self, draft_id: str, name: str) -> None:
        folder = self.folder(draft_id)
        path = confined(folder, name) if folder is not None else None
        if path is not None and path.is_file():
            path.unlink()

    def files(self, draft_id: str | None) -> list[dict[str, Any]]:
        folder = self.folder(draft_id)
        if folder is None:
            return []
        return [describe(p) for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")]

    def add_template_files(self, draft_id: str, template: Path, task: dict[str, Any]) -> None:
        """Copy a template's resources (files in its own folder, by plain name) into the draft."""
        folder = self.folder(draft_id)
        assert folder is not None
        for raw in task.get("resources") or []:
            source = confined(template.parent, raw) if isinstance(raw, str) else None
            if source is not None and source.is_file() and safe_name(raw) == raw:
                shutil.copyfile(source, folder / raw)

    def hand_over(self, draft_id: str) -> None:
        """The draft now belongs to a starting task: the form can no longer change it."""
        self._handed_over.add(draft_id)

    def settle(self, draft_id: str, created: bool) -> None:
        """Once its task has copied the files, the draft goes; if the start failed, it is the form's again."""
        if created:
            self.discard(draft_id)
        self._handed_over.discard(draft_id)

    def discard(self, draft_id: str) -> None:
        shutil.rmtree(self.base / draft_id, ignore_errors=True)

    def close(self) -> None:
        """Remove every draft no starting task still needs."""
        for path in self.base.iterdir():
            if path.name not in self._handed_over:
                shutil.rmtree(path, ignore_errors=True)


def describe(path: Path) -> dict[str, Any]:
    """What the form shows of an upload: a CSV's columns (for the target), an NPZ's arrays."""
    info: dict[str, Any] = {"name": path.name, "size": path.stat().st_size, "kind": "file"}
    suffix = path.suffix.lower()
    if suffix == ".csv":
        info["kind"] = "csv"
        with open(path, "rb") as fh:
            head = fh.read(1 << 20).decode("utf-8-sig", errors="replace")
        rows = csv.reader(io.StringIO(head))
        info["columns"] = next(rows, [])
    elif suffix == ".npz":
        info["kind"] = "npz"
        try:
            with zipfile.ZipFile(path) as archive:  # the array names, without loading anything
                info["arrays"] = [n.removesuffix(".npy") for n in archive.namelist()]
        except (zipfile.BadZipFile, OSError):
            info["arrays"] = []
    elif suffix == ".py":
        info["kind"] = "script"
    return info


def templates() -> list[dict[str, Any]]:
    """What a new task can start from: each type's built-in template, and every file in task_templates/."""
    out = [{"id": f"builtin:{info.id}", "label": f"built-in template ({info.name})", "task": info.defaults()}
           for info in TASK_TYPES.values()]
    for path in sorted(TEMPLATES_DIR.glob("*.json")) if TEMPLATES_DIR.is_dir() else []:
        try:
            task = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        out.append({"id": path.name, "label": f"task_templates/{path.name}", "task": task})
    return out


def template_path(template_id: str) -> Path | None:
    path = confined(TEMPLATES_DIR, template_id) if TEMPLATES_DIR.is_dir() else None
    return path if path is not None and path.suffix == ".json" and path.is_file() else None


@dataclass
class Check:
    """The outcome of checking a task the way ``mltask tasks create`` would."""

    errors: list[dict[str, str]] = field(default_factory=list)  # the first problem, as the CLI reports it
    confirm: list[dict[str, Any]] = field(default_factory=list)  # code to read and accept before it is imported
    summary: dict[str, Any] = field(default_factory=dict)
    definition: TaskDefinition | None = None

    def as_json(self) -> dict[str, Any]:
        return {"ok": not self.errors and not self.confirm, "errors": self.errors, "confirm": self.confirm,
                "summary": self.summary}


def _error(exc: TaskError, task_file: Path | None = None) -> list[dict[str, str]]:
    where = "task" if task_file is not None and exc.field == str(task_file) else exc.field
    return [{"field": where, "message": exc.message}]


def check(text: str, folder: Path | None, confirmed: bool, backend: str, workers: int | None) -> Check:
    """Check a task JSON against the uploads in ``folder``; import nothing unconfirmed."""
    result = Check()
    if backend not in BACKENDS:
        result.errors = [{"field": "backend", "message": f"unknown backend {backend!r}; choose one of "
                          f"{', '.join(BACKENDS)}"}]
        return result
    if workers is not None and workers < 1:
        result.errors = [{"field": "workers", "message": "expected a positive whole number"}]
        return result
    with tempfile.TemporaryDirectory(prefix="mltask-app-check-") as tmp:
        folder = folder or Path(tmp)
        task_file = folder / TASK_FILE
        task_file.write_text(text, encoding="utf-8")
        try:
            definition = load_definition(task_file)
        except TaskError as exc:
            result.errors = _error(exc, task_file)
            return result
        result.definition = definition
        result.summary = _summary(definition, backend, workers)
        try:
            _check_uploaded(definition, folder)
        except TaskError as exc:
            result.errors = _error(exc)
            return result
        result.confirm = [] if confirmed else confirmations(definition, folder)
        if result.confirm:
            return result
        try:
            resolved = resolve(definition, folder, Path(tmp) / "resources")
        except TaskError as exc:
            result.errors = _error(exc)
            return result
        result.summary.update(n_trials=resolved.n_trials, subtasks_count=resolved.subtasks_count,
                              direction=resolved.direction, scoring=resolved.problem.scoring)
    return result


def _check_uploaded(definition: TaskDefinition, folder: Path) -> None:
    """The CLI's resource rule, for a task whose folder is its uploads: each resource is one of them."""
    for i, raw in enumerate(definition.resources):
        path = confined(folder, raw)
        if path is None or "/" in raw or not path.is_file():
            raise TaskError(f"resources[{i}]", f"{raw!r} is not a file uploaded with this task; upload it here "
                            "(a task may send providers only the files in its own folder)")


def confirmations(definition: TaskDefinition, folder: Path) -> list[dict[str, Any]]:
    """What in this task would run code on this machine, for the user to read before it does."""
    out: list[dict[str, Any]] = []
    script = definition.options.script
    if script is not None:
        path = folder / script.file
        text = path.read_bytes()[:_SHOW_SCRIPT_BYTES].decode("utf-8", errors="replace") if path.is_file() else ""
        out.append({"kind": "script", "file": script.file, "text": text,
                    "truncated": path.is_file() and path.stat().st_size > _SHOW_SCRIPT_BYTES})
    modules = [m for m in definition.options.allowed_modules if not m.startswith(TRUSTED_MODULES)]
    if modules:
        out.append({"kind": "modules", "modules": modules})
    return out


def _summary(definition: TaskDefinition, backend: str, workers: int | None) -> dict[str, Any]:
    """The worst-case cost on Golem: every provider paid the bid for the whole timeout, capped by the budget."""
    summary: dict[str, Any] = {"name": definition.name}
    if backend == "golem":
        n = workers or os.cpu_count() or 1
        hours = duration_seconds(definition.timeout) / 3600
        worst = definition.bid * n * hours
        budget = definition.options.golem.budget
        summary["cost"] = {"bid": definition.bid, "workers": n, "hours": hours, "worst": worst, "budget": budget,
                           "capped": min(worst, budget)}
    return summary


def output_key(root: Path, definition: TaskDefinition) -> str:
    """Where the new task goes under the root: its ``output_path`` if given (inside the root), else its name."""
    given = definition.options.output_path
    if given:
        if confined(root, given) is None:
            raise TaskError("options.output_path", f"{given!r} is not a path inside {root}; the app keeps every "
                            "task under its root - give a relative path, or leave it empty")
        if (root / given).exists():
            raise TaskError("options.output_path", f"{root / given} already exists; choose another path")
        return given
    base = re.sub(r"[^A-Za-z0-9_.\-]", "-", definition.name).strip(".-") or "task"
    key, n = base, 1
    while (root / key).exists():
        n += 1
        key = f"{base}-{n}"
    return key


def submit(root: Path, drafts: Drafts, draft_id: str | None, text: str, backend: str, workers: int | None,
           confirmed: bool) -> tuple[Check, str | None]:
    """Check the task once more and, if it is valid, start it; returns the check and the new task's key."""
    if drafts.folder(draft_id) is None:
        draft_id = drafts.new()
    folder = drafts.folder(draft_id)
    assert draft_id is not None and folder is not None
    result = check(text, folder, confirmed, backend, workers)
    if result.errors or result.confirm:
        return result, None
    assert result.definition is not None
    try:
        key = output_key(root, result.definition)
    except TaskError as exc:
        result.errors = _error(exc)
        return result, None
    task_file = folder / TASK_FILE
    task_file.write_text(text, encoding="utf-8")
    drafts.hand_over(draft_id)
    state = root / key / STATE_FILE
    try:
        runs.start(root, key, "create", [str(task_file), "--output", str(root / key)], backend, workers,
                   ready=state.exists, cleanup=lambda: drafts.settle(draft_id, created=state.exists()))
    except TaskError as exc:
        drafts.settle(draft_id, created=False)
        result.errors = _error(exc)
        return result, None
    return result, key
