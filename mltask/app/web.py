"""The app's routes: three pages (tasks, new task, task), their JSON, a live stream, downloads.

Pages are rendered on the server with Jinja2 and brought to life by a little vanilla
JavaScript (``static/``); charts are drawn by plotly.js, served from the ``plotly`` wheel,
so nothing is fetched from the internet. Every handler reads through :mod:`tasks`,
:mod:`drafts` and :mod:`runs`; a request for something outside the root is a 404.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from mltask import __version__
from mltask.app import drafts as drafting
from mltask.app import runs
from mltask.app.security import Guard, csrf_token
from mltask.app.tasks import LiveTask, StateReader, TaskList, download, importance, task_dir
from mltask.backends import BACKENDS
from mltask.errors import TaskError
from mltask.registry import TASK_TYPES
from mltask.runner import abort_task
from mltask.store import state_errors

HERE = Path(__file__).resolve().parent
LIVE_POLL_SECONDS = 0.25  # how often a live page's stream looks at the state file
_PING_SECONDS = 15.0
_LOG_TAIL_BYTES = 20_000


@dataclass
class Settings:
    root: Path
    token: str
    port: int
    host: str = "127.0.0.1"
    max_upload_bytes: int = 100_000_000


def create_app(settings: Settings) -> Guard:
    """The ASGI app, wrapped in its guard (token, Host, CSRF): nothing reaches a route without them."""
    root = settings.root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    drafts = drafting.Drafts(settings.max_upload_bytes)
    listing = TaskList(root)
    pages = Jinja2Templates(directory=str(HERE / "templates"))
    pages.env.policies["json.dumps_kwargs"] = {"sort_keys": False}  # the schema's field order is the form's
    csrf = csrf_token(settings.token)

    def page(request: Request, name: str, title: str, data: dict[str, Any], status: int = 200) -> Response:
        return pages.TemplateResponse(request, name, {"title": title, "csrf": csrf, "data": data,
                                                      "root": str(root), "version": __version__},
                                      status_code=status)

    def the_task(request: Request) -> tuple[str, Path]:
        key = request.path_params["key"]
        directory = task_dir(root, key)
        if directory is None:
            raise HTTPException(404, "no such task under the root")
        return key, directory

    async def home(request: Request) -> Response:
        return RedirectResponse("/tasks", status_code=303)

    async def tasks_page(request: Request) -> Response:
        return page(request, "tasks.html", "Tasks", {"tasks": await run_in_threadpool(listing.rows)})

    async def tasks_json(request: Request) -> Response:
        return JSONResponse(await run_in_threadpool(listing.rows), headers={"cache-control": "no-store"})

    async def new_page(request: Request) -> Response:
        types = [{"id": t.id, "name": t.name, "description": t.description} for t in TASK_TYPES.values()]
        return page(request, "new.html", "New task", {"types": types})

    async def form_page(request: Request) -> Response:
        info = TASK_TYPES.get(request.path_params["type_id"])
        if info is None:
            raise HTTPException(404, "no such task type")
        data = {"type": {"id": info.id, "name": info.name, "description": info.description},
                "schema": info.schema(), "templates": drafting.templates(), "backends": list(BACKENDS),
                "cpus": os.cpu_count() or 1, "max_upload_bytes": settings.max_upload_bytes}
        return page(request, "form.html", f"New task: {info.name}", data)

    async def task_page(request: Request) -> Response:
        key, _ = the_task(request)
        return page(request, "task.html", key, {"key": key})

    async def task_json(request: Request) -> Response:
        key, directory = the_task(request)
        live = LiveTask(root, key, directory)
        try:
            data = await run_in_threadpool(live.snapshot)
        finally:
            live.close()
        return JSONResponse(data, headers={"cache-control": "no-store"})

    async def events(request: Request) -> Response:
        """Server-sent events: the whole task first, then what changed, within ``LIVE_POLL_SECONDS``."""
        key, directory = the_task(request)

        async def stream():
            live = LiveTask(root, key, directory)
            try:
                yield _event(await run_in_threadpool(live.snapshot))
                quiet = 0.0
                while True:
                    await asyncio.sleep(LIVE_POLL_SECONDS)
                    change = await run_in_threadpool(live.poll)
                    quiet = 0.0 if change else quiet + LIVE_POLL_SECONDS
                    if change:
                        yield _event(change)
                    elif quiet >= _PING_SECONDS:  # keeps proxies and the browser from dropping the stream
                        quiet = 0.0
                        yield ": ping\n\n"
            finally:
                live.close()

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"cache-control": "no-store", "x-accel-buffering": "no"})

    async def importance_json(request: Request) -> Response:
        _, directory = the_task(request)
        try:
            data = await run_in_threadpool(importance, directory)
        except (TaskError, ValueError, KeyError, TypeError) as exc:
            data = {"importances": {}, "left_out": [], "note": str(exc)[:300]}
        return JSONResponse(data)

    async def log_text(request: Request) -> Response:
        key, _ = the_task(request)
        path = runs.log_path(root, key)
        text = ""
        if path.is_file():
            with open(path, "rb") as fh:
                fh.seek(max(0, path.stat().st_size - _LOG_TAIL_BYTES))
                text = fh.read().decode("utf-8", errors="replace")
        return PlainTextResponse(text, headers={"cache-control": "no-store"})

    async def download_file(request: Request) -> Response:
        key, directory = the_task(request)
        name = request.query_params.get("file", "")
        if name == "task.json":  # the definition the task runs, as `mltask tasks create` takes it
            text = await run_in_threadpool(_definition_text, directory)
            return Response(text, media_type="application/json",
                            headers={"content-disposition": f'attachment; filename="{_safe(key)}.task.json"'})
        path = download(root, key, name)
        if path is None:
            raise HTTPException(404, "no such file")
        return FileResponse(path, filename=name, content_disposition_type="attachment")

    async def plotly_js(request: Request) -> Response:
        import plotly

        path = Path(plotly.__file__).resolve().parent / "package_data" / "plotly.min.js"
        return FileResponse(path, media_type="text/javascript", headers={"cache-control": "private, max-age=86400"})

    async def new_draft(request: Request) -> Response:
        return JSONResponse({"draft": drafts.new()})

    async def upload(request: Request) -> Response:
        draft_id = request.query_params.get("draft", "")
        declared = request.headers.get("content-length")
        try:
            info = await drafts.upload(draft_id, request.query_params.get("name", ""), request.stream(),
                                       int(declared) if declared and declared.isdigit() else None)
        except drafting.UploadRefused as exc:
            return JSONResponse({"errors": [{"field": "upload", "message": str(exc)}]}, status_code=413)
        except TaskError as exc:
            return JSONResponse({"errors": [{"field": exc.field, "message": exc.message}]}, status_code=400)
        return JSONResponse({"file": info, "files": drafts.files(draft_id)})

    async def remove_upload(request: Request) -> Response:
        body = await _json(request)
        drafts.remove(str(body.get("draft", "")), str(body.get("name", "")))
        return JSONResponse({"files": drafts.files(str(body.get("draft", "")))})

    async def load_template(request: Request) -> Response:
        body = await _json(request)
        chosen = next((t for t in drafting.templates() if t["id"] == body.get("id")), None)
        if chosen is None:
            raise HTTPException(404, "no such template")
        draft_id = drafts.new()
        path = drafting.template_path(chosen["id"])
        if path is not None:
            drafts.add_template_files(draft_id, path, chosen["task"])
        return JSONResponse({"task": chosen["task"], "draft": draft_id, "files": drafts.files(draft_id)})

    async def validate(request: Request) -> Response:
        form = _Form.parse(await _json(request))
        result = await run_in_threadpool(drafting.check, form.text, drafts.folder(form.draft), form.confirm,
                                         form.backend, form.workers)
        return JSONResponse(result.as_json())

    async def submit(request: Request) -> Response:
        form = _Form.parse(await _json(request))
        result, key = await run_in_threadpool(drafting.submit, root, drafts, form.draft, form.text, form.backend,
                                              form.workers, form.confirm)
        return JSONResponse(result.as_json() | {"key": key, "url": f"/task/{key}" if key else None},
                            status_code=200 if key else 422)

    async def action(request: Request) -> Response:
        key, directory = the_task(request)
        verb = request.path_params["verb"]
        body = await _json(request)
        try:
            message = await run_in_threadpool(_act, root, key, directory, verb, body)
        except TaskError as exc:
            return JSONResponse({"ok": False, "errors": [{"field": exc.field, "message": exc.message}]},
                                status_code=409)
        return JSONResponse({"ok": True, "message": message})

    async def not_found(request: Request, exc: HTTPException) -> Response:
        return PlainTextResponse(f"{exc.status_code}: {exc.detail}\n", status_code=exc.status_code)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        drafts.close()

    routes = [
        Route("/", home),
        Route("/tasks", tasks_page),
        Route("/new", new_page),
        Route("/new/{type_id}", form_page),
        Route("/task/{key:path}", task_page),
        Route("/api/tasks", tasks_json),
        Route("/api/task/{key:path}", task_json),
        Route("/api/events/{key:path}", events),
        Route("/api/importance/{key:path}", importance_json),
        Route("/api/log/{key:path}", log_text),
        Route("/download/{key:path}", download_file),
        Route("/api/draft", new_draft, methods=["POST"]),
        Route("/api/upload", upload, methods=["POST"]),
        Route("/api/upload/remove", remove_upload, methods=["POST"]),
        Route("/api/template", load_template, methods=["POST"]),
        Route("/api/validate", validate, methods=["POST"]),
        Route("/api/submit", submit, methods=["POST"]),
        Route("/api/action/{verb}/{key:path}", action, methods=["POST"]),
        Route("/static/plotly.min.js", plotly_js),
        Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: not_found}, lifespan=lifespan)
    app.state.drafts = drafts
    return Guard(app, settings.token, settings.port, settings.host)


@dataclass
class _Form:
    """What the new-task page sends: the task JSON text exactly as shown, and how to run it."""

    text: str
    draft: str | None
    backend: str
    workers: int | None
    confirm: bool

    @classmethod
    def parse(cls, body: dict[str, Any]) -> _Form:
        workers = body.get("workers")
        try:
            workers = int(workers) if workers not in (None, "") else None
        except (TypeError, ValueError):
            workers = 0  # refused by the check, next to the field
        return cls(str(body.get("task", "")), body.get("draft") or None, str(body.get("backend") or "local"),
                   workers, bool(body.get("confirm")))


async def _json(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise HTTPException(400, "expected a JSON body") from None
    if not isinstance(body, dict):
        raise HTTPException(400, "expected a JSON object")
    return body


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


def _safe(key: str) -> str:
    return drafting.safe_name(key.replace("/", "_")) or "task"


def _definition_text(directory: Path) -> str:
    """The stored definition (every field, defaults included), with resources by name as the task dir holds them."""
    reader = StateReader(directory)
    try:
        with state_errors(reader.path):
            return json.dumps(json.loads(reader.meta()["definition"]), indent=2) + "\n"
    finally:
        reader.close()


def _act(root: Path, key: str, directory: Path, verb: str, body: dict[str, Any]) -> str:
    """Abort, resume or delete a task, if its state allows it now."""
    live = LiveTask(root, key, directory)
    try:
        state = live.snapshot()
    finally:
        live.close()
    if verb not in state.get("actions", []):
        raise TaskError(verb, f"cannot {verb} a task that is {state.get('status')}")
    if verb == "abort":
        abort_task(directory)
        return "abort requested; the search stops within a second or two and keeps what finished"
    if verb == "delete":
        runs.delete(root, key, directory)
        return f"deleted {key}"
    if verb == "resume":
        form = _Form.parse(body | {"task": ""})
        backend = form.backend if body.get("backend") else (state.get("backend") or "local")
        if backend not in BACKENDS:
            raise TaskError("backend", f"unknown backend {backend!r}")
        runs.start(root, key, "resume", [str(directory)], backend, form.workers or state.get("workers"),
                   ready=lambda: _status(directory) == "running")
        return "resumed"
    raise TaskError(verb, "unknown action")


def _status(directory: Path) -> str | None:
    reader = StateReader(directory)
    try:
        return reader.meta().get("status")
    except (TaskError, KeyError):
        return None
    finally:
        reader.close()
