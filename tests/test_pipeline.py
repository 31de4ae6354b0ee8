"""End to end: the real dvc.yaml run by DVC itself in a temporary git repository, on the synthetic archive
served from 127.0.0.1, with a tiny model. The tests run in order and share the repository."""
import json
import re

import pytest
from dvcrepo import assert_curves_overlaid, dvc, make_repo, read_json, results, run, set_params, stages_run

OUTPUTS = ["data/cifar-10-batches-py/data_batch_5", "data/stats.json", "models/model.pt", "models/summary.txt",
           "metrics/train/metrics.json", "metrics/train/plots/metrics/train/loss.tsv",
           "metrics/train/plots/metrics/val/acc.tsv", "metrics/train/plots/metrics/lr.tsv",
           "metrics/evaluate/metrics.json", "metrics/evaluate/confusion.json", "plots/loss.png", "plots/accuracy.png",
           "plots/lr.png", "plots/confusion.png", "plots/per_class_accuracy.png"]


@pytest.fixture(scope="module")
def repo(tmp_path_factory, archive):
    """A git repository holding this project's tracked files, pointed at the synthetic archive, tiny settings."""
    return make_repo(tmp_path_factory.mktemp("pipeline"), archive)


def test_repro_runs_every_stage_and_the_tiny_model_learns(repo):
    output = dvc(repo, "repro")
    assert stages_run(output) == {"download", "stats", "train", "evaluate", "plot"}
    for path in OUTPUTS:
        assert (repo / path).is_file() and (repo / path).stat().st_size > 0, path
    train = read_json(repo, "metrics/train/metrics.json")
    test = read_json(repo, "metrics/evaluate/metrics.json")
    assert train["step"] == 3 and train["params"] > 0 and train["images_per_s"] > 0
    assert test["accuracy"] > 0.5, f"test accuracy {test['accuracy']}: chance is 0.1"
    assert test["accuracy"] == pytest.approx(train["val"]["acc"], abs=1e-6)  # the final model, not a best epoch
    assert train["best_val_acc"] >= train["val"]["acc"]
    assert len(test["per_class_accuracy"]) == 10
    assert len(read_json(repo, "metrics/evaluate/confusion.json")) == 200
    assert "Total params" in (repo / "models/summary.txt").read_text()
    stats = read_json(repo, "data/stats.json")
    assert len(stats["mean"]) == len(stats["std"]) == 3 and stats["num_images"] == 600
    # DVC, not git, holds every output
    assert run(repo, "git", "status", "--porcelain", "--untracked-files=all").split() == ["??", "dvc.lock"]


def test_a_second_repro_runs_nothing(repo):
    assert stages_run(dvc(repo, "repro")) == set()
    assert "up to date" in dvc(repo, "status")


def test_same_seed_gives_the_same_metrics(repo):
    before = read_json(repo, "metrics/train/metrics.json")
    curves = (repo / "metrics/train/plots/metrics/val/loss.tsv").read_text()
    assert stages_run(dvc(repo, "repro", "--force", "--single-item", "train")) == {"train"}
    assert results(read_json(repo, "metrics/train/metrics.json")) == results(before)
    assert (repo / "metrics/train/plots/metrics/val/loss.tsv").read_text() == curves


def test_changing_weight_decay_reruns_train_evaluate_and_plot_only(repo):
    set_params(repo, train__weight_decay=5e-4)
    assert stages_run(dvc(repo, "repro")) == {"train", "evaluate", "plot"}
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "baseline: weight decay 5e-4")


def test_an_experiment_reruns_only_what_it_changes_and_compares(repo):
    output = dvc(repo, "exp", "run", "-S", "model.blocks=[1,1,1,1]")
    assert stages_run(output) == {"train", "evaluate", "plot"}
    experiment = re.search(r"Ran experiment\(s\): (\S+)", output).group(1)
    assert read_json(repo, "metrics/train/metrics.json")["params"] < 4977226

    diff = json.loads(dvc(repo, "metrics", "diff", "--json"))
    params_change = diff["metrics/train/metrics.json"]["params"]
    assert params_change["new"] < params_change["old"]
    assert "metrics/evaluate/metrics.json" in diff
    assert "metrics/train/metrics.json" in dvc(repo, "metrics", "show")

    # two experiments' curves overlay in one plot
    assert_curves_overlaid(repo, "HEAD", experiment)


def test_plots_show_renders_every_declared_plot(repo):
    output = dvc(repo, "plots", "show")
    assert (repo / "dvc_plots" / "index.html").is_file(), output
    plots = json.loads(dvc(repo, "plots", "show", "--json"))["data"]
    vega = {"loss", "accuracy", "learning_rate", "confusion"}
    images = {f"plots/{name}.png" for name in ["loss", "accuracy", "lr", "confusion", "per_class_accuracy"]}
    assert set(plots) == vega | images
    for plot_id in vega:
        assert plots[plot_id][0]["content"]["data"]["values"], plot_id
