"""Docker backend overhead: the same subtasks on the docker backend and on the local one.

Each subtask is one trial that spins the CPU for a fixed time (about 1 s, 10 s and 60 s of
compute), two providers at once, verification off (it costs the same on both backends
and is benchmarked in verification.py). Printed per size, as medians over the repeats:
seconds per subtask (sent to settled) on each backend, and the efficiency local wall /
docker wall. Target: efficiency >= 0.9 at 10 s. The peer is the local backend, measured
side by side in the same run. Needs the daemon and the image (`bash .ci/docker.sh`).

    python bench/docker_overhead.py [--quick] [--repeats R] [--sizes 1 10 60]
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

from mltask import run_task

SPIN = '''
import time

def fit_and_score(params, X_train, y_train, X_valid, y_valid, seed):
    end = time.process_time() + params["seconds"]
    while time.process_time() < end:
        pass
    return float(params["i"])
'''


def _task(seconds: float, subtasks: int) -> dict:
    return {
        "type": "ml_hyperparameter_search", "name": f"spin-{seconds:g}", "timeout": "01:00:00",
        "subtask_timeout": "00:10:00", "subtasks_count": subtasks, "resources": ["spin.py"],
        "options": {
            "script": {"file": "spin.py"}, "dataset": {"builtin": "iris"}, "cv": {"kind": "holdout"},
            "search_space": {"i": list(range(subtasks)), "seconds": seconds}, "algorithm": "grid",
            "verification": {"budget": 0, "verify_best": False},
        },
    }


def _run(base: Path, backend: str) -> tuple[float, float]:
    """Wall seconds of the search in ``base/task.json``, median seconds per subtask."""
    out = base / backend
    started = time.perf_counter()
    run_task(base / "task.json", backend=backend, workers=2, output=out, quiet=True)
    wall = time.perf_counter() - started
    with sqlite3.connect(out / "state.db") as conn:
        spans = [b - a for a, b in conn.execute("SELECT created_at, finished_at FROM subtasks WHERE state='accepted'")]
    return wall, statistics.median(spans)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 s and 10 s subtasks only")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", type=float, nargs="+", default=[1.0, 10.0, 60.0], help="seconds per subtask")
    args = parser.parse_args()
    count = {1.0: 8, 10.0: 4, 60.0: 2}
    sizes = [(1.0, 8), (10.0, 4)] if args.quick else [(s, count.get(s, 2)) for s in args.sizes]
    print("seconds of compute per subtask | local s/subtask | docker s/subtask | docker overhead s | "
          "efficiency local/docker wall")
    for seconds, subtasks in sizes:
        walls: dict[str, list[float]] = {"local": [], "docker": []}
        spans: dict[str, list[float]] = {"local": [], "docker": []}
        for _ in range(args.repeats):
            for backend in ("local", "docker"):  # side by side, alternating
                with tempfile.TemporaryDirectory() as tmp:
                    base = Path(tmp)
                    (base / "spin.py").write_text(SPIN)
                    (base / "task.json").write_text(json.dumps(_task(seconds, subtasks)))
                    wall, span = _run(base, backend)
                walls[backend].append(wall)
                spans[backend].append(span)
        local, docker = statistics.median(spans["local"]), statistics.median(spans["docker"])
        efficiency = statistics.median(walls["local"]) / statistics.median(walls["docker"])
        target = " (target >= 0.9)" if seconds == 10 else ""
        print(f"{seconds:>6g} | {local:.2f} | {docker:.2f} | {docker - local:+.2f} | {efficiency:.3f}{target}",
              flush=True)


if __name__ == "__main__":
    main()
