"""End to end: the real dvc.yaml run by DVC itself in a temporary git repository, on the synthetic archive
served from 127.0.0.1, with a tiny model (conftest's data_repo and trained_repo, built once per test run).
Tests that change a repository change their own copy."""
import json
import re
import sys
from collections import Counter

import pytest
import torch
from conftest import TEST_IMAGES, synthetic_batches
from dvcrepo import call, copy_repo, dvc, read_json, run, set_params, stages_run
from recipes import recipe

from cifar import training
from cifar.data import channel_stats, hold_out, load_split
from cifar.fit import estimate, run_metrics
from cifar.model import ResNet, count_parameters
from cifar.resume import Progress
from cifar.workspace import UserError
from tools.compare import COLUMNS

OUTPUTS = ["data/cifar-10-batches-py/data_batch_5", "data/stats.json", "models/model.pt", "models/summary.txt",
           "metrics/train/metrics.json", "metrics/train/run.json", "metrics/train/plots/metrics/train/loss.tsv",
           "metrics/train/plots/metrics/test/acc.tsv", "metrics/train/plots/metrics/lr.tsv",
           "metrics/evaluate/metrics.json", "metrics/evaluate/per_class.json", "metrics/evaluate/confusion.json",
           "plots/loss.png", "plots/accuracy.png", "plots/lr.png", "plots/confusion.png",
           "plots/per_class_accuracy.png", "models/model.onnx", "metrics/export/metrics.json"]
TINY_PARAMS = 79_186  # [2, 1, 1, 1] x [8, 16, 32, 64], the test repositories' model


def test_repro_runs_every_stage_in_order_and_git_holds_no_output(data_repo, trained_repo):
    assert stages_run(data_repo.output) == {"download", "stats"}
    assert stages_run(trained_repo.output) == {"train", "evaluate", "export", "plot"}  # the data stages were up to date
    repo = trained_repo.repo
    for path in OUTPUTS:
        assert (repo / path).is_file() and (repo / path).stat().st_size > 0, path
    tracked = run(repo, "git", "ls-files").split()
    outputs = [path for path in tracked if path.startswith(("data/", "models/", "metrics/", "plots/"))
               and not path.endswith("/.gitignore")]
    assert "dvc.lock" in tracked and outputs == []


def test_the_tiny_model_learns_and_every_metric_is_consistent(trained_repo):
    repo = trained_repo.repo
    train = read_json(repo, "metrics/train/metrics.json")
    run_metrics = read_json(repo, "metrics/train/run.json")
    test = read_json(repo, "metrics/evaluate/metrics.json")
    assert train["step"] == 3 and run_metrics["images_per_s"] > 0 and run_metrics["wall_time_s"] > 0
    assert run_metrics["params"] == TINY_PARAMS == count_parameters(ResNet([2, 1, 1, 1], [8, 16, 32, 64]))
    assert test["accuracy"] > 0.5, f"test accuracy {test['accuracy']}: chance is 0.1"
    assert test["accuracy"] == pytest.approx(train["test"]["acc"], abs=1e-6)  # the final model, not a best epoch
    assert test["loss"] == pytest.approx(train["test"]["loss"], rel=1e-5)
    assert test["without_tta"] == {"accuracy": test["accuracy"], "loss": test["loss"]}  # evaluate.tta: none
    test_acc = [float(line.split("\t")[-1]) for line in
               (repo / "metrics/train/plots/metrics/test/acc.tsv").read_text().splitlines()[1:]]
    assert train["best_test_acc"] == pytest.approx(max(test_acc))

    # per-class accuracy is what the confusion records say, and their total is the test accuracy
    confusion = read_json(repo, "metrics/evaluate/confusion.json")
    assert len(confusion) == TEST_IMAGES
    totals = Counter(r["actual"] for r in confusion)
    hits = Counter(r["actual"] for r in confusion if r["actual"] == r["predicted"])
    per_class = {row["class"]: row["accuracy"] for row in read_json(repo, "metrics/evaluate/per_class.json")}
    assert per_class == pytest.approx({name: hits[name] / totals[name] for name in totals})
    assert sum(hits.values()) / len(confusion) == pytest.approx(test["accuracy"])
    assert "Total params: 79,186" in (repo / "models/summary.txt").read_text()


def test_stats_are_the_synthetic_training_sets_channel_statistics(trained_repo, tmp_path):
    stats = read_json(trained_repo.repo, "data/stats.json")
    images, _ = load_split(trained_repo.repo / "data/cifar-10-batches-py", "train")
    mean, std = channel_stats(images)
    assert stats == {"mean": mean, "std": std, "num_images": 600}
    # and those are the statistics of the batches conftest wrote, not of whatever the stage happened to read
    data = [batch["data"] for name, batch in synthetic_batches().items() if name.startswith("data_batch")]
    assert images.reshape(600, -1).tolist() == [row for batch in data for row in batch.tolist()]


def test_with_a_validation_split_the_stats_are_those_of_the_images_trained_on(data_repo, tmp_path, stage):
    """train.validation_images 100: data/stats.json is the statistics of the 500 images the train stage trains
    on (its split, fit.split_data), says how many, and a rerun writes the same bytes; the held-out images would
    have changed them. Back to no split, the 600 images' statistics, byte for byte as before."""
    from cifar.fit import split_data

    repo = copy_repo(data_repo.repo, tmp_path / "repo")
    images, labels = load_split(repo / "data/cifar-10-batches-py", "train")
    set_params(repo, train__validation_images=100)
    ran = stage(repo, "stats")
    assert ran.code == 0 and ran.out.startswith("500 training images (100 held out): mean "), ran.output
    written = (repo / "data/stats.json").read_bytes()
    (trained_on, _), _, _ = split_data(recipe(validation_images=100), 10)  # in repo: the stage left us there
    kept, _ = hold_out(labels, 100, 10)
    assert torch.equal(trained_on, images[kept])
    mean, std = channel_stats(trained_on)
    assert json.loads(written) == {"mean": mean, "std": std, "num_images": 500}
    assert channel_stats(images) != (mean, std)
    assert stage(repo, "stats").code == 0 and (repo / "data/stats.json").read_bytes() == written  # exact rerun
    set_params(repo, train__validation_images=0)
    assert stage(repo, "stats").code == 0
    assert (repo / "data/stats.json").read_bytes() == (data_repo.repo / "data/stats.json").read_bytes()


def numbers(values, prefix=""):
    """The numeric leaves of a metrics file's nested values, as dvc metrics show names its columns: a.b."""
    found = set()
    for key, value in values.items():
        if isinstance(value, dict):
            found |= numbers(value, f"{prefix}{key}.")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            found.add(prefix + key)
    return found


def test_the_metrics_table_holds_at_most_14_numbers_and_what_compare_reads(trained_repo):
    """dvc metrics show (and dvc exp show) compare variants: at most 14 numeric columns (21 when the export
    check's numbers, tolerances and settings stood there too). tools.compare finds its metrics there; the export
    check's file stays readable, named."""
    repo = trained_repo.repo
    shown = json.loads(dvc(repo, "metrics", "show", "--json"))[""]["data"]
    columns = {(path, key) for path, found in shown.items() for key in numbers(found["data"])}
    assert len(columns) <= 14, sorted(columns)
    assert {("metrics/evaluate/metrics.json", "accuracy"), ("metrics/train/run.json", "params"),
            ("metrics/train/run.json", "images_per_s"), ("metrics/train/metrics.json", "best_test_acc")} <= columns
    assert {file for file, _ in COLUMNS.values() if file != "params.yaml"} <= set(shown)
    export = json.loads(dvc(repo, "metrics", "show", "metrics/export/metrics.json", "--json"))[""]["data"]
    assert export["metrics/export/metrics.json"]["data"]["agreement"] == 1.0


def test_a_second_repro_runs_nothing(trained_repo):
    assert stages_run(dvc(trained_repo.repo, "repro")) == set()
    assert "up to date" in dvc(trained_repo.repo, "status")


def test_training_prints_each_epochs_time_and_after_the_first_an_estimate_of_the_run(trained_repo):
    output = trained_repo.output
    assert re.search(r"epoch 1/3 \(\d+ s\): train loss", output) and re.search(r"epoch 3/3 \(\d+ s\)", output)
    assert re.search(r"first epoch \d+ s: the remaining 2 epoch\(s\) take about \d+ s", output)
    assert "run: 100%" in output  # the whole run's bar, beside each epoch's batches
    assert "A quick run" not in output  # seconds, not hours


@pytest.mark.parametrize("seconds, epochs, says, hint", [(100, 70, "about 1.9 h", True),
                                                          (30, 70, "about 34 min", False), (2, 3, "about 4 s", False)])
def test_the_estimate_points_to_the_quick_run_past_an_hour_on_a_cpu(capsys, seconds, epochs, says, hint):
    progress = Progress(epochs, finished=1, last_epoch_seconds=seconds)
    estimate(progress, recipe(epochs=epochs), torch.device("cpu"))
    out = capsys.readouterr().out
    assert f"first epoch {seconds} s: the remaining {epochs - 1} epoch(s) take {says}" in out
    assert ("README.md's 'A quick run'" in out) == hint
    estimate(progress, recipe(epochs=epochs), torch.device("cuda"))
    assert "A quick run" not in capsys.readouterr().out  # a GPU's hour is the run the user asked for


def test_evaluate_runs_on_the_device_system_device_chooses(trained_repo, tmp_path, stage, monkeypatch):
    """With a GPU seemingly present, system.device cpu keeps evaluate on the CPU, as it keeps train: one
    device choice for every stage (choose_device). Scoring on CUDA here would fail."""
    repo = copy_repo(trained_repo.repo, tmp_path / "repo")
    set_params(repo, system__device="cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    ran = stage(repo, "evaluate")
    assert ran.code == 0 and "images on cpu" in ran.out, ran.output
    assert read_json(repo, "metrics/evaluate/metrics.json") == read_json(trained_repo.repo,
                                                                       "metrics/evaluate/metrics.json")


def test_a_validation_split_holds_images_out_of_training_and_leaves_the_test_set_to_evaluate(data_repo, tmp_path,
                                                                                             stage, monkeypatch):
    """train.validation_images 100: 10 images of each class leave the training set; no training batch is
    drawn from them, every epoch is scored on them (curves validation/*), and the train stage never reads the
    test batch: evaluate scores it, once."""
    from cifar import data, fit

    repo = copy_repo(data_repo.repo, tmp_path / "repo")
    set_params(repo, train__validation_images=100)
    read, handed, batches = [], {}, []
    load_split = data.load_split
    for module in (data, fit):  # data.training_split reads the training batches, fit the test batch
        monkeypatch.setattr(module, "load_split", lambda folder, split: read.append(split) or load_split(folder, split))
    on_device = fit.Data.on_device
    monkeypatch.setattr(fit.Data, "on_device", lambda train, monitor, *rest: handed.update(
        train=train, monitor=monitor) or on_device(train, monitor, *rest))
    crop_flip = training.random_crop_flip
    monkeypatch.setattr(training, "random_crop_flip", lambda padded, *rest: batches.append(padded) or crop_flip(
        padded, *rest))
    ran = stage(repo, "train")
    assert ran.code == 0 and "500 train / 100 validation images" in ran.out, ran.output
    assert read == ["train"]  # never the test batch
    (train_images, train_labels), (held_images, held_labels) = handed["train"], handed["monitor"]
    assert torch.bincount(held_labels).tolist() == [10] * 10 and len(train_labels) == 500
    held = {image.numpy().tobytes() for image in held_images}
    assert len(held) == 100 and not held & {image.numpy().tobytes() for image in train_images}
    trained_on = {image[:, 4:-4, 4:-4].numpy().tobytes() for batch in batches for image in batch}  # uncrop
    assert len(trained_on) == 500 and not trained_on & held  # every training image, no held-out one
    curves = repo / "metrics/train/plots/metrics"
    assert (curves / "validation/acc.tsv").is_file() and not (curves / "test").exists()
    metrics = read_json(repo, "metrics/train/metrics.json")
    assert "best_validation_acc" in metrics and "best_test_acc" not in metrics
    ran = stage(repo, "evaluate")
    assert ran.code == 0 and f"on {TEST_IMAGES} images" in ran.out, ran.output


def test_the_held_out_images_are_stratified_fixed_and_too_many_is_an_error():
    labels = torch.arange(60) % 10
    kept, held = hold_out(labels, 25, 10)
    assert torch.bincount(labels[held], minlength=10).tolist() == [3] * 5 + [2] * 5  # 25 = 10 * 2 + 5
    assert sorted(kept.tolist() + held.tolist()) == list(range(60))
    assert torch.equal(hold_out(labels, 25, 10)[1], held)  # the same images every time, whatever train.seed
    with pytest.raises(UserError, match=r"train.validation_images = 60 holds out 6 images of class 0, which has "
                                        r"only 6 training images"):
        hold_out(labels, 60, 10)


def test_a_narrow_model_trains_on_an_odd_batch(data_repo, tmp_path):
    """model.widths [8, 16, 32, 64] with an odd train.batch_size killed the train stage without a word (SIGSEGV
    in oneDNN's weight gradient of a strided 1x1 convolution, docs/troubleshooting.md): as its own process, with
    2 threads (the crash needs 2 or more), it trains."""
    repo = copy_repo(data_repo.repo, tmp_path / "repo")
    set_params(repo, train__batch_size=59, train__epochs=1, train__precision="fp32")
    code, out, err = call(repo, sys.executable, "-m", "stages.train", OMP_NUM_THREADS="2")
    assert code == 0, (code, err[-2000:])
    assert "saved models/model.pt" in out and (repo / "models/model.pt").is_file()


def test_images_per_second_count_the_training_time_alone():
    """Scoring, checkpoints and start-up are in the wall time, not in the speed: 2 epochs of 1,000 images in 40 s
    of training (100 s in all) is 50 images/s."""
    progress = Progress(3, finished=2, train_seconds=40.0, wall_seconds=100.0)
    assert run_metrics(progress, 79_186, 1000) == {"params": 79_186, "wall_time_s": 100.0, "images_per_s": 50.0}
