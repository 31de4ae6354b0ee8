"""The benchmark measures the recipe that trains: params.yaml's, through the train stage's own loop (its
speed is not asserted here; python -m stages.bench prints it)."""
import json

import yaml
from dvcrepo import REPO

from stages import bench, training

TINY = ["--steps", "2", "--warmup", "1", "--rounds", "1", "--batch-size", "16", "--blocks", "1", "1",
        "--widths", "8", "16", "--workers", "1"]


def test_bench_reads_the_recipe_from_params_and_runs_the_train_stages_loop(tmp_path, monkeypatch, capsys):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train"].update(weight_decay=0.125, max_lr=0.03, grad_clip=0.25, precision="fp32")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    epochs, optimizers = [], []

    def spy_epoch(trainer, data, recipe, context, desc="train"):
        epochs.append((len(data.labels), recipe))
        return train_epoch(trainer, data, recipe, context, desc)

    def spy_optimizer(model, recipe):
        optimizers.append(make_optimizer(model, recipe))
        return optimizers[-1]

    train_epoch, make_optimizer = training.train_epoch, training.make_optimizer
    monkeypatch.setattr(training, "train_epoch", spy_epoch)
    monkeypatch.setattr(training, "make_optimizer", spy_optimizer)
    bench.main(["--params", str(tmp_path / "params.yaml"), *TINY])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    # the project mode ran training.train_epoch: the warm-up step, then a round of 2 steps of 16 images
    assert [n for n, _ in epochs] == [16, 32]
    assert all(recipe.weight_decay == 0.125 and recipe.grad_clip == 0.25 for _, recipe in epochs)
    assert {group["weight_decay"] for optimizer in optimizers for group in optimizer.param_groups} == {0.125}
    assert result["recipe"]["weight_decay"] == 0.125 and result["recipe"]["max_lr"] == 0.03
    assert result["recipe"]["batch_size"] == 16 and result["precision"] == "fp32"  # the options override the file
    assert result["blocks"] == [1, 1] and result["widths"] == [8, 16]
    for mode in ["project", "reference", "ceiling"]:
        assert result[f"{mode}_images_per_s"] > 0


def test_bench_defaults_to_the_studys_model_from_params(monkeypatch):
    monkeypatch.chdir(REPO)
    args = bench.parse_args([])
    assert args.blocks == [2, 1, 1, 1] and args.widths == [64, 128, 256, 512] and args.recipe.batch_size == 400
    assert args.recipe.max_lr == 0.01 and args.recipe.grad_clip == 0.1 and args.compile is False
