"""Loss-curve PNG from metrics.jsonl (matplotlib, headless Agg backend)."""

from __future__ import annotations

import json
from pathlib import Path

from tailor.files import atomic_output


def plot_losses(metrics_path: Path, png_path: Path) -> Path | None:
    """Training loss per step (and validation loss where evaluated) -> PNG; None when no metrics."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    if not records:
        return None
    figure, axes = plt.subplots(figsize=(7, 4), dpi=100)
    axes.plot([r["step"] for r in records], [r["loss"] for r in records], label="train loss", linewidth=1)
    evaluated = [r for r in records if r.get("val_loss") is not None]
    if evaluated:
        steps, losses = [r["step"] for r in evaluated], [r["val_loss"] for r in evaluated]
        axes.plot(steps, losses, "o-", label="validation loss")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("cross-entropy per supervised token")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    try:
        with atomic_output(png_path) as tmp:
            figure.savefig(tmp, format="png")  # the temporary's name has no .png to infer the format from
    finally:
        plt.close(figure)
    return Path(png_path)
