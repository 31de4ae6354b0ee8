"""Matplotlib figures: of a training run (curves per epoch, confusion matrix, per-class accuracy) and of a
comparison of experiments (accuracy against size, the ablation ladder)."""
import csv
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker as ticker  # noqa: E402
import numpy as np  # noqa: E402

from .workspace import (  # noqa: E402
    CONFUSION_FILE,
    CURVES_DIR,
    PER_CLASS_FILE,
    PLOTS_DIR,
    UserError,
    atomic_path,
    read_json,
)


def read_curve(path):
    """A DVCLive metric history (TSV with 'step' and the metric's own column) -> (steps, values)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"{path}: missing; run the train stage first (dvc repro train)")
    return parse_curve(text, path.stem)


def parse_curve(text, column):
    """The text of a DVCLive TSV -> (steps, values of `column`)."""
    rows = list(csv.DictReader(io.StringIO(text), delimiter="\t"))
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


def run_figures(curves_dir=CURVES_DIR, per_class_file=PER_CLASS_FILE, confusion_file=CONFUSION_FILE):
    """The plot stage's figures: {file name: (the function that draws it, what it is given to draw)}. The
    per-epoch scores are the test set's, or the held-out validation images' where the run had them."""
    split = "validation" if (Path(curves_dir) / "validation" / "acc.tsv").is_file() else "test"
    curve = {name: read_curve(Path(curves_dir) / f"{name}.tsv")
             for name in ["train/loss", f"{split}/loss", "train/acc", f"{split}/acc", "lr"]}
    per_class = {row["class"]: row["accuracy"] for row in read_json(per_class_file, "evaluate")}
    classes = list(per_class)
    return {
        "loss.png": (plot_curves, {"train": curve["train/loss"], split: curve[f"{split}/loss"]}, "cross-entropy loss"),
        "accuracy.png": (plot_curves, {"train": curve["train/acc"], split: curve[f"{split}/acc"]}, "accuracy"),
        "lr.png": (plot_curves, {"learning rate": curve["lr"]}, "learning rate (end of epoch)"),
        "confusion.png": (plot_confusion, confusion_counts(read_json(confusion_file, "evaluate"), classes), classes),
        "per_class_accuracy.png": (plot_per_class, per_class),
    }


def draw_all(plots_dir=PLOTS_DIR):
    """Draw the plot stage's figures into plots_dir; returns their paths."""
    written = []
    for name, (draw, *inputs) in run_figures().items():
        draw(*inputs, Path(plots_dir) / name)
        written.append(Path(plots_dir) / name)
    return written


def _count(x, _position=None):
    """Tick label of a parameter count: 50k, 1M, 2.5M."""
    return f"{x / 1e6:g}M" if x >= 1e6 else f"{x / 1e3:g}k" if x >= 1e3 else f"{x:g}"


def plot_accuracy_vs_params(points, path):
    """Test accuracy against parameter count (log scale), one labelled point per variant, its standard
    deviation over seeds as an error bar. `points`: dicts with name, params, accuracy (the mean), accuracy_std
    (None for a single run), blocks, widths, weight_decay."""
    fig, ax = plt.subplots(figsize=(8, 5.5))
    decays = sorted({p["weight_decay"] for p in points})
    colours = {wd: plt.cm.viridis(i / max(1, len(decays) - 1)) for i, wd in enumerate(decays)}
    for wd in decays:
        group = [p for p in points if p["weight_decay"] == wd]
        ax.errorbar([p["params"] for p in group], [p["accuracy"] for p in group],
                    yerr=[p.get("accuracy_std") or 0 for p in group], fmt="o", color=colours[wd], capsize=3,
                    label=f"weight decay {wd:g}", zorder=3)
    for p in points:
        shape = f"{''.join(map(str, p['blocks']))} × {p['widths'][0]}..{p['widths'][-1]}"
        ax.annotate(f"{p['name']} ({shape})", (p["params"], p["accuracy"]), xytext=(6, 4),
                    textcoords="offset points", fontsize=8)
    ax.set_xscale("log")
    sizes = [p["params"] for p in points]
    ax.set_xlim(min(sizes) / 2, max(sizes) * 2)  # at least two decades' ticks, room for the labels
    ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1, 2, 5)))
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(_count))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_xlabel("parameters (log scale)")
    ax.set_ylabel("test accuracy")
    ax.set_title("test accuracy against model size, mean ± std over seeds (labels: blocks per layer × widths)",
                 fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
    ax.margins(y=0.1)
    _save(fig, path)


def plot_ablation(rungs, path):
    """The ablation ladder: each rung's accuracy (bars: the mean over seeds, error bars: the standard
    deviation) in the metric the rungs are chosen by, and above each bar what the rung gained over the one
    before (points; red where it lost, grey where the gain is within noise). `rungs`: dicts with rung, index,
    chosen_by (the key of the Summary to draw), gain (a noise.Difference; None for the first), gain_over."""
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(rungs)), 4.5))
    summaries = [r[r["chosen_by"]] for r in rungs]
    accuracy = [100 * s.mean for s in summaries]
    bars = ax.bar([r["rung"] for r in rungs], accuracy, yerr=[100 * (s.std or 0) for s in summaries], capsize=3,
                  color="tab:blue")
    for bar, r, value, summary in zip(bars, rungs, accuracy, summaries):
        gain = r["gain"]
        label = "" if gain is None else f"{100 * gain.delta:+.2f}" + (
            "" if r["gain_over"] == r["index"] - 1 else f" vs {r['gain_over']}")
        colour = "black" if gain is None else "grey" if gain.within_noise else \
            "tab:red" if gain.delta < 0 else "black"
        top = bar.get_height() + 100 * (summary.std or 0)  # above the error bar
        ax.annotate(f"{value:.2f}\n{label}", (bar.get_x() + bar.get_width() / 2, top),
                    xytext=(0, 3), textcoords="offset points", ha="center", va="bottom", fontsize=8, color=colour)
    low, high = min(accuracy), max(a + 100 * (s.std or 0) for a, s in zip(accuracy, summaries))
    ax.set_ylim(max(0, low - 2 * max(1, high - low)), min(100, high + 0.6 * max(1, high - low)) + 0.5)
    metric = "validation" if rungs[0]["chosen_by"] == "validation_accuracy" else "test"
    ax.set_ylabel(f"{metric} accuracy (%), mean ± std over seeds")
    ax.set_title("ablation: each rung adds one trick to the one before (above each bar: its accuracy, and its "
                 "gain in points; grey: within noise)", fontsize=9)
    ax.tick_params(axis="x", rotation=30)
    for tick in ax.get_xticklabels():
        tick.set_ha("right")
    ax.grid(alpha=0.3, axis="y")
    _save(fig, path)
