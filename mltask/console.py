"""Terminal output with rich: a live progress line and the final leaderboard."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from mltask.results import Summary
from mltask.task import Progress as TaskProgress


class SearchProgress:
    """``trials 12/50 ━━━━━ best 0.9812 (trial 7) 0:00:12 eta 0:00:30``."""

    def __init__(self, console: Console, total: int, label: str, enabled: bool = True) -> None:
        self._bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[best]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
            disable=not enabled,
            transient=False,
        )
        self._id = self._bar.add_task(label, total=total, best="")
        self._last = 0.0

    def __enter__(self) -> SearchProgress:
        self._bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.__exit__(*exc)

    def update(self, progress: TaskProgress, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < 0.2:
            return
        self._last = now
        best = "" if progress.best_value is None else f"best {progress.best_value:.5g} (trial {progress.best_number})"
        if progress.failed:
            best += f" [red]{progress.failed} failed[/]"
        self._bar.update(self._id, completed=progress.done + progress.failed, best=best)


def leaderboard(summary: Summary, rows: int = 10) -> Table:
    best = summary.best
    names = list(best["params"]) if best else []
    table = Table(title=f"{summary.name}: top {rows} of {len(summary.rows)} ({summary.scoring})")
    for column in ("rank", "trial", "mean", "std", *names, "verified"):
        table.add_column(column, justify="right" if column not in names else "left")
    for r in sorted(summary.complete, key=lambda r: r["rank_test_score"])[:rows]:
        table.add_row(
            str(r["rank_test_score"]), str(r["number"]), f"{r['mean_test_score']:.5g}", f"{r['std_test_score']:.2g}",
            *[_short(r["params"].get(n, "")) for n in names], r["verified"],
        )
    return table


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
