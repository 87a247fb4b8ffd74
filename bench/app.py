"""The app at scale: a 10,000-trial task page in under 1 s, a live page under 2% of a core.

1. Page: builds a 10,000-trial task (the resume benchmark's trivial random search), starts
   ``mltask app`` on it and requests the task page and the data its live stream opens with
   (the whole task: every trial, subtask and verdict). Prints the median server time of each
   (the app's ``Server-Timing`` header: from request to response, the JSON rendered) and
   the median the client saw, over ``--repeats`` requests.
2. Live: starts a search that settles a trial or two a second for about a minute, opens its
   task page in headless chromium (Debian's, through Playwright; without them, a plain
   server-sent-events client stands in, and the browser's share is not measured), and reads
   the CPU time the app server and the browser used over ``--window`` seconds, against the
   same window with the search running and no page open. The search itself is not counted:
   it runs whether or not anyone watches.

    python bench/app.py [--trials N] [--repeats R] [--window S] [--quick]

Figures taken on a loaded machine (ours has 2 cores shared by several jobs) are only
indicative; run it on a quiet one for numbers to quote.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
SLEEPY = """import time


def fit_and_score(params, X_train, y_train, X_valid, y_valid, seed):
    time.sleep(0.15)
    return float(params["x"])
"""
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int, tree: bool = False) -> float:
    """User + system CPU time of a process (and, with ``tree``, of every live descendant)."""
    total = 0.0
    pids = [pid] + (_descendants(pid) if tree else [])
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / _TICK
    return total


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            except OSError:
                continue
            children.setdefault(parent, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


class App:
    def __init__(self, root: Path) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "mltask", "app", "--root", str(root), "--port", "0",
                                         "--no-browser"], stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        while True:
            line = self.process.stdout.readline()
            if not line:
                raise SystemExit("mltask app did not start")
            match = re.search(r"(http://\S+)/tasks\?token=(\S+)", line)
            if match:
                self.base, self.token = match.groups()
                break
        threading.Thread(target=self.process.stdout.read, daemon=True).start()

    def get(self, path: str) -> tuple[float, float]:
        """Server time and client time of one GET, in seconds."""
        request = urllib.request.Request(self.base + path, headers={"cookie": f"{self.cookie}={self.token}"})
        started = time.perf_counter()
        with urllib.request.urlopen(request) as response:
            response.read()
            timing = response.headers["server-timing"]
        return float(timing.split("dur=")[1]) / 1000, time.perf_counter() - started

    @property
    def cookie(self) -> str:
        return f"mltask-app-{self.base.rsplit(':', 1)[1]}"

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(30)


def page_times(trials: int, repeats: int, work: Path) -> None:
    root = work / "root"
    subprocess.run([sys.executable, str(HERE / "resume.py"), "--phase", "create", "--dir", str(root / "big"),
                    "--trials", str(trials)], check=True, capture_output=True)
    app = App(root)
    try:
        app.get("/api/task/big")  # first request: imports, caches warm
        runs = {"page (HTML)": [app.get("/task/big") for _ in range(repeats)],
                "its data (whole task)": [app.get("/api/task/big") for _ in range(repeats)]}
    finally:
        app.close()
    print(f"task page of a task with {trials} trials, median of {repeats} requests:")
    total = 0.0
    for what, times in runs.items():
        server = statistics.median(t[0] for t in times)
        total += server
        print(f"  {what}: server {server * 1000:.1f} ms, client {statistics.median(t[1] for t in times) * 1000:.1f} ms")
    print(f"  together: {total * 1000:.0f} ms server time (target < 1000 ms)")


def live_cost(window: float, work: Path) -> None:
    root = work / "live"
    (work / "sleepy.py").write_text(SLEEPY)
    task = {"type": "ml_hyperparameter_search", "name": "live", "timeout": "00:10:00", "subtasks_count": 300,
            "resources": ["sleepy.py"],
            "options": {"script": {"file": "sleepy.py"}, "dataset": {"builtin": "iris"}, "algorithm": "random",
                        "search_space": {"x": {"type": "float", "low": 0, "high": 1}}, "n_trials": 300,
                        "cv": {"kind": "kfold", "folds": 2}, "verification": {"sample_rate": 0.1}}}
    (work / "live.json").write_text(json.dumps(task))
    app = App(root)
    search = subprocess.Popen([sys.executable, "-m", "mltask", "tasks", "create", str(work / "live.json"), "--output",
                               str(root / "live"), "--workers", "1", "--quiet"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        while not (root / "live" / "state.db").exists():
            time.sleep(0.2)
        time.sleep(3)
        before = cpu_seconds(app.process.pid)
        time.sleep(window)
        idle = (cpu_seconds(app.process.pid) - before) / window
        watcher, browser_share = _watch(app, window, others=[app.process.pid, search.pid])
        server = watcher["server"]
        still = search.poll() is None
    finally:
        search.terminate()
        search.wait(60)
        app.close()
    print(f"live page on a running search (a trial settling every ~0.4 s), {window:.0f} s windows:")
    print(f"  app server: {100 * server:.2f}% of one core with the page open, {100 * idle:.2f}% without "
          f"(the page's cost: {100 * (server - idle):.2f}%; target < 2%)")
    if browser_share is not None:
        print(f"  the browser showing it (headless chromium, software rendering, all its processes): "
              f"{100 * browser_share:.2f}% of one core")
    print(f"  updates received: {watcher['updates']} ({watcher['how']})" + ("" if still else
          "; the search ended inside the window - lengthen it or shorten --window"))


def _watch(app: App, window: float, others: list[int]) -> tuple[dict, float | None]:
    """Open the live page for ``window`` seconds; CPU shares of the app server and of the browser."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if sync_playwright is None or not Path(CHROMIUM).exists():
        return _watch_stream(app, window), None
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page()
        page.goto(f"{app.base}/tasks?token={app.token}")
        page.goto(f"{app.base}/task/live")
        page.wait_for_selector("#slices .main-svg", timeout=60_000)
        time.sleep(3)  # the page has loaded; what follows is the cost of keeping it live
        settled = page.locator("#stat-settled b").inner_text()
        skip = set(others) | {p for other in others for p in _descendants(other)}
        browsers = [p for p in _descendants(os.getpid()) if p not in skip]  # Playwright's driver and chromium
        start_server, start_browser = cpu_seconds(app.process.pid), sum(cpu_seconds(p) for p in browsers)
        time.sleep(window)
        server = (cpu_seconds(app.process.pid) - start_server) / window
        browser_cpu = (sum(cpu_seconds(p) for p in browsers) - start_browser) / window
        moved = page.locator("#stat-settled b").inner_text() != settled
        browser.close()
    return {"server": server, "updates": "yes" if moved else "none", "how": "chromium, the real page"}, browser_cpu


def _watch_stream(app: App, window: float) -> dict:
    request = urllib.request.Request(f"{app.base}/api/events/live", headers={"cookie": f"{app.cookie}={app.token}"})
    updates = 0
    with urllib.request.urlopen(request) as stream:
        stream.readline()  # the first event: the whole task
        start = cpu_seconds(app.process.pid)
        deadline = time.monotonic() + window
        while time.monotonic() < deadline:
            if stream.readline().startswith(b"data: "):
                updates += 1
        server = (cpu_seconds(app.process.pid) - start) / window
    return {"server": server, "updates": updates, "how": "a server-sent-events client (no chromium here)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--window", type=float, default=20.0)
    parser.add_argument("--quick", action="store_true", help="2,000 trials, 5 repeats, 10 s windows")
    args = parser.parse_args()
    trials, repeats, window = (2000, 5, 10.0) if args.quick else (args.trials, args.repeats, args.window)
    with tempfile.TemporaryDirectory() as tmp:
        page_times(trials, repeats, Path(tmp))
        live_cost(window, Path(tmp))
    print("(taken on this machine as it is now: on a loaded machine these are only indicative)")


if __name__ == "__main__":
    main()
