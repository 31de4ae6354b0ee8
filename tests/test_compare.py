"""The comparison report in-process: exp_show's rows and each experiment's per-epoch curve stubbed (the
DVC round trip is test_experiments'), so what the report says is checked against known curves."""
import pytest

from cifar.workspace import UserError
from tools import compare


def row(name, rev, accuracy, params=100_000, weight_decay=1e-4):
    return {"rev": rev, "typ": "branch_commit", "Experiment": name, "State": "Success", "model.blocks": "[1, 1]",
            "model.widths": "[8, 16]", "train.weight_decay": weight_decay, "train.epochs": 3, "params": params,
            "accuracy": accuracy, "wall_time_s": 10.0, "images_per_s": 500.0}


# per-epoch accuracy: the best epoch is not the last, and differs from the test accuracy in the table
CURVES = {"aaa1111": ("test", ([1, 2, 3], [0.41, 0.77, 0.70])),
          "bbb2222": ("validation", ([1, 2, 3], [0.52, 0.60, 0.655])),
          "ccc3333": ("test", ([1, 2, 3], [0.2, 0.35, 0.3]))}


@pytest.fixture
def drawn(monkeypatch):
    """compare() over three experiments; returns what each figure was given."""
    rows = [{"rev": "workspace", "typ": "baseline"}, row("first", "aaa1111", 0.71),
            row("second", "bbb2222", 0.66, weight_decay=5e-4), row("third", "ccc3333", 0.31)]
    calls = {}
    monkeypatch.setattr(compare, "load_rows", lambda num: rows)
    monkeypatch.setattr(compare, "read_epoch_curve", lambda rev: CURVES[rev])
    monkeypatch.setattr(compare, "plot_curves", lambda curves, ylabel, path: calls.update(curves=(curves, ylabel,
                                                                                                  path.name)))
    monkeypatch.setattr(compare, "plot_accuracy_vs_params", lambda points, path: calls.update(points=points))
    return calls


def table_rows(path):
    lines = path.read_text().split("## Every run\n\n")[1].splitlines()[2:]  # one row per run
    return {cells[0]: cells for cells in (line.strip("| ").split(" | ") for line in lines)}


def test_the_best_epoch_column_is_each_experiments_best_per_epoch_accuracy(drawn, tmp_path):
    records = compare.compare(tmp_path)
    assert {r["name"]: r["best_epoch_acc"] for r in records} == {"first": 0.77, "second": 0.655, "third": 0.35}
    table = table_rows(tmp_path / "experiments.md")
    assert list(table) == ["first", "second", "third"]  # best test accuracy first
    assert {name: cells[8] for name, cells in table.items()} == {"first": "77.00%", "second": "65.50%",
                                                                 "third": "35.00%"}
    assert {name: cells[7] for name, cells in table.items()} == {"first": "71.00%", "second": "66.00%",
                                                                 "third": "31.00%"}
    assert [p["name"] for p in drawn["points"]] == ["first", "second", "third"]


def test_the_curves_figure_gets_every_experiment_by_default_and_the_chosen_ones_with_curves(drawn, tmp_path):
    compare.compare(tmp_path)
    curves, ylabel, name = drawn["curves"]
    assert name == "epoch_acc.png" and ylabel == "test or validation accuracy"
    assert curves == {"first": CURVES["aaa1111"][1], "second": CURVES["bbb2222"][1], "third": CURVES["ccc3333"][1]}
    compare.main(["--out", str(tmp_path), "--curves", "third", "first"])
    assert drawn["curves"][0] == {"third": CURVES["ccc3333"][1], "first": CURVES["aaa1111"][1]}


def test_curves_naming_no_experiment_is_an_error(drawn, tmp_path):
    with pytest.raises(UserError, match=r"--curves: no experiment with results named fourth \(known: first, "
                                        r"second, third\)"):
        compare.compare(tmp_path, ["first", "fourth"])
    assert "curves" not in drawn


def test_experiments_without_results_are_left_out_and_named(monkeypatch, tmp_path, capsys, drawn):
    queued = {**row("later", "ddd4444", "-"), "State": "Queued"}
    monkeypatch.setattr(compare, "load_rows", lambda num: [row("first", "aaa1111", 0.71), queued])
    assert [r["name"] for r in compare.compare(tmp_path)] == ["first"]
    assert "left out (no results): later (Queued)" in capsys.readouterr().out
    monkeypatch.setattr(compare, "load_rows", lambda num: [queued])
    with pytest.raises(UserError, match="no experiment with results yet: .*; without results: later"):
        compare.compare(tmp_path)
