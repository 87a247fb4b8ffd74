"""The human-readable report: ``report.md`` with a convergence plot and the leaderboard."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

from mltask.errors import one_line
from mltask.results import Summary, format_value

REPORT_FILE = "report.md"
PLOT_FILE = "convergence.png"
RUNGS_PLOT_FILE = "rungs.png"
_LEADERBOARD_ROWS = 15
_ERRORS_LISTED = 10


def plot_convergence(summary: Summary, path: Path) -> None:
    """Each trial's score in finishing order, and the best so far: did the search settle?

    Failed trials have no score; they keep their place in the finishing order and are
    marked with a cross on the x axis, so a run of failures shows where it happened.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settled = sorted((r for r in summary.rows if r["state"] in ("complete", "failed")),
                     key=lambda r: (r["finished_at"] or 0, r["number"]))
    done = [(x, r["mean_test_score"]) for x, r in enumerate(settled, 1) if r["state"] == "complete"]
    failed = [x for x, r in enumerate(settled, 1) if r["state"] == "failed"]
    xs, scores = [x for x, _ in done], [s for _, s in done]
    pick = max if summary.direction == "maximize" else min
    best = [pick(scores[: i + 1]) for i in range(len(scores))]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.scatter(xs, scores, s=14, alpha=0.6, label="trial")
    ax.step(xs, best, where="post", color="C3", label="best so far")
    if failed:
        ax.plot(failed, [0.03] * len(failed), "x", color="C7", transform=ax.get_xaxis_transform(),
                label=f"failed, no score ({len(failed)})")
    ax.set_xlabel("trials finished" + (" (failed ones included)" if failed else ""))
    ax.set_ylabel(f"{summary.scoring} ({summary.direction})")
    ax.set_title(f"{summary.name}: {summary.algorithm} search")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right" if summary.direction == "maximize" else "upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def has_rungs(summary: Summary) -> bool:
    """Whether the search was multi-fidelity: its trials carry their rung evaluations."""
    return any(r.get("rungs") for r in summary.rows)


def plot_rungs(summary: Summary, path: Path) -> None:
    """Each trial's score at each resource it was evaluated at: was stopping the others early right?

    One line per trial through its rung evaluations (log resource axis, as rungs grow by the
    reduction factor); trials promoted past their first rung are drawn in colour, the ones
    stopped at it as grey dots, and the reported best is starred at the resource it was
    measured at.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    best = summary.best
    stopped = promoted = 0
    for row in summary.rows:
        points = sorted((r["resource"], r["mean_score"]) for r in row.get("rungs") or []
                        if r["mean_score"] is not None)
        if not points:
            continue
        xs, ys = zip(*points, strict=True)
        if len(points) == 1:
            ax.plot(xs, ys, "o", ms=3, color="C7", alpha=0.5, label=None if stopped else "stopped at its first rung")
            stopped += 1
        else:
            ax.plot(xs, ys, "-o", ms=3, lw=1, color="C0", alpha=0.7, label=None if promoted else "promoted")
            promoted += 1
        if row is best:
            ax.plot(xs[-1:], ys[-1:], "*", ms=14, color="C3", label=f"best (trial {row['number']})")
    ax.set_xscale("log")
    ax.set_xlabel("resource")
    ax.set_ylabel(f"{summary.scoring} ({summary.direction})")
    ax.set_title(f"{summary.name}: score against resource, {promoted} of {promoted + stopped} trials promoted")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower right" if summary.direction == "maximize" else "upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def verification_lines(summary: Summary) -> list[str]:
    """The verification figures, with a loud warning when the best was not re-run in full."""
    v = summary.verification
    lines = [
        f"- verification: {v['verified_full']} trials re-run in full, {v['verified_spot']} spot-checked by the "
        f"requestor, {v['verified_cross']} cross-checked by another provider, {v['unverified']} unchecked; "
        f"{v['rejected_trials']} trials rejected in {v['rejected_subtasks']} subtasks; verification overhead "
        f"{100 * v['overhead']:.1f}% of useful compute (budget {100 * v['budget']:.0f}%)",
    ]
    if v["banned_providers"]:
        lines.append("- banned providers: " + "; ".join(f"{p} ({r})" for p, r in v["banned_providers"].items()))
    lines += [f"- **WARNING: {warning}**" for warning in summary.warnings()]
    return lines


def duration(seconds: float) -> str:
    """``12.3 s`` or ``0:04:05``."""
    return f"{seconds:.1f} s" if seconds < 100 else str(datetime.timedelta(seconds=round(seconds)))


def write_report(output_dir: Path, summary: Summary, notes: list[str], timing: dict[str, Any] | None = None) -> Path:
    """Markdown: what ran on what, how it went, the best configuration, the plot, the leaderboard."""
    counts = summary.counts()
    lines = [
        f"# {summary.name}",
        "",
        f"- task id: `{summary.task_id}`; status: **{summary.status}**",
    ]
    if not summary.complete and counts["failed"]:
        lines.append(f"- **all {counts['failed']} trials that ran failed**; no configuration has a score "
                     "(the errors are below)")
    lines += [
        f"- estimator: `{summary.estimator}`",
        f"- dataset: {summary.dataset}; cross-validation: {summary.cv}",
        f"- algorithm: {summary.algorithm}; scoring: {summary.scoring} ({summary.direction})",
        f"- trials: {counts['complete']} complete, "
        + (f"{counts['pruned']} pruned (stopped before {summary.max_resource}), " if "pruned" in counts else "")
        + f"{counts['failed']} failed, of {counts['planned']} planned",
    ]
    if timing and "search_seconds" in timing:
        search, refit, runs = timing["search_seconds"], timing.get("refit_seconds", 0.0), timing.get("runs", 1)
        over = f" over {runs} runs" if runs > 1 else ""
        lines.append(f"- wall time: {duration(search + refit)} (search {duration(search)}{over}, "
                     f"refit {duration(refit)})")
    lines += [*[f"- {note}" for note in notes], *verification_lines(summary), ""]
    best = summary.best
    if best is not None:
        lines += [
            "## Best configuration",
            "",
            f"Trial {best['number']}: **{best['mean_test_score']:.6g}** ± {best['std_test_score']:.3g}",
            "",
            "| parameter | value |",
            "|---|---|",
            *[f"| {k} | {_cell(v)} |" for k, v in best["params"].items()],
            "",
        ]
        plot_convergence(summary, output_dir / PLOT_FILE)
        failed = f" Crosses on the x axis mark the {counts['failed']} failed trials." if counts["failed"] else ""
        lines += ["## Convergence", "", f"![convergence]({PLOT_FILE}){failed}", ""]
        if has_rungs(summary):
            plot_rungs(summary, output_dir / RUNGS_PLOT_FILE)
            lines += ["## Score against resource", "",
                      f"![score against resource]({RUNGS_PLOT_FILE}) One line per trial through its rung "
                      "evaluations; grey dots were stopped at their first rung; the star is the reported best.", ""]
    lines += ["## Leaderboard", "", *_leaderboard(summary), ""]
    lines += _failures(summary)
    path = output_dir / REPORT_FILE
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _leaderboard(summary: Summary) -> list[str]:
    """The best complete trials; a parameter a trial did not use (``when``) is blank."""
    ranked = sorted(summary.complete, key=lambda r: r["rank_test_score"])[:_LEADERBOARD_ROWS]
    if not ranked:
        return ["No trial completed."]
    names = summary.param_names
    header = ["rank", "trial", "mean", "std", *names, "provider", "verified"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in ranked:
        cells = [r["rank_test_score"], r["number"], f"{r['mean_test_score']:.6g}", f"{r['std_test_score']:.3g}",
                 *[r["params"].get(n, "") for n in names], r["provider"], r["verified"]]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return lines


def _failures(summary: Summary) -> list[str]:
    errors = summary.errors()
    if not errors:
        return []
    lines = ["## Failed trials", "", "| trials | error |", "|---|---|"]
    lines += [f"| {count} | {_cell(one_line(error, 1000))} |" for error, count in errors[:_ERRORS_LISTED]]
    if len(errors) > _ERRORS_LISTED:
        lines.append(f"| {sum(c for _, c in errors[_ERRORS_LISTED:])} | {len(errors) - _ERRORS_LISTED} other errors "
                     "(see `results.csv`) |")
    return [*lines, ""]


def _cell(value: Any) -> str:
    """A Markdown table cell: a ``|`` or a line break in provider text must not break the table."""
    return format_value(value).replace("|", "\\|").replace("\n", " ")
