"""Terminal output with rich: live progress, failures as they happen, the final leaderboard."""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from mltask.errors import one_line
from mltask.results import Summary
from mltask.task import Progress as TaskProgress

PLAIN_EVERY_SECONDS = 5.0
_LIVE_ERRORS = 5  # distinct failure reasons printed while running; the summary counts them all
_ERRORS_SUMMED_UP = 3


@contextmanager
def phase(console: Console, text: str) -> Iterator[None]:
    """A spinner saying what happens before the first trial (seconds each on a loaded machine).

    Transient and only on a terminal: where stderr is a log or a pipe, a mistake found while
    resolving must still end as its one line.
    """
    if console.is_terminal and not console.quiet:
        with console.status(text):
            yield
    else:
        yield


class Estimate:
    """How far a search is between results, and when it should end.

    Results come a subtask at a time (five trials at once, say), so a bar that moved only
    on results would stand still for a subtask's whole run, and an ETA computed from those
    steps (rich's) would freeze. Here, between results, the bar advances at the rate
    measured so far in this run (trials settled per second since work first went out),
    but never by as much as the trials now running: it cannot show a trial done that is
    not, and it does not jump back when results arrive. The ETA is the time this run took for what the bar shows,
    scaled to what is left: it counts down smoothly while results come as fast as before,
    and grows again when they are late (the bar waits at its cap while the clock runs).
    """

    def __init__(self, total: int) -> None:
        self.total = total
        self._base: int | None = None  # settled before this run (a resume)
        self._start: float | None = None  # when work first went out
        self._settled = -1
        self._settled_at = 0.0
        self._shown = 0.0

    def update(self, settled: int, running: int, now: float) -> tuple[float, float | None]:
        """Trials to show as done (fractional) and the seconds left (``None``: no rate yet)."""
        if self._base is None:
            self._base = settled
        if self._start is None and (running or settled > self._base):
            self._start = now
        if settled != self._settled:
            self._settled, self._settled_at = settled, now
        rate = None
        if self._start is not None and settled > self._base and self._settled_at > self._start:
            rate = (settled - self._base) / (self._settled_at - self._start)
        ahead = 0.0 if rate is None else rate * (now - self._settled_at)
        self._shown = min(max(self._shown, settled + ahead), settled + 0.95 * running, self.total)
        self._shown = max(self._shown, settled)
        if self._shown >= self.total:
            return self._shown, 0.0
        if rate is None or self._start is None:
            return self._shown, None
        return self._shown, (now - self._start) * (self.total - self._shown) / (self._shown - self._base)


class SearchProgress:
    """``digits ━━━━━━━ 12/50 · 4 running · best 0.9812 (trial 7) 0:00:12 eta 0:00:30``.

    On a terminal a rich bar; elsewhere (a log file, a pipe, CI) a plain line every
    :data:`PLAIN_EVERY_SECONDS`, since a bar that is drawn only at the end says nothing
    while it runs. Each distinct reason a trial failed is printed once, when it first happens
    (``errors`` gives each failed trial's number and error).
    """

    def __init__(self, console: Console, total: int, label: str, enabled: bool = True,
                 errors: Callable[[], list[tuple[int, str]]] = list) -> None:
        self._console = console
        self._label = label
        self._enabled = enabled
        self._live = enabled and (console.is_terminal or console.is_jupyter)
        self._bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TextColumn("eta {task.fields[eta]}"),
            console=console,
            disable=not self._live,
            transient=False,
        )
        self._id = self._bar.add_task(label, total=total, status="", eta="-:--:--")
        self._estimate = Estimate(total)
        self._errors = errors
        self._seen_failed = 0
        self._shown_errors: set[str] = set()
        self._started = time.monotonic()
        self._last = 0.0
        self._last_plain = 0.0

    def __enter__(self) -> SearchProgress:
        self._bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.__exit__(*exc)

    def update(self, progress: TaskProgress, force: bool = False) -> None:
        now = time.monotonic()
        if not self._enabled or (not force and now - self._last < 0.2):
            return
        self._last = now
        if progress.failed > self._seen_failed:
            self._report_failures()
        self._seen_failed = progress.failed
        settled = progress.done + progress.failed
        shown, eta = self._estimate.update(settled, progress.running, now)
        eta_text = "-:--:--" if eta is None else _clock(eta)
        parts = [f"{settled}/{progress.total}"]
        if progress.running:
            parts.append(f"{progress.running} running")
        if progress.best_value is not None:
            parts.append(f"best {progress.best_value:.5g} (trial {progress.best_number})")
        if progress.resource_budget:
            # Multi-fidelity: what the rungs so far cost, against every configuration at every rung
            # (a bound, not a forecast: how many climb depends on the scores).
            pruned = f"{progress.pruned} pruned, " if progress.pruned else ""
            parts.append(f"{pruned}resource {progress.resource_used:.4g} of at most {progress.resource_budget:.4g}")
        failed = [f"{progress.failed} failed"] if progress.failed else []
        if self._live:
            status = " · ".join(parts + [f"[red]{f}[/]" for f in failed])
            self._bar.update(self._id, completed=shown, total=progress.total, status=status, eta=eta_text)
        elif force or now - self._last_plain >= PLAIN_EVERY_SECONDS:
            self._last_plain = now
            self._say(f"{self._label}: {', '.join(parts + failed)}; {_clock(now - self._started)} elapsed, "
                      f"eta {eta_text}")

    def _report_failures(self) -> None:
        if len(self._shown_errors) > _LIVE_ERRORS:
            return  # enough said; the summary at the end counts every error
        for number, error in self._errors():
            text = one_line(error)
            if text in self._shown_errors:
                continue
            self._shown_errors.add(text)
            if len(self._shown_errors) > _LIVE_ERRORS:
                self._say("more trials failed for other reasons; the summary at the end counts every error")
                return
            self._say(f"trial {number} failed: {text}")

    def _say(self, line: str) -> None:
        self._bar.console.print(line, highlight=False, soft_wrap=True, markup=False)


def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=max(0, round(seconds))))


def failure_lines(summary: Summary) -> list[str]:
    """``3 of 20 trials failed:`` and the most common errors with their counts, one line each."""
    errors = summary.errors()
    if not errors:
        return []
    failed = sum(count for _, count in errors)
    lines = [f"{failed} of {len(summary.rows)} trials failed:"]
    lines += [f"  {count}× {one_line(error)}" for error, count in errors[:_ERRORS_SUMMED_UP]]
    if len(errors) > _ERRORS_SUMMED_UP:
        lines.append(f"  ... and {len(errors) - _ERRORS_SUMMED_UP} other errors (each trial's error is in results.csv)")
    return lines


def leaderboard(summary: Summary, rows: int = 10) -> Table:
    """The best complete trials; a parameter a trial did not use (``when``) is blank.

    Scores are never cut short: on a narrow terminal the parameter columns give way (their
    long values end in an ellipsis; the report and results.csv have them in full).
    """
    ranked = sorted(summary.complete, key=lambda r: r["rank_test_score"])[:rows]
    names = summary.param_names
    cells = [[str(r["rank_test_score"]), str(r["number"]), f"{r['mean_test_score']:.6g}", f"{r['std_test_score']:.2g}",
              *[_short(r["params"].get(n, "")) for n in names], r["verified"]] for r in ranked]
    table = Table(title=f"{summary.name}: top {len(ranked)} of {len(summary.complete)} complete trials "
                        f"({summary.scoring})")
    for i, column in enumerate(("rank", "trial", "mean", "std")):
        width = max([len(column), *(len(row[i]) for row in cells)])
        table.add_column(column, justify="right", no_wrap=True, min_width=width)
    for name in names:
        table.add_column(name, overflow="ellipsis", min_width=min(len(name), 4))
    table.add_column("verified", no_wrap=True, min_width=len("verified"))
    for row in cells:
        table.add_row(*row)
    return table


def _short(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
