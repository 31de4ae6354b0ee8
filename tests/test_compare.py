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


def seed_rows():
    """Two seeds of `final`, one run of `wide` without epochs or timings, a queued run, one without results or
    a state, and the workspace (with results: not an experiment)."""
    return [{**row("workspace", "workspace", 0.99), "typ": "baseline", "Experiment": None},
            {**row("final-s0", "aaa1111", 0.8125), "without_tta.accuracy": 0.80, "validation.acc": 0.83},
            {**row("final-s1", "aaa2222", 0.8175), "without_tta.accuracy": 0.81, "validation.acc": 0.84,
             "wall_time_s": 12.0},
            {**row("wide", "bbb1111", 0.79, params=2_500_000, weight_decay=1e-5), "train.epochs": "-",
             "wall_time_s": "-", "images_per_s": "-"},
            {**row("later", "ccc1111", "-"), "State": "Queued"}, {**row("lost", "ddd1111", "-"), "State": None}]


def test_the_tables_of_every_run_and_of_the_variants_cell_by_cell():
    records, pending = compare.experiments(seed_rows())
    assert pending == ["later (Queued)", "lost (no results)"]
    records[0]["best_epoch_acc"] = 0.8234
    assert compare.markdown_table(records) == (
        "| experiment | rev | blocks | widths | weight decay | epochs | parameters | test accuracy | best epoch "
        "accuracy | train time (s) | images/s |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n"
        "| final-s1 | aaa2222 | [1, 1] | [8, 16] | 0.0001 | 3 | 100,000 | 81.75% | – | 12 | 500 |\n"
        "| final-s0 | aaa1111 | [1, 1] | [8, 16] | 0.0001 | 3 | 100,000 | 81.25% | 82.34% | 10 | 500 |\n"
        "| wide | bbb1111 | [1, 1] | [8, 16] | 1e-05 | – | 2,500,000 | 79.00% | – | – | – |\n")
    # final: 81.25 and 81.75 (std 0.35), validation 83 and 84; wide 2.50 points below, one run
    assert compare.variants_table(compare.variant_groups(records), "final") == (
        "| variant | n | blocks | widths | weight decay | epochs | parameters | test accuracy | validation accuracy "
        "| test Δ vs final (points) | train time (s) |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n"
        "| final | 2 | [1, 1] | [8, 16] | 0.0001 | 3 | 100,000 | 81.50 ± 0.35 % (n = 2, 81.25–81.75) "
        "| 83.50 ± 0.71 % (n = 2, 83.00–84.00) | – | 11 |\n"
        "| wide | 1 | [1, 1] | [8, 16] | 1e-05 | – | 2,500,000 | 79.00 % (n = 1) | – "
        "| -2.50 (n = 1: noise unknown) | – |\n")


def ladder_rows(prefix, rungs, validation=True):
    """tools.sweep's ablation names over seeds: (index, trick, test accuracy of seed 0, seeds); a later rung's
    validation accuracy gains more at seed 1 than at seed 0, so that its runs' differences vary."""
    return [{**row(f"{prefix}ablation-{i}-{trick}-s{k}", f"{prefix}{i}{k}", acc + 0.01 * k),
             "without_tta.accuracy": acc - 0.01,
             **({"validation.acc": acc + 0.02 + 0.005 * k + 0.002 * k * i} if validation else {})}
            for i, trick, acc, seeds in rungs for k in range(seeds)]


def test_the_ablation_table_cell_by_cell():
    rows = (ladder_rows("", [(0, "study", 0.80, 2), (1, "flip", 0.82, 2), (2, "ema", 0.815, 1)])
            + ladder_rows("t-", [(0, "study", 0.80, 1), (2, "ema", 0.79, 1)], validation=False)
            + ladder_rows("one-", [(0, "study", 0.80, 1)]))
    ladders = compare.ablations(compare.variant_groups(compare.experiments(rows)[0]))
    # the gains in validation accuracy, paired by seed: rung 1 gains 2.0 and 2.2 points, mean 2.1, s_d = 0.14, SE =
    # 0.1, t = 21 on df = 1: p = 1 - 2 atan(21) / pi = 0.030, real; rung 2 has seed 0 alone (Welch's): no noise
    # estimate
    assert compare.ablation_table(ladders[""]) == (
        "| rung | adds | n | validation accuracy | gain in validation accuracy (points) | test accuracy "
        "| test without TTA | train time (s) |\n"
        "|---|---|---|---|---|---|---|---|\n"
        "| 0 | study | 2 | 82.25 ± 0.35 % (n = 2, 82.00–82.50) | – | 80.50 ± 0.71 % (n = 2, 80.00–81.00) "
        "| 79.00 ± 0.00 % (n = 2, 79.00–79.00) | 10 |\n"
        "| 1 | flip | 2 | 84.35 ± 0.49 % (n = 2, 84.00–84.70) "
        "| +2.10 ± 0.10 (paired t-test: t = 21.00, df = 1.0, p = 0.03: real) "
        "| 82.50 ± 0.71 % (n = 2, 82.00–83.00) | 81.00 ± 0.00 % (n = 2, 81.00–81.00) | 10 |\n"
        "| 2 | ema | 1 | 83.50 % (n = 1) | -0.85 (n = 1: noise unknown) | 81.50 % (n = 1) | 80.50 % (n = 1) | 10 |\n")
    # without validation images the gains are in test accuracy; rung 1 has no results: 2's gain is over 0's
    assert compare.ablation_table(ladders["t-"]) == (
        "| rung | adds | n | test accuracy | gain in test accuracy (points) | test accuracy | test without TTA "
        "| train time (s) |\n"
        "|---|---|---|---|---|---|---|---|\n"
        "| 0 | study | 1 | 80.00 % (n = 1) | – | 80.00 % (n = 1) | 79.00 % (n = 1) | 10 |\n"
        "| 2 | ema | 1 | 79.00 % (n = 1) | -1.00 (n = 1: noise unknown) (over rung 0) | 79.00 % (n = 1) "
        "| 78.00 % (n = 1) | 10 |\n")
    assert compare.ablation_table(ladders["one-"]).splitlines()[2] == (  # a ladder of one rung: no gain yet
        "| 0 | study | 1 | 82.00 % (n = 1) | – | 80.00 % (n = 1) | 79.00 % (n = 1) | 10 |")


def test_runs_of_one_name_in_two_commits_are_two_variants_never_pooled():
    # -n 2: exp_show lists HEAD's commit with its experiments, then the older commit with its own
    rows = [{"rev": "master", "typ": "baseline", "Experiment": None},
            row("final-s0", "aaa0001", 0.80), row("final-s1", "aaa0002", 0.82),
            {"rev": "1234abc", "typ": "baseline", "Experiment": None},
            row("final-s0", "bbb0001", 0.70), row("final-s1", "bbb0002", 0.73), row("wide", "bbb0003", 0.75)]
    records, _ = compare.experiments(rows)
    assert [r["name"] for r in records] == ["final-s0@master", "final-s1@master", "final-s0@1234abc",
                                            "final-s1@1234abc", "wide@1234abc"]
    groups = {g["variant"]: g for g in compare.variant_groups(records)}
    assert set(groups) == {"final@master", "final@1234abc", "wide@1234abc"}
    assert groups["final@master"]["accuracy"].mean == pytest.approx(0.81)
    assert groups["final@1234abc"]["accuracy"].mean == pytest.approx(0.715)
    # the reference is HEAD's final; the older commit's final is compared with it seed by seed (-10 and -9
    # points: SE 0.5, t = -19 on df = 1, p = 0.033), not pooled into it
    table = compare.variants_table(list(groups.values()), "final")
    assert "| final@1234abc | 2 |" in table
    assert "| -9.50 ± 0.50 (paired t-test: t = -19.00, df = 1.0, p = 0.033: real) |" in table
    # one commit alone: the names stay as they are
    assert [r["name"] for r in compare.experiments(rows[:3])[0]] == ["final-s0", "final-s1"]


def test_the_validation_accuracy_is_scored_with_the_runs_tta_as_the_test_accuracy_is():
    # the train stage scores every TTA mode; tuned-s0's evaluate.tta picks its own. old-s0 logged its TTA's
    # score alone (before every mode was scored), final-s0 none (before any TTA score was logged)
    modes = {"validation.acc_with_tta.none": 0.83, "validation.acc_with_tta.flip": 0.84,
             "validation.acc_with_tta.flip_translate": 0.845}
    rows = [{**row("tuned-s0", "aaa1111", 0.82), "validation.acc": 0.83, "evaluate.tta": "flip_translate", **modes},
            {**row("flip-s0", "ccc1111", 0.82), "validation.acc": 0.83, "evaluate.tta": "flip", **modes},
            {**row("old-s0", "ddd1111", 0.82), "validation.acc": 0.83, "evaluate.tta": "flip",
             "validation.acc_with_tta": 0.835},
            {**row("final-s0", "bbb1111", 0.81), "validation.acc": 0.83}]
    (tuned, flip, old, final), _ = compare.experiments(rows)
    assert (tuned["validation_accuracy"], tuned["validation_accuracy_without_tta"]) == (0.845, 0.83)
    assert flip["validation_accuracy"] == 0.84 and old["validation_accuracy"] == 0.835
    assert (final["validation_accuracy"], final["validation_accuracy_without_tta"]) == (0.83, 0.83)
    table = compare.variants_table(compare.variant_groups([tuned, final]), "final")
    assert "| 82.00 % (n = 1) | 84.50 % (n = 1) |" in table and "| 81.00 % (n = 1) | 83.00 % (n = 1) |" in table


def test_the_variants_table_pairs_runs_by_seed_where_it_can_and_names_the_test():
    # the tuned confirmation's test accuracies (docs/results.md): tuned's seeds 0..2 pair up with final's, and
    # each seed gains 1.14, 1.64, 1.54 points: d's mean 1.44, s_d = 0.265, SE = 0.153, t = 9.43 on df = 2.
    # late ran other seeds (1..3): Welch's t-test, SE = sqrt(0.32² / 3 + 0.47² / 3) = 0.33, on 3.5 df
    final, tuned = [0.8150, 0.8186, 0.8122], [0.8264, 0.8350, 0.8276]
    rows = ([row(f"final-s{k}", f"f{k}", v) for k, v in enumerate(final)]
            + [row(f"tuned-s{k}", f"t{k}", v) for k, v in enumerate(tuned)]
            + [row(f"late-s{k + 1}", f"l{k}", v) for k, v in enumerate(tuned)])
    table = compare.variants_table(compare.variant_groups(compare.experiments(rows)[0]), "final")
    cells = {line.split(" | ")[0].strip("| "): line.split(" | ")[9] for line in table.splitlines()[2:]}
    assert cells == {"tuned": "+1.44 ± 0.15 (paired t-test: t = 9.43, df = 2.0, p = 0.011: real)",
                     "late": "+1.44 ± 0.33 (Welch's t-test: t = 4.41, df = 3.5, p = 0.015: real)", "final": "–"}
