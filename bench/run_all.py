"""Every benchmark, one after another: ``python bench/run_all.py [--quick]``.

Each prints its ratios against the peer it names, measured in the same run.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = ["compare_sklearn.py", "search_cv.py", "fidelity.py", "overhead.py", "verification.py", "scale.py",
           "resume.py", "docker_overhead.py", "tpe_batched.py", "app.py"]

if __name__ == "__main__":
    quick = ["--quick"] if "--quick" in sys.argv[1:] else []
    failed = []
    for name in BENCHES:
        if not (HERE / name).exists():
            continue
        print(f"== {name}", flush=True)
        args = quick if name != "overhead.py" else []
        if subprocess.run([sys.executable, str(HERE / name), *args]).returncode != 0:
            failed.append(name)
    sys.exit(f"failed: {', '.join(failed)}" if failed else 0)
