"""The study's comparisons as DVC experiments: the sweep queues variants, DVC's queue runs them, and the
comparison reads them back through DVC's Python API. Two tiny variants on top of the trained baseline, on the
synthetic archive, swept once (conftest's `swept`); the tests that change a repository change their own copy."""
import json
from pathlib import Path

import pytest
import yaml
from dvc.api import exp_show
from dvcrepo import assert_curves_overlaid, copy_repo, dvc, module, queue_rows, run, stages_run

from cifar.model import ResNet, count_parameters
from cifar.noise import variant_of
from tools.compare import (
    ablation_table,
    ablations,
    experiments,
    markdown_table,
    variant_groups,
    variants_table,
    write_ablations,
)
from tools.sweep import TRICKS, command_line, ladder, planned, study, variants

PARAMS = {"wd-5e-4": 79186, "blocks-1111": 78002}  # [2,1,1,1] and [1,1,1,1] x [8,16,32,64]
REPO = Path(__file__).resolve().parent.parent
PNG = b"\x89PNG\r\n\x1a\n"
STUDY = study(REPO / "params.yaml")  # the shipped params.yaml: the study's recipe
VARIANTS, ABLATION = variants(STUDY), ladder(STUDY)


@pytest.fixture
def call(stage):
    """conftest's stage runner -> (exit status, stdout + stderr). The subprocess itself is tested once per
    module below."""
    def call_module(repo, name, *args):
        ran = stage(repo, name, *args)
        return ran.code, ran.output
    return call_module


@pytest.fixture
def fresh(data_repo, tmp_path):
    """A copy of the data repository: no experiment yet."""
    return copy_repo(data_repo.repo, tmp_path / "repo")


def test_the_study_variants_fit_the_budget_and_the_small_one_is_under_a_million():
    counts = {}
    for name, variant in VARIANTS.items():
        counts[name] = count_parameters(ResNet(variant["model.blocks"], variant["model.widths"]))
    assert counts["final"] == 4977226 and counts["blocks-1111"] == 4903242 and counts["blocks-6543"] == 4865322
    assert counts["under-1m"] == 313498
    assert {VARIANTS[n]["train.weight_decay"] for n in ["final", "wd-1e-6", "wd-1e-5", "wd-5e-4"]} == \
        {1e-4, 1e-6, 1e-5, 5e-4}


def test_a_sweep_command_sets_the_compared_keys_then_the_overrides():
    (experiment,) = planned(["blocks-6543"], VARIANTS, width_divisor=4, overrides=["train.epochs=5"], prefix="cpu-")
    name, params = experiment
    assert name == "cpu-blocks-6543" and list(params)[:3] == ["model.blocks", "model.widths", "train.weight_decay"]
    assert params == {"model.blocks": "[6,5,4,3]", "model.widths": "[8,16,32,64]", "train.weight_decay": "0.0001",
                      "train.optimizer": "adam", "train.max_lr": "0.01", "train.label_smoothing": "0",
                      "train.flip": "random", "train.ema_decay": "0", "train.cutout": "0", "evaluate.tta": "none",
                      "train.epochs": "5"}
    assert command_line(*experiment, force=True).startswith(
        "dvc exp run --queue -n cpu-blocks-6543 --force -S 'model.blocks=[6,5,4,3]' -S 'model.widths=[8,16,32,64]' "
        "-S train.weight_decay=0.0001 -S train.optimizer=adam ")
    assert command_line(*experiment).endswith(" -S evaluate.tta=none -S train.epochs=5")
    ((_, params),) = planned(["wd-1e-6"], VARIANTS, overrides=["train.weight_decay=3e-4"])
    assert len(params) == len(STUDY) and params["train.weight_decay"] == "3e-4"


@pytest.mark.parametrize("args, phrase", [
    (["--only", "final", "deeper"], "unknown variant deeper (known: final,"),
    (["-S", "epochs"], "-S 'epochs': expected section.key=value"),
    (["--width-divisor", "3"], "--width-divisor 3 does not divide model.widths [8, 16, 32, 64]"),  # the repo's
])
def test_sweep_rejects_bad_input_in_one_line(fresh, call, args, phrase):
    code, output = call(fresh, "tools.sweep", *args)
    assert code == 1 and output.strip().splitlines()[-1].startswith("error: ") and phrase in output, output
    assert "Traceback" not in output


def test_compare_reads_the_columns_exp_show_gives():
    rows = [{"rev": "workspace", "typ": "baseline", "accuracy": "!"},
            {"rev": "main", "typ": "baseline", "Experiment": None, "accuracy": "!", "params": "!"},
            {"rev": "abc1234", "typ": "branch_commit", "Experiment": "wide", "State": "Success",
             "model.blocks": "[1, 1, 1, 1]", "model.widths": "[64, 128, 256, 512]", "train.weight_decay": 1e-4,
             "train.epochs": 70.0, "params": 4903242.0, "metrics/evaluate/metrics.json:accuracy": 0.93,
             "validation.acc": 0.91,
             "wall_time_s": 1500.0, "images_per_s": 2400.0},
            {"rev": "def5678", "typ": "branch_commit", "Experiment": "deep", "State": "Queued", "params": None}]
    records, pending = experiments(rows)
    assert pending == ["deep (Queued)"]
    (wide,) = records
    assert wide["name"] == "wide" and wide["blocks"] == [1, 1, 1, 1] and wide["accuracy"] == 0.93
    assert wide["params"] == 4903242 and wide["epochs"] == 70 and wide["validation_accuracy"] == 0.91
    wide["best_epoch_acc"] = 0.935  # compare() takes it from the per-epoch accuracy curve
    assert "| wide | abc1234 | [1, 1, 1, 1] | [64, 128, 256, 512] | 0.0001 | 70 | 4,903,242 | 93.00% | 93.50% | " \
           "1500 | 2400 |" in markdown_table(records)


def run_record(name, accuracy, validation=None, without=None, params=313498, seconds=60.0):
    """One experiment as compare.experiments() makes it from exp_show's row."""
    return {"name": name, "rev": name[:7], "blocks": [2, 1, 1, 1], "widths": [16, 32, 64, 128],
            "weight_decay": 1e-4, "epochs": 15, "params": params, "accuracy": accuracy,
            "accuracy_without_tta": accuracy if without is None else without, "validation_accuracy": validation,
            "wall_time_s": seconds, "images_per_s": 500.0}


def test_the_report_groups_seeds_into_their_variant_with_mean_std_and_range():
    records = [run_record("final-s0", 0.8154), run_record("tuned-s0", 0.83, seconds=70.0),
               run_record("final-s1", 0.8233), run_record("final-s2", 0.8241), run_record("tuned-s1", 0.84),
               run_record("under-1m", 0.70, params=79186)]
    groups = variant_groups(records)
    assert [g["variant"] for g in groups] == ["final", "tuned", "under-1m"]
    final, tuned, small = groups
    assert [r["name"] for r in final["runs"]] == ["final-s0", "final-s1", "final-s2"]
    assert final["accuracy"].n == 3 and final["accuracy"].mean == pytest.approx(0.820933, abs=1e-6)
    assert tuned["wall_time_s"].mean == 65.0 and small["params"] == 79186 and final["validation_accuracy"] is None
    table = variants_table(groups, "final").splitlines()
    assert table[0] == ("| variant | n | blocks | widths | weight decay | epochs | parameters | test accuracy | "
                        "validation accuracy | test Δ vs final (points) | train time (s) |")
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table[2:]}
    assert list(rows) == ["tuned", "final", "under-1m"]  # best mean test accuracy first
    # tuned: 83.50 ± 0.71 over 2; against final's 82.09 ± 0.48 over 3 (seeds that do not pair up: Welch's):
    # +1.41, SE sqrt(.5/2 + .2313/3) = 0.57, t = 2.46 on df = 1.6: p = 0.16, noise (the 2·SE rule called it real)
    assert rows["tuned"] == ("| tuned | 2 | [2, 1, 1, 1] | [16, 32, 64, 128] | 0.0001 | 15 | 313,498 | "
                             "83.50 ± 0.71 % (n = 2, 83.00–84.00) | – | +1.41 ± 0.57 (Welch's t-test: t = 2.46, "
                             "df = 1.6, p = 0.16: within noise) | 65 |")
    assert "| 82.09 ± 0.48 % (n = 3, 81.54–82.41) | – | – |" in rows["final"]
    assert "| 70.00 % (n = 1) | – | -12.09 (n = 1: noise unknown) |" in rows["under-1m"]  # a single run: no ±


def test_the_ablation_report_gives_each_rung_and_its_gain_over_the_rung_before_in_validation_accuracy(tmp_path):
    records = [run_record("ablation-1-sgd-nesterov-s0", 0.80, 0.79), run_record("ablation-0-study-s0", 0.75, 0.74),
               run_record("ablation-0-study-s1", 0.77, 0.76), run_record("ablation-1-sgd-nesterov-s1", 0.79, 0.80),
               run_record("ablation-2-label-smoothing-s0", 0.90, 0.795), run_record("ablation-2-label-smoothing-s1",
                                                                                   0.91, 0.795),
               run_record("s1-ablation-0-study", 0.74), run_record("s1-ablation-7-flip-translate-tta", 0.80, None,
                                                                   0.78),
               run_record("tuned", 0.9)]
    ladders = ablations(variant_groups(records))
    assert set(ladders) == {"", "s1-"}  # one ladder per prefix; tuned is none
    rungs = ladders[""]
    assert [(r["index"], r["rung"], r["accuracy"].n) for r in rungs] == [(0, "study", 2), (1, "sgd-nesterov", 2),
                                                                        (2, "label-smoothing", 2)]
    # chosen by validation accuracy: 0.75 -> 0.795 -> 0.795, although the test accuracy jumps at rung 2
    assert rungs[0]["chosen_by"] == "validation_accuracy" and rungs[0]["gain"] is None
    assert rungs[1]["gain"].delta == pytest.approx(0.045) and rungs[2]["gain"].delta == pytest.approx(0.0)
    table = ablation_table(rungs).splitlines()
    assert table[0].startswith("| rung | adds | n | validation accuracy | gain in validation accuracy (points) | "
                               "test accuracy |")
    # rung 1 over rung 0, paired by seed: +5 and +4 points, s_d = 0.707, SE = 0.5, t = 9 on df = 1:
    # p = 1 - 2 atan(9) / pi = 0.070, within noise at two seeds
    assert table[3] == ("| 1 | sgd-nesterov | 2 | 79.50 ± 0.71 % (n = 2, 79.00–80.00) | +4.50 ± 0.50 (paired "
                        "t-test: t = 9.00, df = 1.0, p = 0.07: within noise) | 79.50 ± 0.71 % (n = 2, 79.00–80.00) | "
                        "79.50 ± 0.71 % (n = 2, 79.00–80.00) | 60 |")
    assert "| +0.00 ± 0.50 (paired t-test: t = 0.00, df = 1.0, p = 1: within noise) |" in table[4]
    single = ablation_table(ladders["s1-"]).splitlines()  # no validation split there: chosen by test accuracy
    assert single[0].startswith("| rung | adds | n | test accuracy | gain in test accuracy (points) |")
    assert single[3].startswith("| 7 | flip-translate-tta | 1 | 80.00 % (n = 1) | +6.00 (n = 1: noise unknown) "
                                "(over rung 0) | 80.00 % (n = 1) | 78.00 % (n = 1) |")
    assert write_ablations(ladders, tmp_path) == ["ablation.png", "ablation-s1.png"]
    assert (tmp_path / "ablation.png").read_bytes().startswith(PNG)
    assert (tmp_path / "ablation-s1.png").read_bytes().startswith(PNG)
    report = (tmp_path / "ablation.md").read_text()
    assert "| 1 | sgd-nesterov | 2 |" in report and "real when a two-sided t-test over seeds gives p < 0.05: the " \
        "paired t-test where both variants ran the same seeds" in report
    assert "![ablation](ablation.png)" in report


def test_sweep_seeds_queue_every_variant_once_per_seed_under_recognisable_names(fresh, call):
    code, output = call(fresh, "tools.sweep", "--only", "final", "tuned", "--seeds", "1", "2", "3", "--dry-run")
    lines = output.strip().splitlines()
    assert code == 0 and len(lines) == 6, output
    names = [line.split(" -n ")[1].split()[0] for line in lines]
    assert names == ["final-s1", "final-s2", "final-s3", "tuned-s1", "tuned-s2", "tuned-s3"]
    for line, seed in zip(lines, [1, 2, 3] * 2):
        assert line.endswith(f" -S train.seed={seed}")
    # seed 0's tuned run would be the search's selected trial again: refused, nothing printed
    code, output = call(fresh, "tools.sweep", "--only", "final", "tuned", "--seeds", "0", "1", "2", "--dry-run")
    assert code == 1 and output.strip() == ("error: --seeds 0 1 2: tuned's run at seed 0 is its search's selected "
                                            "trial again (the search trained at train.seed 0): confirm it over seeds "
                                            "the search never trained, the same for every variant so that the runs "
                                            "pair up, e.g. --seeds 1 2 3"), output
    assert {variant_of(name) for name in names} == {"final", "tuned"}  # compare groups them back
    code, output = call(fresh, "tools.sweep", "--seeds", "1", "1", "--dry-run")
    assert code == 1 and "error: --seeds 1 1: must be different integers >= 0" in output


def test_compare_without_experiments_says_how_to_get_some(fresh, tmp_path):
    code, output = module(fresh, "tools.compare", "--out", str(tmp_path / "report"))
    assert code == 1 and "error: no experiment with results yet: queue some (python -m tools.sweep)" in output
    assert not (tmp_path / "report").exists()


def test_the_sweep_queues_two_tiny_experiments_and_the_queue_runs_them_at_once_each_correctly(swept, trained_repo):
    assert swept.code == 0 and "queued 2 experiment(s)" in swept.output, swept.output
    assert swept.queued == {"wd-5e-4": "Queued", "blocks-1111": "Queued"}
    assert "Started '2' new experiments task queue workers" in swept.started
    assert swept.finished == {"wd-5e-4": "Success", "blocks-1111": "Success"}
    # each trained in its own temporary copy beside the other, and decided something of its own; blocks-1111
    # is checked bit for bit against a direct run of its params by test_reliability's SIGINT test
    decay, shallow, baseline = swept.results["wd-5e-4"], swept.results["blocks-1111"], trained_repo.results
    assert len({decay["model"], shallow["model"], baseline["model"]}) == 3
    assert shallow["metrics"] != decay["metrics"]


def test_an_experiment_on_weight_decay_reruns_train_evaluate_and_plot_and_changes_the_result(swept, trained_repo):
    repo = swept.repo
    # never the data's
    assert stages_run(dvc(repo, "queue", "logs", "wd-5e-4")) == {"train", "evaluate", "export", "plot"}
    after, before = swept.results["wd-5e-4"]["metrics"], trained_repo.results["metrics"]
    assert after["train"]["loss"] != before["train"]["loss"] and after["test"] != before["test"]
    # dvc metrics diff and dvc plots diff compare it with the baseline
    diff = json.loads(dvc(repo, "metrics", "diff", "HEAD", "wd-5e-4", "--json"))
    changed = diff["metrics/evaluate/metrics.json"]
    assert changed and set(changed) <= {"accuracy", "loss", "without_tta.accuracy", "without_tta.loss"}, changed
    assert "params" not in diff.get("metrics/train/run.json", {})  # the same model: the same parameter count
    shown = dvc(repo, "metrics", "show")
    assert "metrics/train/run.json" in shown and "metrics/evaluate/metrics.json" in shown
    assert_curves_overlaid(repo, "HEAD", "wd-5e-4")  # both revisions' curves overlay in one plot


def test_sweep_dry_run_prints_the_nine_commands_and_queues_nothing(fresh, call):
    code, output = call(fresh, "tools.sweep", "--dry-run")
    lines = output.strip().splitlines()
    assert code == 0 and len(lines) == 9, output
    repo_variants = variants(study(fresh / "params.yaml"))  # the study: the repository's params.yaml
    assert lines == [command_line(name, params) for name, params in planned(list(repo_variants), repo_variants)]
    assert lines[0] == ("dvc exp run --queue -n final -S 'model.blocks=[2,1,1,1]' -S 'model.widths=[8,16,32,64]' "
                        "-S train.weight_decay=0.0001 -S train.optimizer=adam -S train.max_lr=0.01 "
                        "-S train.label_smoothing=0 -S train.flip=random -S train.ema_decay=0 -S train.cutout=0 "
                        "-S evaluate.tta=none")
    assert run(fresh, "git", "for-each-ref", "refs/exps") == ""  # no queue entry (a stash commit there)


def shown_value(value):
    """A params value as exp_show's row holds it: lists and booleans as text ('[2, 1, 1, 1]', 'True')."""
    return str(value) if isinstance(value, (list, bool)) else value


def test_the_default_sweep_queues_the_study_s_seven_variants_tuned_and_fast_with_their_exact_params(fresh, call):
    code, output = call(fresh, "tools.sweep")
    assert code == 0 and "queued 9 experiment(s)" in output, output
    try:
        rows = {row["Experiment"]: row for row in exp_show(repo=str(fresh)) if row.get("Experiment")}
        repo_variants = variants(study(fresh / "params.yaml"))
        assert set(rows) == set(repo_variants) and {row["State"] for row in rows.values()} == {"Queued"}
        for name, variant in repo_variants.items():
            shown = {key: rows[name][key] for key in variant}
            assert shown == {key: shown_value(value) for key, value in variant.items()}, name
            # everything else from params.yaml (fast's recipe sets its own epochs)
            assert rows[name]["train.epochs"] == (20 if name == "fast" else 3)
        assert rows["tuned"]["train.optimizer"] == "adam" and rows["tuned"]["evaluate.tta"] == "flip_translate"
        assert rows["fast"]["train.optimizer"] == "muon" and rows["fast"]["train.muon_lr"] == 0.1
    finally:
        dvc(fresh, "queue", "remove", "--all")


def test_tuned_is_the_study_s_recipe_with_the_search_s_tta_and_the_ladder_adds_one_trick_per_rung():
    tuned = VARIANTS["tuned"]
    assert count_parameters(ResNet(tuned["model.blocks"], tuned["model.widths"])) == 4977226
    rungs = list(ABLATION.items())
    assert [name for name, _ in rungs] == [
        "ablation-0-study", "ablation-1-sgd-nesterov", "ablation-2-label-smoothing", "ablation-3-alternating-flip",
        "ablation-4-ema", "ablation-5-cutout", "ablation-6-flip-tta", "ablation-7-flip-translate-tta"]
    study = rungs[0][1]
    # the first rung is the study's recipe as params.yaml ships it, every trick off
    shipped = yaml.safe_load((REPO / "params.yaml").read_text())
    for key, value in study.items():
        section, name = key.split(".")
        assert shipped[section][name] == value, key
    for (_, before), (name, after), (trick, keys) in zip(rungs, rungs[1:], TRICKS):
        assert name.endswith(trick) and after == {**before, **keys}
        assert any(before.get(k) != v for k, v in keys.items()), name  # the rung changes something
    # tuned: the search's best trial, the study's recipe with the last rung's flip-and-translate TTA
    # (docs/experiments.md)
    assert tuned == {**study, **dict(TRICKS)["flip-translate-tta"]}


def test_the_ablation_option_queues_the_ladder_scaled_down(fresh, call):
    code, output = call(fresh, "tools.sweep", "--ablation", "--epochs", "2", "--width-divisor", "2", "-S",
                        "train.seed=1", "--prefix", "s1-", "--dry-run")
    lines = output.strip().splitlines()
    assert code == 0 and len(lines) == 8, output
    assert lines[1].startswith("dvc exp run --queue -n s1-ablation-1-sgd-nesterov ")
    for line in lines:
        assert "-S 'model.widths=[4,8,16,32]'" in line and line.endswith("-S train.epochs=2 -S train.seed=1")
    assert "-S evaluate.tta=flip_translate" in lines[-1] and "-S train.optimizer=sgd" in lines[-1]
    code, output = call(fresh, "tools.sweep", "--ablation", "--only", "ablation-0-study", "ablation-4-ema", "--dry-run")
    assert code == 0 and len(output.strip().splitlines()) == 2, output
    code, output = call(fresh, "tools.sweep", "--epochs", "0")
    assert code == 1 and "error: --epochs 0: must be an integer >= 1" in output


def test_a_name_is_one_experiment_per_commit_and_force_queues_its_replacement(swept, call, tmp_path):
    repo = copy_repo(swept.repo, tmp_path / "repo")
    code, output = call(repo, "tools.sweep", "--only", "wd-5e-4")
    assert code == 1 and "error: queueing wd-5e-4 failed: " in output, output
    assert "conflicts with existing experiment" in output
    code, output = call(repo, "tools.sweep", "--only", "wd-5e-4", "--force")
    assert code == 0 and "queued 1 experiment(s)" in output and " --force " in output, output
    assert sorted(queue_rows(repo)) == [("blocks-1111", "Success"), ("wd-5e-4", "Queued"), ("wd-5e-4", "Success")]
    # DVC took it: once run, it replaces the experiment of that name


def test_exp_show_lists_both_with_their_metrics(swept):
    rows = {row["Experiment"]: row for row in exp_show(repo=str(swept.repo)) if row["Experiment"]}
    assert set(rows) == {"wd-5e-4", "blocks-1111"}
    for name, row in rows.items():
        assert row["params"] == PARAMS[name] and row["train.epochs"] == 3
        assert row["accuracy"] > 0.3, f"{name}: test accuracy {row['accuracy']}, chance is 0.1"
        assert row["wall_time_s"] > 0 and row["images_per_s"] > 0
    assert rows["blocks-1111"]["model.blocks"] == "[1, 1, 1, 1]" and rows["wd-5e-4"]["model.blocks"] == "[2, 1, 1, 1]"
    assert rows["wd-5e-4"]["train.weight_decay"] == 5e-4 and rows["blocks-1111"]["train.weight_decay"] == 1e-4


def test_compare_draws_accuracy_against_size_and_the_curves_and_tabulates_best_first(swept, call, tmp_path):
    repo = swept.repo
    out = tmp_path / "report"
    code, output = call(repo, "tools.compare", "--out", str(out), "--curves", "blocks-1111", "wd-5e-4")
    assert code == 0 and "compared 3 experiment(s)" in output, output  # the baseline commit and both
    for name in ["accuracy_vs_params.png", "epoch_acc.png"]:
        assert (out / name).read_bytes().startswith(PNG), name
    report = (out / "experiments.md").read_text()
    assert report.startswith("## Variants: mean ± standard deviation over seeds")
    assert "the paired t-test where both variants ran the same seeds" in report and "else Welch's" in report
    table = report.split("## Every run\n\n")[1].splitlines()
    assert table[0].startswith("| experiment | rev | blocks | widths |") and len(table) == 5
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in table[2:]}
    assert rows["wd-5e-4"][6] == "79,186" and rows["blocks-1111"][6] == "78,002", table
    assert rows["wd-5e-4"][4] == "0.0005" and rows["blocks-1111"][4] == "0.0001", table
    accuracies = [float(line.split(" | ")[7].rstrip("%")) for line in table[2:]]
    assert accuracies == sorted(accuracies, reverse=True), table  # best test accuracy first
    shown = [row["accuracy"] for row in exp_show(repo=str(repo)) if row["rev"] != "workspace"]
    assert accuracies == [round(100 * a, 2) for a in sorted(shown, reverse=True)]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left

    code, output = call(repo, "tools.compare", "--curves", "wd-5e-4", "nope")
    assert code == 1 and "error: --curves: no experiment with results named nope" in output


def test_compare_n_takes_the_experiments_of_earlier_commits(swept, call, tmp_path):
    repo = copy_repo(swept.repo, tmp_path / "repo")
    (repo / "notes.txt").write_text("a later commit\n")
    run(repo, "git", "add", "notes.txt")
    run(repo, "git", "commit", "-qm", "a later commit, without experiments")
    code, output = call(repo, "tools.compare", "--out", str(tmp_path / "one"))
    assert code == 0 and "compared 1 experiment(s)" in output, output  # the new commit's own results alone
    code, output = call(repo, "tools.compare", "-n", "2", "--out", str(tmp_path / "two"))
    assert code == 0 and "compared 4 experiment(s)" in output, output  # both commits, the 2 experiments


def test_plots_diff_overlays_two_experiments(swept):
    assert_curves_overlaid(swept.repo, "wd-5e-4", "blocks-1111")
