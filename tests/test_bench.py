"""The benchmark measures the recipe that trains: params.yaml's, through the train stage's own loop (its
speed is not asserted here; python -m tools.bench prints it)."""
import argparse
import json

import pytest
import torch
import yaml
from dvcrepo import REPO

from cifar import training
from cifar.workspace import UserError
from tools import bench

CPU = torch.device("cpu")
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
    assert args.recipe.max_lr == 0.01 and args.recipe.grad_clip == 0.1
    assert args.compiled is False and args.device == "auto"


def test_flops_per_image_are_a_training_steps_forward_and_backward():
    """ResNet([1], [8]) by hand, per image: the stem (3 -> 8) and the block's two 8 -> 8 3x3 convolutions at
    32x32, the 8 -> 10 head; backward computes each layer's weight gradient (as many FLOPs as its forward) and
    the gradient of its input, except the stem's (the image needs none)."""
    args = bench.parse_args(["--blocks", "1", "--widths", "8", "--precision", "fp32", "--params",
                             str(REPO / "params.yaml")])
    stem, conv, head = 2 * 3 * 8 * 9 * 32 * 32, 2 * 8 * 8 * 9 * 32 * 32, 2 * 8 * 10
    forward = stem + 2 * conv + head
    backward = stem + 2 * (2 * conv) + 2 * head
    assert bench.flops_per_image(args, CPU) == forward + backward == 7_963_104


def test_bench_reports_its_distance_to_the_hardware_and_the_top_operators(capsys):
    bench.main(["--params", str(REPO / "params.yaml"), *TINY, "--precision", "fp32", "--profile"])
    captured = capsys.readouterr()
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert result["gflops_per_image"] == round(bench.flops_per_image(bench.parse_args(
        ["--params", str(REPO / "params.yaml"), *TINY]), CPU) / 1e9, 4)
    assert result["matmul_tflop_per_s"] > 0 and result["capability"]
    for mode in ["project", "reference", "ceiling"]:
        assert 0 < result[f"{mode}_mfu"] < 1 and result[f"{mode}_tflop_per_s"] > 0
    assert "Self CPU" in captured.err and "aten::" in captured.err  # the profiler's table of operators


def test_the_reference_loop_uses_the_recipes_optimizer(tmp_path, monkeypatch):
    """The reference differs from the project's loop in its data path and precision only: under
    train.optimizer sgd it steps SGD with the recipe's momentum, as the project's loop does."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train"].update(optimizer="sgd", max_lr=0.2, momentum=0.8, nesterov=True, weight_decay=5e-4)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    built = []
    monkeypatch.setattr(bench, "make_optimizer", lambda model, recipe: built.append(
        training.make_optimizer(model, recipe)) or built[-1])
    args = bench.parse_args(["--params", str(tmp_path / "params.yaml"), *TINY])
    bench.reference_runner(args, CPU)(1)
    (optimizer,) = built
    assert isinstance(optimizer, torch.optim.SGD)
    group = optimizer.param_groups[0]
    assert group["momentum"] == 0.8 and group["nesterov"] and group["weight_decay"] == 5e-4


def test_the_benchmark_runs_on_the_device_system_device_chooses(tmp_path, monkeypatch, capsys):
    """One device choice for the stages and the benchmark: devices.choose_device with system.device."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["system"]["device"] = "cpu"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    asked = []
    monkeypatch.setattr(bench, "choose_device", lambda setting: asked.append(setting) or (CPU, None))
    bench.main(["--params", str(tmp_path / "params.yaml"), *TINY, "--precision", "fp32"])
    assert asked == ["cpu"] and json.loads(capsys.readouterr().out.strip().splitlines()[-1])["device"].startswith("cpu")


def test_the_reported_rates_flops_and_mfu_follow_from_the_timings(monkeypatch):
    """The timer stubbed: every figure of the report against its formula, from known seconds per call."""
    monkeypatch.setattr(bench, "choose_device", lambda setting: (CPU, None))
    for mode in ["project", "reference", "ceiling"]:
        monkeypatch.setattr(bench, f"{mode}_runner", lambda args, device: lambda steps: None)
    monkeypatch.setattr(bench, "flops_per_image", lambda args, device: 3e9)
    monkeypatch.setattr(bench.torch, "randn", lambda *size, device=None: torch.ones(2, 2))  # no real 2048^2 product
    # 2 rounds of project, reference, ceiling (the best round counts), then the matrix product's 5 repetitions
    seconds = iter([0.5, 2.0, 0.25, 0.4, 4.0, 0.5, 0.2, 0.1, 0.3, 0.125, 0.4])
    monkeypatch.setattr(bench, "timed", lambda device, work: next(seconds))
    result = bench.main(["--params", str(REPO / "params.yaml"), "--steps", "2", "--rounds", "2", "--batch-size",
                         "16", "--precision", "fp32"])
    assert next(seconds, None) is None  # every timing used
    images = 16 * 2
    rates = {"project": images / 0.4, "reference": images / 2.0, "ceiling": images / 0.25}  # 80, 16, 128 /s
    peak = 2 * 2048 ** 3 / 0.1  # FLOP/s of the fastest product
    assert {mode: result[f"{mode}_images_per_s"] for mode in rates} == {"project": 80.0, "reference": 16.0,
                                                                        "ceiling": 128.0}
    assert result["project_vs_reference"] == 5.0 and result["project_vs_ceiling"] == 0.625
    assert result["gflops_per_image"] == 3.0 and result["matmul_tflop_per_s"] == round(peak / 1e12, 4) == 0.1718
    for mode, rate in rates.items():
        assert result[f"{mode}_tflop_per_s"] == round(rate * 3e9 / 1e12, 4)
        assert result[f"{mode}_mfu"] == round(rate * 3e9 / peak, 4)
    assert (result["project_tflop_per_s"], result["project_mfu"]) == (0.24, 1.397)  # 80 * 3e9; / 1.718e11


def test_timed_measures_the_work_between_two_clock_readings(monkeypatch):
    clock, done = iter([10.0, 12.5]), []
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(clock))
    assert bench.timed(CPU, lambda: done.append(1)) == 2.5 and done == [1]


def test_the_report_s_arithmetic_and_its_rounding_on_awkward_figures():
    rates = {"project": 1234.56789, "reference": 345.678912, "ceiling": 2345.67891}
    assert bench.speed_figures(rates, 1.23456789e9, 9.87654321e12) == {
        "project_images_per_s": 1234.6, "reference_images_per_s": 345.7, "ceiling_images_per_s": 2345.7,
        "project_vs_reference": 3.571, "project_vs_ceiling": 0.526, "gflops_per_image": 1.2346,
        "project_tflop_per_s": 1.5242, "reference_tflop_per_s": 0.4268, "ceiling_tflop_per_s": 2.8959,
        "matmul_tflop_per_s": 9.8765, "project_mfu": 0.1543, "reference_mfu": 0.0432, "ceiling_mfu": 0.2932}


def test_the_matrix_product_rate_is_2n3_over_the_fastest_repetition_of_n_by_n_in_the_precision(monkeypatch):
    """8192 on a GPU (a CUDA device object suffices: the tensors are stubbed), 2048 on a CPU."""
    made, products = [], []
    monkeypatch.setattr(bench.torch, "randn", lambda *size, device=None: made.append((size, device)) or
                        torch.ones(2, 2))
    seconds = iter([0.5, 0.25, 0.4, 2.0])

    def timed(device, work):
        products.append((device, work()))
        return next(seconds)
    monkeypatch.setattr(bench, "timed", timed)
    gpu = torch.device("cuda")
    assert bench.matmul_flops_per_s(gpu, "bf16", reps=3) == 2 * 8192 ** 3 / 0.25
    assert made == [((8192, 8192), gpu)] * 2 and [device for device, _ in products] == [gpu] * 3
    assert all(p.dtype == torch.bfloat16 and torch.equal(p.float(), torch.full((2, 2), 2.0)) for _, p in products)
    assert bench.matmul_flops_per_s(CPU, "fp32", reps=1) == 2 * 2048 ** 3 / 2.0
    assert made[-1] == ((2048, 2048), CPU) and products[-1][1].dtype == torch.float32


def test_measure_warms_each_mode_then_keeps_each_modes_best_round(monkeypatch):
    calls = []
    for mode in ["project", "reference", "ceiling"]:
        monkeypatch.setattr(bench, f"{mode}_runner", lambda args, device, mode=mode: calls.append(
            (mode, args, device)) or (lambda steps: calls.append((mode, steps))))
    seconds = iter([10.0, 4.0, 30.0, 20.0, 5.0, 60.0])  # round 1, then round 2: project, reference, ceiling

    def timed(device, work):
        calls.append(("timed", device))
        work()
        return next(seconds)
    monkeypatch.setattr(bench, "timed", timed)
    args = argparse.Namespace(recipe=argparse.Namespace(batch_size=2), steps=3, warmup=1, rounds=2)
    # 6 images a round: the best of 0.6 and 0.3 images/s, of 1.5 and 1.2, of 0.2 and 0.1 (below 1 image/s)
    assert bench.measure(args, "DEV") == {"project": 0.6, "reference": 1.5, "ceiling": 0.2}
    built = [(mode, args, "DEV") for mode in ["project", "reference", "ceiling"]]
    warm = [("project", 1), ("reference", 1), ("ceiling", 1)]
    measured = [call for mode in ["project", "reference", "ceiling"] for call in [("timed", "DEV"), (mode, 3)]]
    assert calls == built + warm + measured * 2


def test_variants_are_measured_side_by_side_each_with_its_own_recipe(monkeypatch, capsys):
    """--variants final fast: the project's step of the study's recipe (Adam) and of fast's (Muon, its own
    learning rates and epochs), in alternating rounds; the command line's model and batch override both."""
    built = []

    def spy_optimizer(model, recipe):
        built.append((recipe, make_optimizer(model, recipe)))
        return built[-1][1]

    make_optimizer = training.make_optimizer
    monkeypatch.setattr(training, "make_optimizer", spy_optimizer)
    result = bench.main(["--params", str(REPO / "params.yaml"), *TINY, "--precision", "fp32", "--variants", "final",
                         "fast"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    assert list(result["variants"]) == ["final", "fast"]
    final, fast = result["variants"]["final"], result["variants"]["fast"]
    assert (final["optimizer"], fast["optimizer"]) == ("adam", "muon") and final["vs_first"] == 1.0
    # the ratio of the unrounded rates
    assert fast["vs_first"] == pytest.approx(fast["images_per_s"] / final["images_per_s"], rel=0.01)
    assert all(v["widths"] == [8, 16] and v["batch_size"] == 16 and v["precision"] == "fp32"
               for v in result["variants"].values())
    (adam_recipe, adam), (muon_recipe, muon) = built
    assert isinstance(adam, torch.optim.Adam) and adam_recipe.max_lr == 0.01
    assert adam_recipe.epochs == muon_recipe.epochs == 3  # OneCycle over the 3 steps run, an epoch each
    # fast's peaks: Muon's filters at muon_lr, SGD's BatchNorm and head at max_lr
    assert type(muon).__name__ == "Muon" and [g["max_lr"] for g in muon.param_groups] == [0.1, 0.2]
    assert muon_recipe.label_smoothing == 0.2 and muon_recipe.flip == "alternating"


def test_an_unknown_variant_is_a_one_line_error_naming_the_known_ones():
    with pytest.raises(UserError, match=r"^--variants: unknown variant nope \(known: final, .*, fast\)$"):
        bench.main(["--params", str(REPO / "params.yaml"), *TINY, "--variants", "final", "nope"])


def test_the_variants_report_is_each_rate_and_its_ratio_to_the_first():
    assert bench.variant_figures({"final": 200.0, "fast": 187.654321}) == {
        "final": {"images_per_s": 200.0, "vs_first": 1.0}, "fast": {"images_per_s": 187.7, "vs_first": 0.938}}


def test_a_variant_s_keys_are_checked_as_the_stages_check_them():
    args = bench.parse_args(["--params", str(REPO / "params.yaml"), "--batch-size", "32"])
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    setting = bench.variant_settings(args, params, {"train.optimizer": "muon", "model.widths": [8, 16, 32, 64]})
    assert setting.recipe.optimizer == "muon" and setting.widths == [8, 16, 32, 64] and setting.recipe.batch_size == 32
    with pytest.raises(UserError, match=r"train\.optimizer = 'lion' must be "):
        bench.variant_settings(args, params, {"train.optimizer": "lion"})
