"""The app in a real browser: Debian's chromium driven by Playwright against ``mltask app``.

The app runs as the user starts it (``python -m mltask app``, its URL read from its output);
tasks run as real searches on the local backend. Screenshots of the main pages go to
``test-artifacts/`` (git-ignored), kept by CI as artifacts.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mltask.app import runs
from tests.support import ROOT, task_dict, write_task

pytestmark = pytest.mark.browser
SHOTS = ROOT / "test-artifacts"
LIMIT_MB = 0.05  # the upload limit the app is started with: 50 kB
SLEEPY = """import time


def fit_and_score(params, X_train, y_train, X_valid, y_valid, seed):
    time.sleep({pause})
    return float(params["x"])
"""


class App:
    """``mltask app`` in a subprocess, with its root and printed URL."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mltask", "app", "--root", str(root), "--port", "0", "--no-browser",
             "--max-upload-mb", str(LIMIT_MB)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 60
        self.url = ""
        assert self.process.stdout is not None
        while not self.url:
            line = self.process.stdout.readline()
            assert line and time.monotonic() < deadline, "mltask app printed no URL"
            match = re.search(r"(http://\S+token=\S+)", line)
            self.url = match.group(1) if match else ""
        self.base = self.url.split("/tasks")[0]

    def close(self) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
        for record in (self.root / runs.APP_DIR / "runs").glob("*.json"):  # searches the app started, by pid
            data = json.loads(record.read_text())
            if runs._alive(data["pid"], data["start_ticks"]):
                os.killpg(data["pid"], signal.SIGTERM)


@pytest.fixture
def app(tmp_path: Path) -> Iterator[App]:
    running = App(tmp_path / "root")
    yield running
    running.close()


@pytest.fixture
def page(browser: Any, app: App) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    tab.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    tab.goto(app.url)
    yield tab
    context.close()
    assert not errors, errors  # no script error and no refused request (CSP) on any page


def shot(page: Any, name: str) -> None:
    SHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def status(page: Any) -> str:
    return page.locator("#task-status").get_attribute("data-status") or ""


def wait_status(page: Any, wanted: set[str], timeout: float = 180) -> list[str]:
    """Wait (without reloading: the page is live) until the badge shows one of ``wanted``; statuses seen."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = status(page)
        if not seen or seen[-1] != now:
            seen.append(now)
        if now in wanted:
            return seen
        page.wait_for_timeout(100)
    raise AssertionError(f"status never reached {wanted}; seen {seen}")


def wait_js(page: Any, predicate: str, timeout: float = 60) -> None:
    """Poll ``predicate`` (a JS expression) from here: Playwright's own wait evaluates strings,
    which the app's Content-Security-Policy (no eval) rightly refuses."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(f"() => {{ try {{ return Boolean({predicate}); }} catch (e) {{ return false; }} }}"):
        assert time.monotonic() < deadline, f"timed out waiting for {predicate}"
        page.wait_for_timeout(100)


def settled(page: Any) -> int:
    return int(page.locator("#stat-settled b").inner_text().split("/")[0])


def new_form(page: Any) -> None:
    """From the tasks page: New task, pick the type, start from an empty form."""
    page.click("text=New task")
    page.click('a[data-type="ml_hyperparameter_search"]')
    page.wait_for_selector("#fields")
    page.select_option("#template-select", "")
    page.click("#template-load")


def fill(page: Any, path: str, value: str) -> None:
    page.fill(f"#f-{path.replace('.', '-')}", value)


def add_param(page: Any, name: str, kind: str) -> Any:
    page.click("#add-param")
    card = page.locator(".param").last
    card.locator("input.name").fill(name)
    card.locator("input.name").dispatch_event("change")
    card = page.locator(f'.param[data-param="{name}"]')
    card.locator('select[aria-label="type"]').select_option(kind)
    return page.locator(f'.param[data-param="{name}"]')


def wait_valid(page: Any) -> None:
    wait_js(page, "document.getElementById('status').classList.contains('ok')", 60)


def test_a_search_from_the_form_runs_to_finished_live(page: Any, app: App) -> None:
    shot(page, "1-tasks-empty")
    new_form(page)
    fill(page, "name", "form-svc")
    page.fill("#f-options-estimator", "sklearn.svm.SVC")
    page.check('input[name="dataset-kind"][value="builtin"]')
    page.select_option("#f-options-dataset-builtin", "iris")
    kernel = add_param(page, "kernel", "categorical")
    kernel.locator('input[aria-label="kernel choices"]').fill("rbf, poly")
    degree = add_param(page, "degree", "int")
    degree.locator('input[aria-label="degree low"]').fill("2")
    degree.locator('input[aria-label="degree high"]').fill("4")
    degree.locator('select[aria-label="degree condition on"]').select_option("kernel")
    page.locator('.param[data-param="degree"] input[aria-label="degree when kernel"]').fill("poly")
    fill(page, "options.n_trials", "10")
    fill(page, "subtasks_count", "5")
    page.select_option("#backend", "local")
    page.fill("#workers", "2")
    wait_valid(page)
    task = json.loads(page.input_value("#json"))
    assert task["options"]["search_space"] == {
        "kernel": {"type": "categorical", "choices": ["rbf", "poly"]},
        "degree": {"type": "int", "low": 2, "high": 4, "when": {"kernel": ["poly"]}},
    }
    with page.expect_download() as download:
        page.click("#json-download")
    assert json.loads(Path(download.value.path()).read_text()) == task  # the exact JSON the form stands for
    shot(page, "2-new-task-form")
    page.click("#submit")
    page.wait_for_url(re.compile(r"/task/form-svc$"), timeout=120_000)
    seen = wait_status(page, {"finished", "broken", "interrupted"})
    assert seen[-1] == "finished", seen
    wait_js(page, "document.querySelectorAll('#leaderboard tbody tr').length >= 10")
    best = json.loads((app.root / "form-svc" / "best.json").read_text())
    assert float(page.locator("#best-score").get_attribute("data-value")) == best["mean_score"]
    assert set(page.locator("#downloads a").all_inner_texts()) >= {"model.joblib", "results.csv", "results.json",
                                                                   "report.md", "task.json"}
    with page.expect_download() as model:
        page.click('#downloads a[data-file="model.joblib"]')
    assert Path(model.value.path()).read_bytes() == (app.root / "form-svc" / "model.joblib").read_bytes()
    page.wait_for_selector("#slices .main-svg")
    shot(page, "3-task-finished")
    stored = json.loads(page.request.get(f"{app.base}/download/form-svc?file=task.json").text())
    assert stored["options"]["search_space"]["degree"]["when"] == {"kernel": ["poly"]}


def test_a_task_started_from_the_cli_shows_up_and_updates_live(page: Any, app: App, tmp_path: Path) -> None:
    (tmp_path / "sleepy.py").write_text(SLEEPY.format(pause=0.15))
    task = task_dict(estimator=None, scoring=None, script={"file": "sleepy.py"}, n_trials=24,
                     search_space={"x": {"type": "float", "low": 0, "high": 1}}) | {"resources": ["sleepy.py"],
                                                                                     "subtasks_count": 24}
    cli = subprocess.Popen([sys.executable, "-m", "mltask", "tasks", "create", str(write_task(tmp_path, task)),
                            "--output", str(app.root / "from-cli"), "--workers", "1", "--quiet"])
    try:
        row = page.locator('tr[data-key="from-cli"]')
        row.wait_for(timeout=60_000)  # the list refreshes itself every second
        shot(page, "0-tasks-list")
        row.locator("a").click()
        page.wait_for_url(re.compile(r"/task/from-cli$"))
        wait_status(page, {"running"}, timeout=60)
        wait_js(page, "Number(document.querySelector('#stat-settled b').textContent.split('/')[0]) > 0", 60)
        first = settled(page)
        wait_js(page, f"Number(document.querySelector('#stat-settled b').textContent.split('/')[0]) > {first}", 60)
        assert status(page) == "running"  # it moved while the search ran, with no reload
        shot(page, "4-task-running")
        seen = wait_status(page, {"finished"})
        assert settled(page) == 24 and "running" in seen
    finally:
        assert cli.wait(120) == 0


def test_bad_input_shows_field_errors_and_writes_nothing(page: Any, app: App) -> None:
    new_form(page)
    page.fill("#json", '{"name": "broken", "options": ')
    error = page.locator('[data-field="task"] .err')
    error.wait_for()
    wait_js(page, "document.querySelector('[data-field=\"task\"] .err').textContent.includes('not valid JSON')")
    assert page.locator("#submit").is_disabled()
    page.select_option("#template-select", "builtin:ml_hyperparameter_search")
    page.click("#template-load")
    wait_valid(page)
    card = page.locator('.param[data-param="C"]')
    card.locator('input[aria-label="C low"]').fill("500")
    wait_js(page, "document.querySelector('.param[data-param=\"C\"] > .err').textContent.includes('swap')")
    assert "empty range: low (500.0) is above high (100.0)" in card.locator(":scope > .err").inner_text()
    assert page.locator("#submit").is_disabled()
    shot(page, "5-field-errors")
    response = page.request.post(f"{app.base}/api/submit", data={"task": page.input_value("#json")},
                                 headers={"x-csrf-token": page.locator('meta[name="csrf"]').get_attribute("content")})
    assert response.status == 422
    assert list(app.root.iterdir()) == []  # nothing written under the root


def test_abort_and_resume_from_the_ui_with_a_confirmed_script(page: Any, app: App, tmp_path: Path) -> None:
    new_form(page)
    fill(page, "name", "sleepy")
    page.check('input[name="model-kind"][value="script"]')
    script = tmp_path / "sleepy.py"
    script.write_text(SLEEPY.format(pause=0.3))
    page.set_input_files('[data-field="options.script.file"] input[type=file]', str(script))
    wait_js(page, "document.getElementById('f-options-script-file').value === 'sleepy.py'")
    page.check('input[name="dataset-kind"][value="builtin"]')
    page.select_option("#f-options-dataset-builtin", "iris")
    x = add_param(page, "x", "float")
    x.locator('input[aria-label="x high"]').fill("1")
    fill(page, "options.n_trials", "30")
    fill(page, "subtasks_count", "30")
    page.fill("#workers", "1")
    page.locator("#script-text").wait_for()  # shown before anything imports it
    assert "time.sleep(0.3)" in page.locator("#script-text").inner_text()
    assert page.locator("#submit").is_disabled()
    shot(page, "6-confirm-script")
    page.check("#confirm-run")
    wait_valid(page)
    page.click("#submit")
    page.wait_for_url(re.compile(r"/task/sleepy$"), timeout=120_000)
    wait_status(page, {"running"}, timeout=60)
    wait_js(page, "Number(document.querySelector('#stat-settled b').textContent.split('/')[0]) > 0", 60)
    page.click('#task-actions button[data-action="abort"]')
    page.click("#confirm-ok")
    seen = wait_status(page, {"aborted"}, timeout=60)
    done = settled(page)
    assert 0 < done < 30, seen
    page.click('#task-actions button[data-action="resume"]')
    seen = wait_status(page, {"finished"}, timeout=240)
    assert "running" in seen and settled(page) == 30


def test_no_token_traversal_and_oversize_upload_on_the_real_server(browser: Any, page: Any, app: App,
                                                                   tmp_path: Path) -> None:
    stranger = browser.new_context()
    response = stranger.new_page().goto(f"{app.base}/tasks")
    assert response.status == 403 and "access token" in response.text()
    assert stranger.request.get(f"{app.base}/api/tasks").status == 403
    stranger.close()
    for url in ("/download/..%2F..%2Fetc?file=passwd", "/download/x?file=../../etc/passwd", "/task/%2Fetc",
                "/static/..%2F..%2Fweb.py"):
        assert page.request.get(app.base + url).status == 404, url
    new_form(page)
    page.check('input[name="dataset-kind"][value="csv"]')
    big = tmp_path / "big.csv"
    big.write_text("a,b\n" + "1,2\n" * 20_000)  # 80 kB, over the 50 kB limit
    page.set_input_files('[data-field="options.dataset"] input[type=file]', str(big))
    error = page.locator('[data-field="options.dataset"] > .err')
    wait_js(page, "document.querySelector('[data-field=\"options.dataset\"] > .err').textContent !== ''")
    assert "larger than the upload limit" in error.inner_text()
    csrf = page.locator('meta[name="csrf"]').get_attribute("content")
    draft = page.request.post(f"{app.base}/api/draft", headers={"x-csrf-token": csrf}).json()["draft"]
    refused = page.request.post(f"{app.base}/api/upload?draft={draft}&name=big.csv", data=big.read_bytes(),
                                headers={"x-csrf-token": csrf, "content-type": "application/octet-stream"})
    assert refused.status == 413  # the server refuses it too, whatever the page does
    small = tmp_path / "small.csv"
    small.write_text("f1,f2,label\n1,2,0\n2,3,1\n3,4,0\n4,5,1\n")
    page.set_input_files('[data-field="options.dataset"] input[type=file]', str(small))
    wait_js(page, "document.querySelectorAll('#f-options-dataset-target option').length === 4")
    page.select_option("#f-options-dataset-target", "label")
    assert json.loads(page.input_value("#json"))["options"]["dataset"] == {"csv": "small.csv", "target": "label"}


def test_a_template_with_an_estimator_object_loads_and_edits_as_json(page: Any, app: App) -> None:
    new_form(page)
    page.select_option("#template-select", "breast_cancer_lightgbm.json")
    page.click("#template-load")
    confirm_modules(page)
    assert page.locator('input[name="model-kind"][value="object"]').is_checked()
    area = page.locator("#f-options-estimator")
    assert json.loads(area.input_value())["class"] == "lightgbm.LGBMClassifier"
    area.fill(json.dumps({"class": "lightgbm.LGBMClassifier", "params": {"n_estimators": 20, "n_jobs": 1}}))
    wait_js(page, "JSON.parse(document.getElementById('json').value).options.estimator.params.n_estimators === 20")
    confirm_modules(page)


def confirm_modules(page: Any) -> None:
    """The app asks before it imports estimators from lightgbm.: say yes, then the task is valid."""
    wait_js(page, "document.getElementById('confirm-box').textContent.includes('lightgbm.')")
    page.check("#confirm-run")
    wait_valid(page)
