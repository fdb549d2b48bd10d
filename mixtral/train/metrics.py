"""Training metrics: OUT/metrics.jsonl (one JSON record a line) and OUT/curves.png drawn from it."""
from __future__ import annotations

import json
from pathlib import Path

from mixtral.io.files import atomic_path, write_text


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl, skipping a last line cut short by a kill."""
    records = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def truncate_metrics(path: Path, step: int) -> None:
    """Keep only the records up to `step` (what a resumed run continues from), atomically."""
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def plot_curves(metrics_path: Path, png_path: Path) -> None:
    """Train loss (cross-entropy) and validation loss per domain against the step, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [r for r in records if r.get("kind") == "train"]
    val = [r for r in records if r.get("kind") == "val"]
    fig, (ax_loss, ax_aux) = plt.subplots(1, 2, figsize=(12, 4.5))
    if train:
        ax_loss.plot([r["step"] for r in train], [r["ce"] for r in train], label="train", lw=1, alpha=0.8)
    for domain in sorted({d for r in val for d in r["domains"]}):
        points = [(r["step"], r["domains"][domain]["loss"]) for r in val if domain in r["domains"]]
        ax_loss.plot(*zip(*points), marker="o", ms=3, label=f"val {domain}", lw=2 if domain == "all" else 1)
    ax_loss.set(xlabel="step", ylabel="cross-entropy (nats)", title="loss")
    ax_loss.legend(fontsize=8)
    ax_loss.grid(alpha=0.3)
    for key, label in (("lb", "load balancing"), ("z", "router z-loss")):
        points = [(r["step"], r[key]) for r in train if r.get(key) is not None]
        if points:
            ax_aux.plot(*zip(*points), label=label, lw=1)
    ax_aux.set(xlabel="step", title="router auxiliary losses")
    if ax_aux.lines:
        ax_aux.legend(fontsize=8)
    ax_aux.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def append_metrics(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
