"""The plot stage's figures, by what each is given to draw (cifar.figures.run_figures) from known curves
and evaluation records, and the confusion counts; test_pipeline checks that the stage writes them as PNGs."""
import json

import numpy as np
import pytest

from cifar import figures
from cifar.figures import _count, confusion_counts, plot_confusion, plot_curves, plot_per_class, run_figures

CLASSES = ["cat", "dog", "ship"]
CURVES = {"train/loss": [2.0, 1.5], "train/acc": [0.3, 0.5], "lr": [0.01, 0.001]}


def write_run(folder, split):
    """DVCLive's per-epoch TSVs (2 epochs) with the scores of `split`, and evaluate's per-class and confusion
    files; returns run_figures' arguments."""
    curves = {**CURVES, f"{split}/loss": [1.8, 1.2], f"{split}/acc": [0.4, 0.6]}
    for name, values in curves.items():
        path = folder / "curves" / f"{name}.tsv"
        path.parent.mkdir(parents=True, exist_ok=True)
        column = name.split("/")[-1]
        path.write_text(f"timestamp\tstep\t{column}\n" + "".join(f"0\t{i}\t{v}\n" for i, v in enumerate(values, 1)))
    (folder / "per_class.json").write_text(json.dumps([{"class": c, "accuracy": a}
                                                       for c, a in zip(CLASSES, [0.5, 1.0, 0.25])]))
    records = [("cat", "cat"), ("cat", "dog"), ("dog", "dog"), ("ship", "cat"), ("ship", "cat"), ("ship", "ship")]
    (folder / "confusion.json").write_text(json.dumps([{"actual": a, "predicted": p} for a, p in records]))
    return folder / "curves", folder / "per_class.json", folder / "confusion.json"


def test_confusion_counts_are_actual_by_predicted():
    records = [{"actual": a, "predicted": p} for a, p in
               [("cat", "cat"), ("cat", "dog"), ("dog", "dog"), ("ship", "cat"), ("ship", "cat")]]
    assert confusion_counts(records, CLASSES).tolist() == [[1, 1, 0], [0, 1, 0], [2, 0, 0]]
    assert confusion_counts([], CLASSES).tolist() == [[0] * 3] * 3
    assert confusion_counts(records, CLASSES).dtype.kind == "i"  # counts: the figure prints them as integers


@pytest.mark.parametrize("split", ["test", "validation"])
def test_each_figure_is_given_its_curves_counts_and_accuracies(tmp_path, split):
    found = run_figures(*write_run(tmp_path, split))
    assert list(found) == ["loss.png", "accuracy.png", "lr.png", "confusion.png", "per_class_accuracy.png"]
    epochs = [1, 2]
    held_out = ([1.8, 1.2], [0.4, 0.6])  # of `split` alone: the other split's files do not exist
    assert found["loss.png"] == (plot_curves, {"train": (epochs, [2.0, 1.5]), split: (epochs, held_out[0])},
                                 "cross-entropy loss")
    assert found["accuracy.png"] == (plot_curves, {"train": (epochs, [0.3, 0.5]), split: (epochs, held_out[1])},
                                     "accuracy")
    assert found["lr.png"] == (plot_curves, {"learning rate": (epochs, [0.01, 0.001])}, "learning rate (end of epoch)")
    draw, counts, classes = found["confusion.png"]
    assert draw is plot_confusion and classes == CLASSES
    assert np.array_equal(counts, [[1, 1, 0], [0, 1, 0], [2, 0, 1]])
    assert found["per_class_accuracy.png"] == (plot_per_class, {"cat": 0.5, "dog": 1.0, "ship": 0.25})


def test_draw_all_draws_each_figure_into_the_plots_folder(tmp_path, monkeypatch):
    inputs = write_run(tmp_path, "test")
    monkeypatch.setattr(figures, "run_figures", lambda: run_figures(*inputs))
    written = figures.draw_all(tmp_path / "plots")
    names = ["loss.png", "accuracy.png", "lr.png", "confusion.png", "per_class_accuracy.png"]
    assert written == [tmp_path / "plots" / name for name in names]
    assert all(path.read_bytes().startswith(b"\x89PNG") for path in written)


def test_a_missing_input_names_the_stage_to_run(tmp_path):
    with pytest.raises(figures.UserError, match="acc.tsv: missing; run the train stage first"):
        figures.read_curve(tmp_path / "acc.tsv")
    curves, per_class, confusion = write_run(tmp_path, "test")
    confusion.unlink()
    with pytest.raises(figures.UserError, match=r"confusion.json: missing; run the evaluate stage first \(dvc repro "
                                                r"evaluate\)$"):
        run_figures(curves, per_class, confusion)
    per_class.unlink()
    with pytest.raises(figures.UserError, match=r"per_class.json: missing; run the evaluate stage first \(dvc repro "
                                                r"evaluate\)$"):
        run_figures(curves, per_class, confusion)


def test_parameter_count_ticks_read_as_thousands_and_millions():
    assert [_count(x) for x in (0, 999, 1000, 50_000, 999_999, 1_000_000, 2_500_000)] == [
        "0", "999", "1k", "50k", "999.999k", "1M", "2.5M"]
