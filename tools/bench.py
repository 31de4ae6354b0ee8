"""Training-speed benchmark: python -m tools.bench [--params FILE] [--steps N] [--batch-size B] [...]

Measures, in one run on one machine, with the same model, batch, optimizer and clipping:
  1. project:   the train stage's own step (training.train_epoch: on-device uint8 data, batched crop/flip,
                normalization, autocast, Adam, OneCycle, clipping), images/s;
  2. reference: the common way: a Dataset of PIL images, torchvision RandomCrop(32, padding=4, reflect),
                RandomHorizontalFlip, ToTensor, Normalize, a DataLoader with workers, fp32, NCHW;
  3. ceiling:   forward + backward + optimizer step on one preloaded batch, in the fastest mode
                (channels_last, the project's precision, compiled if asked).
The recipe (model, batch size, learning rate, weight decay, clipping, precision, compile) is params.yaml's,
read and checked as the stages read it; the options override it. Each mode is warmed up once, then measured
in alternating rounds (best round kept). Prints one JSON object with the three rates, their ratios, how close
each comes to the hardware (the model's FLOPs per training image, counted on one real step, times the rate,
against a dense matrix product's rate in the same precision measured in the same run: the model-FLOPs
utilisation), the device and the recipe measured; --profile adds torch.profiler's top operators of one step.
With --variants NAME [NAME ...], it measures instead the project's step of each named tools.sweep variant
(e.g. `final fast`: the study's recipe and the fast preset, each its keys over params.yaml's, optimizer and
model included), in the same alternating rounds, and prints each one's images/s and its ratio to the first:
what an epoch of each costs on this machine, side by side.
Not a DVC stage: it measures the machine, not the model."""
import argparse
import json
import os
import sys
import time
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision import transforms

from cifar import training
from cifar.devices import System, choose_device
from cifar.distributed import Context
from cifar.model import ModelParams, ResNet
from cifar.params import PARAMS_FILE, check_section, load_params, read_params
from cifar.precision import DTYPES, autocast, resolve_precision
from cifar.training import PAD, Recipe, make_optimizer, make_scheduler, prepare_model
from cifar.workspace import UserError, command

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def random_images(n, seed=0):
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def total_steps(bench):
    return bench.warmup + bench.rounds * bench.steps


def timed(device, work):
    """Seconds `work()` takes, the device's queue included."""
    synchronize(device)
    start = time.perf_counter()
    work()
    synchronize(device)
    return time.perf_counter() - start


def project_runner(bench, device):
    """Runs `steps` steps of training.train_epoch, the train stage's own loop (one epoch of `steps` batches)."""
    recipe = bench.recipe
    context = Context(device)
    # one batch per epoch and an epoch per step, so OneCycle spans exactly the steps the benchmark runs
    trainer = training.make_trainer(ResNet(bench.blocks, bench.widths),
                                    recipe.model_copy(update={"epochs": total_steps(bench)}), context, bench.compiled,
                                    num_images=recipe.batch_size)
    images = random_images(recipe.batch_size * bench.steps)
    labels = torch.randint(0, 10, (len(images),), generator=torch.Generator().manual_seed(1))
    data = training.Data.on_device((images, labels), (images[:1], labels[:1]), {"mean": MEAN, "std": STD}, device)

    def train_steps(steps):
        n = recipe.batch_size * steps
        part = replace(data, padded=data.padded[:n], labels=data.labels[:n])
        trainer.flips = None  # alternating flips: a call may train more images than the last, so each starts afresh
        loss, _ = training.train_epoch(trainer, part, recipe.model_copy(update={"epochs": 1}), context, desc="project")
        loss.item()  # the epoch's one host sync
    return train_steps


class PILDataset(torch.utils.data.Dataset):
    def __init__(self, images, labels, transform):
        self.images = [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in images]
        self.labels, self.transform = labels.tolist(), transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(self.images[i]), self.labels[i]


def reference_runner(bench, device):
    """Runs `steps` steps the common way: PIL + torchvision transforms in DataLoader workers, fp32, NCHW,
    the loss read every step."""
    recipe = bench.recipe
    transform = transforms.Compose([
        transforms.RandomCrop(32, padding=PAD, padding_mode="reflect"), transforms.RandomHorizontalFlip(),
        transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    n = recipe.batch_size * bench.steps
    dataset = PILDataset(random_images(n), torch.randint(0, 10, (n,)), transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=recipe.batch_size, shuffle=True, drop_last=True,
                                         num_workers=bench.workers, persistent_workers=bench.workers > 0,
                                         pin_memory=device.type == "cuda")
    model = ResNet(bench.blocks, bench.widths).to(device)
    optimizer = make_optimizer(model, recipe)  # the recipe's: Adam or SGD, as the project's loop
    scheduler = make_scheduler(optimizer, recipe.model_copy(update={"epochs": total_steps(bench)}), steps_per_epoch=1)
    model.train()

    def train_steps(steps):
        for _, (x, y) in zip(range(steps), loader):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            if recipe.grad_clip:
                nn.utils.clip_grad_value_(model.parameters(), recipe.grad_clip)
            optimizer.step()
            scheduler.step()
            loss.item()
    return train_steps


def ceiling_runner(bench, device):
    """Runs `steps` forward + backward + optimizer steps on one preloaded, normalized batch: no data work,
    no clipping, no schedule; channels_last, the project's precision, compiled if asked."""
    recipe = bench.recipe
    model, step_model = prepare_model(ResNet(bench.blocks, bench.widths), device, bench.compiled)
    optimizer = make_optimizer(model, recipe)
    x = torch.randn(recipe.batch_size, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (recipe.batch_size,), device=device)
    model.train()

    def train_steps(steps):
        for _ in range(steps):
            with autocast(device, recipe.precision):
                loss = F.cross_entropy(step_model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return train_steps


def flops_per_image(bench, device):
    """FLOPs of one training step per image, forward and backward, as torch's FlopCounterMode counts them
    (matrix products and convolutions) on one real step of the model in the recipe's precision."""
    from torch.utils.flop_counter import FlopCounterMode

    batch = min(bench.recipe.batch_size, 32)  # the count is per image: a small batch gives the same
    model = ResNet(bench.blocks, bench.widths).to(device, memory_format=torch.channels_last).train()
    x = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)
    with FlopCounterMode(display=False) as counter:
        with autocast(device, bench.recipe.precision):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
    return counter.get_total_flops() / batch


def matmul_flops_per_s(device, precision, reps=5):
    """The device's dense matrix-product rate in `precision` (FLOP/s), measured here: square products large
    enough to be compute-bound (8192 on a GPU, 2048 on a CPU), the best of `reps`."""
    n = 8192 if device.type == "cuda" else 2048
    a, b = (torch.randn(n, n, device=device).to(DTYPES.get(precision, torch.float32)) for _ in range(2))
    a @ b  # warm up (cuBLAS/oneDNN pick their kernels)
    return 2 * n ** 3 / min(timed(device, lambda: a @ b) for _ in range(reps))


def profile_step(bench, device, rows=15):
    """torch.profiler's table of the operators one project step spends its time in, heaviest first."""
    from torch.profiler import ProfilerActivity, profile

    runner = project_runner(argparse.Namespace(**{**vars(bench), "warmup": 1, "rounds": 1, "steps": 1}), device)
    runner(1)  # warm
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        runner(1)
        synchronize(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return profiler.key_averages().table(sort_by=sort, row_limit=rows)


def modes(bench, device):
    """{mode: its runner} of the three ways of training the recipe that the report compares."""
    return {"project": project_runner(bench, device), "reference": reference_runner(bench, device),
            "ceiling": ceiling_runner(bench, device)}


def measure(bench, device, runners=None):
    """images/s of each runner (default: the three modes): warmed up once, then measured in `rounds`
    alternating rounds, best round kept, so a machine whose speed drifts (a shared or throttled one) does not
    favour the one measured first."""
    runners = modes(bench, device) if runners is None else runners
    for runner in runners.values():
        runner(bench.warmup)
    best = dict.fromkeys(runners, 0.0)
    images = bench.recipe.batch_size * bench.steps
    for _ in range(bench.rounds):
        for mode, runner in runners.items():
            best[mode] = max(best[mode], images / timed(device, lambda: runner(bench.steps)))
    return best


def speed_figures(rates, flops, peak):
    """The report's arithmetic: each mode's images/s (`rates`), the project's ratios to the other two, and how
    close each comes to the hardware: the model's FLOPs per image (`flops`) at its speed against a dense
    matrix product's FLOP/s (`peak`), the model-FLOPs utilisation."""
    return {
        **{f"{mode}_images_per_s": round(rate, 1) for mode, rate in rates.items()},
        "project_vs_reference": round(rates["project"] / rates["reference"], 3),
        "project_vs_ceiling": round(rates["project"] / rates["ceiling"], 3),
        "gflops_per_image": round(flops / 1e9, 4),
        **{f"{mode}_tflop_per_s": round(rate * flops / 1e12, 4) for mode, rate in rates.items()},
        "matmul_tflop_per_s": round(peak / 1e12, 4),
        **{f"{mode}_mfu": round(rate * flops / peak, 4) for mode, rate in rates.items()},
    }


def variant_settings(bench, params, variant):
    """The benchmark's settings for one tools.sweep variant: its keys set over the params file's (`params`,
    as read_params reads it) and checked as the stages check them, then the command line's options."""
    params = {section: dict(values or {}) for section, values in params.items()}
    for key, value in variant.items():
        section, name = key.split(".")
        params.setdefault(section, {})[name] = value
    source = f"{bench.params} with the variant's keys"
    model, recipe = (check_section(schema, params.get(schema.section), source) for schema in (ModelParams, Recipe))
    options = {"batch_size": bench.batch_size, "precision": bench.precision}
    return argparse.Namespace(**{
        **vars(bench), "recipe": Recipe(**recipe).model_copy(update={k: v for k, v in options.items() if v}),
        "blocks": bench.blocks_option or model["blocks"], "widths": bench.widths_option or model["widths"]})


def variant_figures(rates):
    """The --variants report: each variant's images/s and its ratio to the first's (> 1: faster)."""
    first = next(iter(rates.values()))
    return {name: {"images_per_s": round(rate, 1), "vs_first": round(rate / first, 3)} for name, rate in rates.items()}


def compare_variants(bench, device):
    """{variant: its settings' images/s through the project's step}, measured side by side."""
    from tools.sweep import study, variants

    known, params = variants(study(bench.params)), read_params(bench.params)
    unknown = [name for name in bench.variants if name not in known]
    if unknown:
        raise UserError(f"--variants: unknown variant {', '.join(unknown)} (known: {', '.join(known)})")
    settings = {name: variant_settings(bench, params, known[name]) for name in bench.variants}
    for setting in settings.values():
        setting.recipe = setting.recipe.model_copy(
            update={"precision": resolve_precision(setting.recipe.precision, device)})
    rates = measure(bench, device, {name: project_runner(setting, device) for name, setting in settings.items()})
    return rates, settings


def parse_args(argv):
    """The command line over params.yaml's recipe: options left out take the file's values."""
    parser = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default=str(PARAMS_FILE), help="the params file (default params.yaml)")
    parser.add_argument("--steps", type=int, default=5, help="measured steps per mode and round (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured steps per mode first (default 1)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating measured rounds, best kept (default 2)")
    parser.add_argument("--batch-size", type=int, help="default: train.batch_size")
    parser.add_argument("--blocks", type=int, nargs="+", help="default: model.blocks")
    parser.add_argument("--widths", type=int, nargs="+", help="default: model.widths")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], help="default: train.precision")
    parser.add_argument("--compile", dest="compiled", action=argparse.BooleanOptionalAction,
                        help="torch.compile the project's and the ceiling's model (default: system.compile)")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="DataLoader workers of the reference loop (default: min(4, CPUs))")
    parser.add_argument("--variants", nargs="+", metavar="NAME",
                        help="measure the project's step of these tools.sweep variants instead, side by side "
                             "(e.g. final fast), each with its own recipe and model")
    parser.add_argument("--profile", action="store_true",
                        help="also print, to stderr, torch.profiler's table of the top operators of one project step")
    args = parser.parse_args(argv)
    params = load_params(ModelParams, Recipe, System, path=args.params)
    overrides = {"batch_size": args.batch_size, "precision": args.precision}
    args.recipe = Recipe.from_params(params).model_copy(update={k: v for k, v in overrides.items() if v is not None})
    args.blocks_option, args.widths_option = args.blocks, args.widths  # what --variants overrides too
    args.blocks = args.blocks or params["model"]["blocks"]
    args.widths = args.widths or params["model"]["widths"]
    args.compiled = params["system"]["compile"] if args.compiled is None else args.compiled
    args.device = params["system"]["device"]
    if args.variants and args.profile:
        parser.error("--profile profiles params.yaml's recipe: leave it out with --variants")
    if len(args.blocks) != len(args.widths) or min(args.steps, args.warmup, args.rounds, args.recipe.batch_size) < 1:
        parser.error("--blocks and --widths need the same length; "
                     "--steps, --warmup, --rounds and --batch-size must be >= 1")
    return args


def describe(device):
    """(the device's name, its capability): the GPU's and its compute capability, or the CPU's threads and
    torch's CPU capability (AVX2, AVX512, ...)."""
    if device.type == "cuda":
        return (torch.cuda.get_device_name(device),
                "compute capability " + ".".join(map(str, torch.cuda.get_device_capability(device))))
    return f"cpu ({torch.get_num_threads()} threads)", torch.backends.cpu.get_cpu_capability()


def main(argv=None):
    bench = parse_args(argv)
    device, _claim = choose_device(bench.device)  # system.device, as the stages choose it
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    np.random.seed(0)
    name, capability = describe(device)
    machine = {"device": name, "capability": capability, "compile": bench.compiled, "torch": torch.__version__,
               "steps": bench.steps, "rounds": bench.rounds}
    if bench.variants:
        rates, settings = compare_variants(bench, device)
        result = {**machine, "variants": {
            name: {**figures, "precision": settings[name].recipe.precision, "blocks": settings[name].blocks,
                   "widths": settings[name].widths, "batch_size": settings[name].recipe.batch_size,
                   "optimizer": settings[name].recipe.optimizer}
            for name, figures in variant_figures(rates).items()}}
        print(json.dumps(result))
        return result
    bench.recipe = bench.recipe.model_copy(update={"precision": resolve_precision(bench.recipe.precision, device)})
    rates = measure(bench, device)
    flops = flops_per_image(bench, device)
    peak = matmul_flops_per_s(device, bench.recipe.precision)
    result = {
        **machine, "precision": bench.recipe.precision, "blocks": bench.blocks, "widths": bench.widths,
        "batch_size": bench.recipe.batch_size, **speed_figures(rates, flops, peak), "recipe": bench.recipe.model_dump(),
    }
    if bench.profile:
        print(profile_step(bench, device), file=sys.stderr)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    command(main)
