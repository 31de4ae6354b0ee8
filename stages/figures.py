"""Matplotlib figures of a training run: curves per epoch, confusion matrix, per-class accuracy."""
import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .workspace import UserError, atomic_path  # noqa: E402


def read_curve(path):
    """A DVCLive metric history (TSV with 'step' and the metric's own column) -> (steps, values)."""
    path = Path(path)
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
    except FileNotFoundError:
        raise UserError(f"{path}: missing; run the train stage first (dvc repro train)")
    column = path.stem
    return [int(r["step"]) for r in rows], [float(r[column]) for r in rows]


def _save(fig, path):
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_curves(curves, ylabel, path):
    """One line per {label: (epochs, values)} against epoch."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (steps, values) in curves.items():
        ax.plot(steps, values, marker="o" if len(steps) < 20 else None, label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend()
    _save(fig, path)


def confusion_counts(records, classes):
    """Counts [actual, predicted] from {actual, predicted} records."""
    index = {name: i for i, name in enumerate(classes)}
    counts = np.zeros((len(classes), len(classes)), dtype=int)
    for r in records:
        counts[index[r["actual"]], index[r["predicted"]]] += 1
    return counts


def plot_confusion(counts, classes, path):
    fig, ax = plt.subplots(figsize=(7, 6))
    image = ax.imshow(counts, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    threshold = counts.max() / 2
    for (i, j), n in np.ndenumerate(counts):
        ax.text(j, i, str(n), ha="center", va="center", fontsize=8, color="white" if n > threshold else "black")
    fig.colorbar(image, ax=ax, label="test images")
    _save(fig, path)


def plot_per_class(accuracy, path):
    """Bar chart of {class: accuracy}."""
    fig, ax = plt.subplots(figsize=(7, 4))
    bars = ax.bar(list(accuracy), list(accuracy.values()), color="tab:blue")
    ax.bar_label(bars, fmt="%.3f", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("test accuracy")
    ax.tick_params(axis="x", rotation=45)
    _save(fig, path)
