"""loss.png: train and eval loss against the optimizer step, from metrics.jsonl (matplotlib, no display); sweep.png:
the same for every line of a sweep, in one picture."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

from app.jobdir import JobDir
from app.safeio import write_atomic

log = logging.getLogger(__name__)


def read_metrics(job: JobDir) -> list[dict]:
    if not job.metrics.exists():
        return []
    records = []
    for line in job.metrics.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def write_loss_plot(job: JobDir) -> bool:
    """Write loss.png (atomically); False when there is nothing to plot yet (or not rank 0)."""
    from app.launch import is_main

    if not is_main():
        return False
    records = read_metrics(job)
    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in records if r.get("eval_loss") is not None]
    logps = {}
    for record in records:
        for key, value in record.items():
            if key.startswith("logp/") and value is not None:
                logps.setdefault(key, []).append((record["step"], value))
    if not train and not evals:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", color="tab:blue", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss (test_file)", color="tab:orange", linewidth=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean NLL per trained token, nats)")
    ax.set_title(job.root.name, fontsize=9)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if logps:  # mean log-probabilities (negative) on their own axis
        right = ax.twinx()
        for key, points in sorted(logps.items()):
            right.plot(*zip(*points, strict=True), "s--", label=key, linewidth=1)
        right.set_ylabel("mean log p of assistant tokens")
        more = right.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    ax.legend(handles, labels, fontsize=8)
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png")
    plt.close(fig)
    write_atomic(job.plot, image.getvalue())  # never through a link (app/safeio.py)
    return True


def write_sweep_plot(output_dir: Path, lines: list[tuple[str, str | None]], path: Path, title: str = "") -> bool:
    """sweep.png (atomically): every line's training loss (a line) and eval loss (dots on a dashed line) against
    the optimizer step, one colour per line, labelled by `lines`' labels (what differs between the lines). False
    when no line has logged a loss yet."""
    curves = []
    for text, job_id in lines:
        records = read_metrics(JobDir(Path(output_dir) / job_id)) if job_id else []
        train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
        evals = [(r["step"], r["eval_loss"]) for r in records if r.get("eval_loss") is not None]
        if train or evals:
            curves.append((text, train, evals))
    if not curves:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    colours = plt.get_cmap("tab10" if len(curves) <= 10 else "tab20")
    columns = 2 if len(curves) > 8 and max(len(text) for text, _, _ in curves) <= 75 else 1  # 75 chars: half the width
    rows = -(-len(curves) // columns)
    fig, ax = plt.subplots(figsize=(11, 4.5 + 0.19 * rows), dpi=110)
    for number, (text, train, evals) in enumerate(curves):
        colour = colours(number % colours.N)
        if train:
            ax.plot(*zip(*train, strict=True), color=colour, linewidth=1.1, label=text)
        if evals:
            ax.plot(*zip(*evals, strict=True), "o--", color=colour, linewidth=0.8, markersize=3.5,
                    label=None if train else text)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean NLL per trained token, nats)")
    ax.set_title((title + ": " if title else "") + "training loss (lines), eval loss on test_file (dots)", fontsize=9)
    ax.grid(alpha=0.3)
    fig.legend(*ax.get_legend_handles_labels(), loc="lower center", ncol=columns, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.19 * rows / (4.5 + 0.19 * rows) + 0.01, 1, 1))
    image = io.BytesIO()
    fig.savefig(image, format="png")
    plt.close(fig)
    write_atomic(path, image.getvalue(), parent_may_be_link=True)  # FT_OUTPUT_DIR/sweep.png, never through a link
    return True
