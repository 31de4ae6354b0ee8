"""Stage plot: PNG figures in plots/ from the training curves and the test evaluation."""
from .figures import confusion_counts, plot_confusion, plot_curves, plot_per_class, read_curve
from .params import load_params
from .workspace import CONFUSION_FILE, CURVES_DIR, PER_CLASS_FILE, PLOTS_DIR, read_json, run


def main():
    load_params()  # checked like every stage's, though plot reads no key
    curve = {name: read_curve(CURVES_DIR / f"{name}.tsv") for name in ["train/loss", "val/loss", "train/acc",
                                                                       "val/acc", "lr"]}
    plot_curves({"train": curve["train/loss"], "validation": curve["val/loss"]}, "cross-entropy loss",
                PLOTS_DIR / "loss.png")
    plot_curves({"train": curve["train/acc"], "validation": curve["val/acc"]}, "accuracy",
                PLOTS_DIR / "accuracy.png")
    plot_curves({"learning rate": curve["lr"]}, "learning rate (end of epoch)", PLOTS_DIR / "lr.png")
    per_class = {row["class"]: row["accuracy"] for row in read_json(PER_CLASS_FILE, "evaluate")}
    classes = list(per_class)
    plot_confusion(confusion_counts(read_json(CONFUSION_FILE, "evaluate"), classes), classes,
                   PLOTS_DIR / "confusion.png")
    plot_per_class(per_class, PLOTS_DIR / "per_class_accuracy.png")
    print(f"wrote 5 figures to {PLOTS_DIR}/")


if __name__ == "__main__":
    run(main)
