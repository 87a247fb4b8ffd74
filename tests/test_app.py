"""The app's server side without a browser: access, confinement, uploads, validation, broken state.

Requests go through Starlette's test client to the real ASGI app, guard included; tasks are
real ones run with ``run_task`` (a second or two each). The browser tests are in
``test_app_browser.py``.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from mltask import run_task
from mltask.app import runs
from mltask.app.security import csrf_token
from mltask.app.web import Settings, create_app
from mltask.definition import template
from tests.support import task_dict

TOKEN = "test-token"
PORT = 8686
CSRF = {"x-csrf-token": csrf_token(TOKEN)}


def client(root: Path, max_upload_bytes: int = 100_000, token: bool = True) -> TestClient:
    app = create_app(Settings(root=root, token=TOKEN, port=PORT, max_upload_bytes=max_upload_bytes))
    test_client = TestClient(app, base_url=f"http://127.0.0.1:{PORT}")
    if token:
        test_client.cookies.set(f"mltask-app-{PORT}", TOKEN)
    return test_client


def finished_task(root: Path, name: str = "done") -> Path:
    out = root / name
    run_task(task_dict(), workers=1, output=out, quiet=True)
    return out


def entries(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def test_every_request_needs_the_token(tmp_path: Path) -> None:
    finished_task(tmp_path)
    anonymous = client(tmp_path, token=False)
    for path in ("/tasks", "/api/tasks", "/task/done", "/api/events/done", "/download/done?file=best.json",
                 "/static/app.js", "/static/plotly.min.js", "/new"):
        assert anonymous.get(path).status_code == 403, path
        assert anonymous.get(path + ("&" if "?" in path else "?") + "token=wrong").status_code == 403, path
    assert anonymous.post("/api/validate", json={"task": "{}"}, headers=CSRF).status_code == 403

    # The printed URL: the token once in the query, then a cookie only this origin sends.
    first = anonymous.get(f"/tasks?token={TOKEN}", follow_redirects=False)
    assert first.status_code == 303 and first.headers["location"] == "/tasks"
    cookie = first.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and TOKEN in cookie
    assert anonymous.get("/tasks").status_code == 200  # the cookie now carries it
    assert "content-security-policy" in anonymous.get("/tasks").headers


def test_host_header_and_csrf_are_checked(tmp_path: Path) -> None:
    app = client(tmp_path)
    assert app.get("/tasks").status_code == 200
    for host in ("evil.example:8686", "127.0.0.1.evil.example:8686", f"localhost:{PORT + 1}", "localhost"):
        assert app.get("/tasks", headers={"host": host}).status_code == 403, host
    for host in (f"localhost:{PORT}", f"[::1]:{PORT}", f"10.1.2.3:{PORT}"):  # own names and IP literals only
        assert app.get("/tasks", headers={"host": host}).status_code == 200, host
    body = {"task": json.dumps(template())}
    assert app.post("/api/validate", json=body).status_code == 403  # no CSRF token
    assert app.post("/api/validate", json=body, headers={"x-csrf-token": "0" * 64}).status_code == 403
    assert app.post("/api/validate", json=body, headers=CSRF | {"origin": "http://evil.example"}).status_code == 403
    assert app.post("/api/validate", json=body, headers=CSRF | {"sec-fetch-site": "cross-site"}).status_code == 403
    assert app.post("/api/validate", json=body, headers=CSRF | {"origin": f"http://127.0.0.1:{PORT}"}).json()["ok"]
    assert app.get("/api/validate").status_code == 405  # state-changing routes take POST only


def test_downloads_and_task_paths_stay_inside_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    finished_task(root)
    outside = finished_task(tmp_path, "outside")
    (root / "linked").symlink_to(outside)  # a task dir that is a link out of the root
    (root / "done" / "secret.json").symlink_to(outside / "best.json")
    app = client(root)
    assert app.get("/download/done?file=best.json").json()["mean_score"] > 0
    assert "ml_hyperparameter_search" in app.get("/download/done?file=task.json").text
    (root / "done" / "rungs.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # a multi-fidelity search's plot
    assert app.get("/download/done?file=rungs.png").content.startswith(b"\x89PNG")
    for url in ("/download/done?file=../outside/best.json", "/download/done?file=/etc/passwd",
                "/download/done?file=state.db", "/download/done?file=secret.json", "/download/done?file=resources",
                "/download/..%2Foutside?file=best.json", "/download/%2Fetc?file=passwd",
                "/download/linked?file=best.json",
                "/download/done/..?file=best.json", "/task/..%2Foutside", "/task/linked", "/api/task/linked",
                "/api/events/..%2F..%2Fetc", "/task/done%00", "/download/.mltask-app?file=best.json"):
        assert app.get(url).status_code == 404, url
    assert [r["key"] for r in app.get("/api/tasks").json()] == ["done"]  # the link is not followed


def test_an_oversize_upload_is_refused_and_nothing_of_it_kept(tmp_path: Path) -> None:
    app = client(tmp_path, max_upload_bytes=1000)
    draft = app.post("/api/draft", headers=CSRF).json()["draft"]
    ok = app.post(f"/api/upload?draft={draft}&name=data.csv", content=b"a,b\n1,2\n", headers=CSRF)
    assert ok.status_code == 200 and ok.json()["file"]["columns"] == ["a", "b"]
    big = app.post(f"/api/upload?draft={draft}&name=big.csv", content=b"x" * 1001, headers=CSRF)
    assert big.status_code == 413 and "upload limit" in big.json()["errors"][0]["message"]

    def chunks():  # no Content-Length: the limit holds while streaming
        for _ in range(5):
            yield b"y" * 300

    streamed = app.post(f"/api/upload?draft={draft}&name=big2.csv", content=chunks(), headers=CSRF)
    assert streamed.status_code == 413
    files = app.post("/api/upload/remove", json={"draft": draft, "name": "nothing"}, headers=CSRF).json()["files"]
    assert [f["name"] for f in files] == ["data.csv"]
    folder = app.app.app.state.drafts.base / draft  # no partial file left behind either
    assert sorted(p.name for p in folder.iterdir()) == ["data.csv"]
    # Unsafe names are made safe; nothing lands outside the draft.
    odd = app.post(f"/api/upload?draft={draft}&name=..%2F..%2Fevil%20name.py", content=b"x = 1\n", headers=CSRF)
    assert odd.json()["file"]["name"] == "evil_name.py"
    assert entries(tmp_path) == []


def test_bad_input_is_reported_by_field_and_nothing_is_written(tmp_path: Path) -> None:
    app = client(tmp_path)

    def check(text: str, url: str = "/api/validate") -> dict[str, Any]:
        return app.post(url, json={"task": text, "backend": "local"}, headers=CSRF).json()

    bad_json = check('{"name": "x",')
    assert bad_json["errors"][0]["field"] == "task" and "not valid JSON" in bad_json["errors"][0]["message"]
    inverted = template()
    inverted["options"]["search_space"]["C"] = {"type": "float", "low": 10, "high": 1}
    error = check(json.dumps(inverted))["errors"][0]
    assert error == {"field": "options.search_space.C", "message": "empty range: low (10.0) is above high (1.0); "
                     "swap them"}
    wrong_param = template()
    wrong_param["options"]["search_space"]["C_typo"] = [1, 2]
    assert check(json.dumps(wrong_param))["errors"][0]["field"] == "options.search_space.C_typo"  # from resolve
    for url in ("/api/validate", "/api/submit"):
        assert check(json.dumps(inverted), url)["errors"]
        assert check("[1, 2]", url)["errors"][0]["field"] == "task"
    assert app.post("/api/submit", json={"task": json.dumps(inverted)}, headers=CSRF).status_code == 422
    assert entries(tmp_path) == []  # no task dir, no app records
    assert check(json.dumps(template()))["ok"]


def test_a_task_may_name_only_files_uploaded_with_it(tmp_path: Path) -> None:
    (tmp_path / "secret.csv").write_text("a,b\n1,2\n3,4\n")
    app = client(tmp_path / "root")
    for raw in ("../secret.csv", str(tmp_path / "secret.csv"), "/etc/passwd", ".hidden", "sub/x.csv"):
        task = template() | {"resources": [raw]}
        error = app.post("/api/validate", json={"task": json.dumps(task)}, headers=CSRF).json()["errors"][0]
        assert error["field"] == "resources[0]" and "not a file uploaded with this task" in error["message"], raw


def test_a_script_is_shown_and_confirmed_before_it_is_imported(tmp_path: Path) -> None:
    marker = tmp_path / "imported"
    script = f"open({str(marker)!r}, 'w').close()\ndef fit_and_score(params, X, y, Xv, yv, seed):\n    return 1.0\n"
    app = client(tmp_path / "root")
    draft = app.post("/api/draft", headers=CSRF).json()["draft"]
    app.post(f"/api/upload?draft={draft}&name=train.py", content=script.encode(), headers=CSRF)
    task = task_dict(estimator=None, scoring=None, script={"file": "train.py"}) | {"resources": ["train.py"]}
    body = {"task": json.dumps(task), "draft": draft}
    first = app.post("/api/validate", json=body, headers=CSRF).json()
    assert not first["ok"] and first["confirm"][0]["kind"] == "script" and first["confirm"][0]["text"] == script
    assert not marker.exists()  # shown, not run
    refused = app.post("/api/submit", json=body, headers=CSRF)
    assert refused.status_code == 422 and not marker.exists() and not (tmp_path / "root" / "tiny").exists()
    confirmed = app.post("/api/validate", json=body | {"confirm": True}, headers=CSRF).json()
    assert confirmed["ok"] and marker.exists()
    modules = template()
    modules["options"]["allowed_modules"] = ["sklearn.", "os."]
    asked = app.post("/api/validate", json={"task": json.dumps(modules)}, headers=CSRF).json()["confirm"]
    assert asked == [{"kind": "modules", "modules": ["os."]}]


def test_a_broken_state_file_is_a_broken_task_not_a_500(tmp_path: Path) -> None:
    finished_task(tmp_path, "good")
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "state.db").write_bytes(b"this is not a database" * 100)
    (tmp_path / "foreign").mkdir()
    sqlite3.connect(tmp_path / "foreign" / "state.db").execute("CREATE TABLE x (y)").connection.commit()
    mangled = finished_task(tmp_path, "mangled")
    with sqlite3.connect(mangled / "state.db") as conn:
        conn.execute("UPDATE trials SET params = '{not json' WHERE number = 0")
    app = client(tmp_path)
    rows = {r["key"]: r for r in app.get("/api/tasks").json()}
    assert rows["good"]["status"] == "finished"
    for key in ("garbage", "foreign", "mangled"):
        assert app.get(f"/task/{key}").status_code == 200
        data = app.get(f"/api/task/{key}").json()
        assert data["status"] == "broken" and data["status_note"], key
        assert data["actions"] == ["delete"]
        with app.stream("GET", f"/api/events/{key}") as stream:
            first = next(line for line in stream.iter_lines() if line.startswith("data: "))
        assert json.loads(first.removeprefix("data: "))["status"] == "broken"
    assert rows["garbage"]["status"] == "broken" and rows["foreign"]["status"] == "broken"
    assert app.get("/tasks").status_code == 200


def test_a_running_task_whose_process_is_gone_is_interrupted(tmp_path: Path) -> None:
    out = finished_task(tmp_path, "crashed")
    with sqlite3.connect(out / "state.db") as conn:  # as a kill -9 leaves it
        conn.execute("UPDATE meta SET value = 'running' WHERE key = 'status'")
    lock = out / ".mltask.lock"  # the runner's flock file (StateLock), held by nobody now
    lock.rename(out / "lock.kept")
    app = client(tmp_path)
    assert app.get("/api/task/crashed").json()["status"] == "running"  # no process information: as stored
    (out / "lock.kept").rename(lock)
    assert app.get("/api/task/crashed").json()["status"] == "interrupted"  # a CLI task: nobody holds its lock
    lock.rename(out / "lock.kept")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    ticks = runs._start_ticks(gone.pid)
    gone.wait()
    record = runs.RunRecord("crashed", "create", gone.pid, ticks, "local", 1, "", time.time())
    runs._write_record(tmp_path, record)
    data = app.get("/api/task/crashed").json()
    assert data["status"] == "interrupted" and "resume" in data["actions"] and "abort" not in data["actions"]


def test_forms_come_from_the_registry_and_templates(tmp_path: Path) -> None:
    app = client(tmp_path)
    assert 'href="/new/ml_hyperparameter_search"' in app.get("/new").text
    assert app.get("/new/no_such_type").status_code == 404
    page = app.get("/new/ml_hyperparameter_search").text
    assert "search_space" in page and "digits_svc_tpe.json" in page
    loaded = app.post("/api/template", json={"id": "script_knn.json"}, headers=CSRF).json()
    assert [f["name"] for f in loaded["files"]] == ["knn_train.py"]  # the template's own resource comes along
    body = {"task": json.dumps(loaded["task"]), "draft": loaded["draft"], "confirm": True}
    assert app.post("/api/validate", json=body, headers=CSRF).json()["ok"]


def test_golem_shows_the_worst_case_cost(tmp_path: Path) -> None:
    task = template() | {"bid": 0.5, "timeout": "02:00:00"}
    task["options"]["golem"] = {"budget": 3.0}
    app = client(tmp_path)
    cost = app.post("/api/validate", json={"task": json.dumps(task), "backend": "golem", "workers": 4},
                    headers=CSRF).json()["summary"]["cost"]
    assert cost["worst"] == pytest.approx(0.5 * 4 * 2) and cost["capped"] == 3.0
    assert app.post("/api/validate", json={"task": json.dumps(task), "backend": "nope"},
                    headers=CSRF).json()["errors"][0]["field"] == "backend"
    assert app.post("/api/validate", json={"task": json.dumps(task), "workers": "0"},
                    headers=CSRF).json()["errors"][0]["field"] == "workers"


def test_the_live_stream_sends_only_what_changed(tmp_path: Path) -> None:
    from mltask.app.tasks import LiveTask

    out = finished_task(tmp_path, "t")
    live = LiveTask(tmp_path, "t", out)
    first = live.snapshot()
    assert first["reset"] and len(first["trials"]) == 8 and first["status"] == "finished"
    assert live.poll() is None  # nothing changed: nothing sent
    with sqlite3.connect(out / "state.db") as conn:  # a trial settles (as a resumed run would write it)
        conn.execute("UPDATE trials SET finished_at = ?, value = 0.5 WHERE number = 3", (time.time() + 1,))
    delta = live.poll()
    assert delta is not None and not delta["reset"]
    last = max(t[5] for t in first["trials"])  # besides trial 3, only those settled at the last instant seen
    assert {t[0] for t in delta["trials"]} == {3} | {t[0] for t in first["trials"] if t[5] == last}
    assert next(t for t in delta["trials"] if t[0] == 3)[2] == 0.5
    assert live.poll() is None
    live.close()


class _Server:
    """``mltask app`` as the user starts it, spoken to over HTTP."""

    def __init__(self, root: Path) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "mltask", "app", "--root", str(root), "--port", "0",
                                         "--no-browser"], stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        while "token=" not in line:
            assert line, "mltask app printed no URL"
            line = self.process.stdout.readline()
        url = line.split()[-1]
        self.base, self.token = url.split("/tasks?token=")
        self.headers = {"cookie": f"mltask-app-{self.base.rsplit(':', 1)[1]}={self.token}",
                        "x-csrf-token": csrf_token(self.token), "content-type": "application/json"}

    def call(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base + path, data=data, headers=self.headers)
        with urllib.request.urlopen(request, timeout=180) as response:
            return json.loads(response.read())

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)
        assert self.process.wait(30) == 0


@pytest.mark.slow
def test_a_search_outlives_the_app_and_a_restarted_app_finds_it(tmp_path: Path) -> None:
    script = "import time\n\ndef fit_and_score(params, *data):\n    time.sleep(0.1)\n    return params['x']\n"
    task = task_dict(estimator=None, scoring=None, script={"file": "slow.py"}, n_trials=30,
                     search_space={"x": {"type": "float", "low": 0, "high": 1}}) | {"resources": ["slow.py"],
                                                                                     "subtasks_count": 30}
    first = _Server(tmp_path)
    draft = first.call("/api/draft", {})["draft"]
    upload = urllib.request.Request(f"{first.base}/api/upload?draft={draft}&name=slow.py", data=script.encode(),
                                    headers=first.headers | {"content-type": "application/octet-stream"})
    urllib.request.urlopen(upload).close()
    started = first.call("/api/submit", {"task": json.dumps(task), "draft": draft, "workers": 1, "confirm": True})
    assert started["key"] == "tiny"
    record = runs.read_record(tmp_path, "tiny")
    assert record is not None and record.alive()
    first.stop()  # closing the app ...
    assert record.alive()  # ... never stops the search
    second = _Server(tmp_path)
    try:
        seen = second.call("/api/task/tiny")
        assert seen["status"] == "running" and seen["pid"] == record.pid  # re-attached from the state files
        deadline = time.monotonic() + 180
        while second.call("/api/task/tiny")["status"] == "running":
            assert time.monotonic() < deadline
            time.sleep(0.5)
        done = second.call("/api/task/tiny")
        assert done["status"] == "finished" and sum(t[1] == "complete" for t in done["trials"]) == 30
        assert "resume" not in done["actions"] and "delete" in done["actions"]
        assert second.call("/api/action/delete/tiny", {})["ok"]
        assert not (tmp_path / "tiny").exists() and runs.read_record(tmp_path, "tiny") is None
    finally:
        second.stop()
