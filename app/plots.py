"""loss.png: train and eval loss against the optimizer step, from metrics.jsonl (matplotlib, no display)."""

from __future__ import annotations

import io
import json
import logging

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
