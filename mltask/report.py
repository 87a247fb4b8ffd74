"""The human-readable report: ``report.md`` with a convergence plot and the leaderboard."""

from __future__ import annotations

from pathlib import Path

from mltask.results import Summary

REPORT_FILE = "report.md"
PLOT_FILE = "convergence.png"
_LEADERBOARD_ROWS = 15


def plot_convergence(summary: Summary, path: Path) -> None:
    """Each trial's score in finishing order, and the best so far: did the search settle?"""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(summary.complete, key=lambda r: (r["finished_at"] or 0, r["number"]))
    scores = [r["mean_test_score"] for r in rows]
    pick = max if summary.direction == "maximize" else min
    best = [pick(scores[: i + 1]) for i in range(len(scores))]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.scatter(range(1, len(scores) + 1), scores, s=14, alpha=0.6, label="trial")
    ax.step(range(1, len(best) + 1), best, where="post", color="C3", label="best so far")
    ax.set_xlabel("trials finished")
    ax.set_ylabel(summary.scoring)
    ax.set_title(f"{summary.name}: {summary.algorithm} search")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right" if summary.direction == "maximize" else "upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def verification_lines(v: dict) -> list[str]:
    """The verification figures, with a loud warning when the best-check was turned off."""
    lines = [
        f"- verification: {v['verified_full']} trials re-run in full, {v['verified_spot']} spot-checked by the "
        f"requestor, {v['verified_cross']} cross-checked by another provider, {v['unverified']} unchecked; "
        f"{v['rejected_trials']} trials rejected in {v['rejected_subtasks']} subtasks; verification overhead "
        f"{100 * v['overhead']:.1f}% of useful compute (budget {100 * v['budget']:.0f}%)",
    ]
    if v["banned_providers"]:
        lines.append("- banned providers: " + "; ".join(f"{p} ({r})" for p, r in v["banned_providers"].items()))
    if not v["best_check"]:
        lines.append("- **WARNING: the best configuration was NOT verified (verification.verify_best is false); "
                     "a provider could have faked it.**")
    return lines


def write_report(output_dir: Path, summary: Summary, notes: list[str]) -> Path:
    """Markdown: what ran, the best configuration, the plot, the top of the leaderboard."""
    counts = summary.counts()
    lines = [
        f"# {summary.name}",
        "",
        f"- task id: `{summary.task_id}`; status: **{summary.status}**",
        f"- algorithm: {summary.algorithm}; scoring: {summary.scoring} ({summary.direction})",
        f"- trials: {counts['complete']} complete, {counts['failed']} failed, of {counts['planned']} planned",
        *[f"- {note}" for note in notes],
        *verification_lines(summary.verification),
        "",
    ]
    best = summary.best
    if best is not None:
        lines += [
            "## Best configuration",
            "",
            f"Trial {best['number']}: **{best['mean_test_score']:.6g}** ± {best['std_test_score']:.3g}",
            "",
            "| parameter | value |",
            "|---|---|",
            *[f"| {k} | {v!r} |" for k, v in best["params"].items()],
            "",
        ]
        plot_convergence(summary, output_dir / PLOT_FILE)
        lines += ["## Convergence", "", f"![convergence]({PLOT_FILE})", ""]
    names = list(best["params"]) if best else []
    ranked = sorted(summary.rows, key=lambda r: r["rank_test_score"])[:_LEADERBOARD_ROWS]
    lines += [
        "## Leaderboard",
        "",
        "| rank | trial | mean | std | " + " | ".join(names) + " | provider | verified |",
        "|---" * (6 + len(names)) + "|",
    ]
    for r in ranked:
        mean = f"{r['mean_test_score']:.6g}" if r["mean_test_score"] is not None else r["state"]
        std = f"{r['std_test_score']:.3g}" if r["std_test_score"] is not None else ""
        values = " | ".join(repr(r["params"].get(n, "")) for n in names)
        lines.append(f"| {r['rank_test_score']} | {r['number']} | {mean} | {std} | {values} | {r['provider']} "
                     f"| {r['verified']} |")
    path = output_dir / REPORT_FILE
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
