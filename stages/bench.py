"""Training-speed benchmark: python -m stages.bench [--steps N] [--batch-size B] [--blocks ...] [--widths ...]

Measures, in one run on one machine, with the same model, batch, optimizer and clipping:
  1. project:   the train stage's own step (training.train_epoch: on-device uint8 data, batched crop/flip,
                normalization, autocast, Adam, OneCycle, clipping), images/s;
  2. reference: the common way: a Dataset of PIL images, torchvision RandomCrop(32, padding=4, reflect),
                RandomHorizontalFlip, ToTensor, Normalize, a DataLoader with workers, fp32, NCHW;
  3. ceiling:   forward + backward + optimizer step on one preloaded batch, in the fastest mode
                (channels_last, the project's precision, compiled if asked): the hardware's limit.
Each mode is warmed up once, then measured in alternating rounds (best round kept). Prints one JSON object
with the three rates and the ratios project/reference and project/ceiling.
Not a DVC stage: it measures the machine, not the model."""
import argparse
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision import transforms

from .augment import Normalizer, reflect_pad
from .model import ResNet
from .training import (
    autocast,
    make_optimizer,
    make_scheduler,
    pick_device,
    prepare_model,
    resolve_precision,
    train_epoch,
)

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def recipe(args):
    """The study's train params, with the benchmark's batch size, precision and compile."""
    return {"epochs": 1, "batch_size": args.batch_size, "max_lr": 0.01, "warmup_fraction": 0.3,
            "weight_decay": 1e-4, "grad_clip": 0.1, "seed": 0, "precision": args.precision, "compile": args.compile}


def random_images(n, seed=0):
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def total_steps(args):
    return args.warmup + args.rounds * args.steps


def timed(device, work):
    """Seconds `work()` takes, the device's queue included."""
    synchronize(device)
    start = time.perf_counter()
    work()
    synchronize(device)
    return time.perf_counter() - start


def project_runner(args, device):
    """Runs `steps` steps of training.train_epoch, the train stage's own loop (one epoch of steps batches)."""
    train = recipe(args)
    model, step_model = prepare_model(ResNet(args.blocks, args.widths), device, args.compile)
    optimizer = make_optimizer(model, train)
    scheduler = make_scheduler(optimizer, train, steps_per_epoch=total_steps(args))
    normalize = Normalizer(MEAN, STD, device)
    generator = torch.Generator(device).manual_seed(0)
    padded = reflect_pad(random_images(args.batch_size * args.steps).to(device), 4)
    labels = torch.randint(0, 10, (len(padded),), device=device, generator=generator)

    def run(steps):
        n = args.batch_size * steps
        loss, _ = train_epoch(step_model, optimizer, scheduler, padded[:n], labels[:n], normalize, train,
                              generator, desc="project")
        loss.item()  # the epoch's one host sync
    return run


class PILDataset(torch.utils.data.Dataset):
    def __init__(self, images, labels, transform):
        self.images = [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in images]
        self.labels, self.transform = labels.tolist(), transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(self.images[i]), self.labels[i]


def reference_runner(args, device):
    """Runs `steps` steps the common way: PIL + torchvision transforms in DataLoader workers, fp32, NCHW,
    the loss read every step."""
    transform = transforms.Compose([
        transforms.RandomCrop(32, padding=4, padding_mode="reflect"), transforms.RandomHorizontalFlip(),
        transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    n = args.batch_size * args.steps
    dataset = PILDataset(random_images(n), torch.randint(0, 10, (n,)), transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         num_workers=args.workers, persistent_workers=args.workers > 0,
                                         pin_memory=device.type == "cuda")
    model = ResNet(args.blocks, args.widths).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=1e-4)
    scheduler = make_scheduler(optimizer, recipe(args), steps_per_epoch=total_steps(args))
    model.train()

    def run(steps):
        for _, (x, y) in zip(range(steps), loader):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_value_(model.parameters(), 0.1)
            optimizer.step()
            scheduler.step()
            loss.item()
    return run


def ceiling_runner(args, device):
    """Runs `steps` forward + backward + optimizer steps on one preloaded, normalized batch: no data work,
    no clipping, no schedule; channels_last, the project's precision, compiled if asked."""
    model, step_model = prepare_model(ResNet(args.blocks, args.widths), device, args.compile)
    optimizer = make_optimizer(model, recipe(args))
    x = torch.randn(args.batch_size, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    model.train()

    def run(steps):
        for _ in range(steps):
            with autocast(device, args.precision):
                loss = F.cross_entropy(step_model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return run


def measure(args, device):
    """images/s of each mode: warmed up once, then measured in `rounds` alternating rounds, best round kept,
    so a machine whose speed drifts (a shared or throttled one) does not favour the mode measured first."""
    runners = {"project": project_runner(args, device), "reference": reference_runner(args, device),
               "ceiling": ceiling_runner(args, device)}
    for run in runners.values():
        run(args.warmup)
    best = dict.fromkeys(runners, 0.0)
    for _ in range(args.rounds):
        for mode, run in runners.items():
            best[mode] = max(best[mode], args.batch_size * args.steps / timed(device, lambda: run(args.steps)))
    return best


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="measured steps per mode and round (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured steps per mode first (default 1)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating measured rounds, best kept (default 2)")
    parser.add_argument("--batch-size", type=int, default=400)
    parser.add_argument("--blocks", type=int, nargs="+", default=[2, 1, 1, 1])
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    parser.add_argument("--compile", action="store_true", help="torch.compile the project's and the ceiling's model")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="DataLoader workers of the reference loop (default: min(4, CPUs))")
    args = parser.parse_args(argv)
    if len(args.blocks) != len(args.widths) or min(args.steps, args.warmup, args.rounds, args.batch_size) < 1:
        parser.error("--blocks and --widths need the same length; "
                     "--steps, --warmup, --rounds and --batch-size must be >= 1")
    device = pick_device()
    torch.backends.cudnn.benchmark = True
    args.precision = resolve_precision(args.precision, device)
    torch.manual_seed(0)
    np.random.seed(0)
    rates = measure(args, device)
    project, reference, ceiling = rates["project"], rates["reference"], rates["ceiling"]
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu ({torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()})"
    result = {
        "device": name, "precision": args.precision, "compile": args.compile, "torch": torch.__version__,
        "blocks": args.blocks, "widths": args.widths, "batch_size": args.batch_size,
        "steps": args.steps, "rounds": args.rounds,
        "project_images_per_s": round(project, 1), "reference_images_per_s": round(reference, 1),
        "ceiling_images_per_s": round(ceiling, 1),
        "project_vs_reference": round(project / reference, 3), "project_vs_ceiling": round(project / ceiling, 3),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
