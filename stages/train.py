"""Stage train: the study's recipe on the `model` and `train` params.

Writes models/model.pt (weights, architecture, normalization), models/summary.txt (the layer table) and,
through DVCLive, metrics/train/ (per-epoch curves and the training summary). After every epoch it saves
models/checkpoint.pt, from which a rerun with the same params, data and code resumes (see resume.py)."""
import copy
import io
import sys
import time
from contextlib import redirect_stdout

import torch
from dvclive import Live
from torchsummary import summary
from tqdm import tqdm

from . import distributed
from .augment import Normalizer, reflect_pad
from .cifar10 import load_split, read_classes
from .model import build_model, count_parameters, save_model
from .params import load_params
from .resume import CHECKPOINT_FILE, StopSignals, fingerprint, load_checkpoint, save_checkpoint
from .training import (
    make_optimizer,
    make_scheduler,
    pick_device,
    prepare_model,
    resolve_precision,
    steps_per_epoch,
    train_epoch,
    validate,
)
from .workspace import BATCHES_DIR, MODEL_FILE, STATS_FILE, SUMMARY_FILE, TRAIN_LOG_DIR, read_json, run, write_text

PAD = 4  # reflect-pad 4, then random 32x32 crops


def layer_table(model):
    """torchsummary's table, run on a copy so the forward pass leaves the BatchNorm statistics alone."""
    out = io.StringIO()
    with redirect_stdout(out):
        summary(copy.deepcopy(model).cpu(), input_size=(3, 32, 32), device="cpu")
    return f"ResNet {model.config}\n{out.getvalue()}"


def log_epoch(live, row):
    """One epoch's point on every DVCLive curve (the step is the epoch)."""
    live.step = row["step"]
    for name, value in row.items():
        if name != "step":
            live.log_metric(name, value)
    live.next_step()


def main(argv=None):
    params = load_params()
    arch, train = params["model"], params["train"]
    node = distributed.node_rank(argv, train)
    torch.manual_seed(train["seed"])
    model = build_model(arch["blocks"], arch["widths"], arch["max_params"])  # the budget is checked first
    num_params = count_parameters(model)
    stats = read_json(STATS_FILE, "stats")
    classes = read_classes(BATCHES_DIR)
    distributed.check(train, pick_device())
    if distributed.needs_launch(train):  # train.nproc * train.nnodes > 1: this process starts the ranks
        distributed.launch(train, node, "stages.train")
        return
    context = distributed.setup(pick_device())  # under torchrun: joins the process group
    rank, world_size = context.rank, context.world_size
    train_images, train_labels = load_split(BATCHES_DIR, "train")
    test_images, test_labels = load_split(BATCHES_DIR, "test")
    if context.is_main:
        write_text(SUMMARY_FILE, layer_table(model))

    device = context.device
    train = {**train, "precision": resolve_precision(train["precision"], device)}
    torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick its fastest kernels
    # The whole data set stays on the device as uint8; the reflect padding never changes, so pad once.
    padded = reflect_pad(train_images.to(device), PAD)
    train_labels, test_images, test_labels = train_labels.to(device), test_images.to(device), test_labels.to(device)
    normalize = Normalizer(stats["mean"], stats["std"], device)
    model, step_model = prepare_model(model, device, train["compile"],
                                      lambda m: distributed.wrap(m, context, train["sync_bn"]))
    eval_model = step_model if world_size == 1 else model  # DDP's forward is for the training steps
    optimizer = make_optimizer(model, train)
    scheduler = make_scheduler(optimizer, train, steps_per_epoch(len(train_labels), train["batch_size"]))
    generator = torch.Generator(device).manual_seed(train["seed"])
    print(f"training {num_params:,} parameters on {device} in {train['precision']}"
          f"{', compiled' if train['compile'] else ''}{f', {world_size} processes' if world_size > 1 else ''}: "
          f"{len(train_labels)} train / {len(test_labels)} test images")

    run_fingerprint = fingerprint(params, device)
    # Every rank restores the same state from models/, which a single node's ranks share; rank 0 alone saves
    # it. Other nodes do not have it, so a run over several nodes always starts afresh.
    progress = None if train["nnodes"] > 1 else load_checkpoint(CHECKPOINT_FILE, run_fingerprint, model, optimizer,
                                                                 scheduler, generator)
    if progress:
        print(f"resuming from {CHECKPOINT_FILE} after epoch {progress['epoch']}/{train['epochs']}")
    else:
        progress = {"epoch": 0, "history": [], "best_val_acc": 0.0, "train_seconds": 0.0, "wall_seconds": 0.0}

    start, wall_before = time.perf_counter(), progress["wall_seconds"]
    stopped = StopSignals(lambda: f"after epoch {progress['epoch']}/{train['epochs']}; " + (
        f"{CHECKPOINT_FILE} holds it: rerun to resume" if progress["epoch"] else "nothing to resume"))
    live = Live(dir=str(TRAIN_LOG_DIR), dvcyaml=False, save_dvc_exp=False) if context.is_main else distributed.NoLive()
    with live, stopped:
        for row in progress["history"]:  # the finished epochs' curves, as the interrupted run logged them
            log_epoch(live, row)
        for epoch in range(progress["epoch"] + 1, train["epochs"] + 1):
            epoch_start = time.perf_counter()
            train_loss, train_acc = train_epoch(step_model, optimizer, scheduler, padded, train_labels, normalize,
                                                train, generator, desc=f"epoch {epoch}/{train['epochs']}",
                                                rank=rank, world_size=world_size)
            train_loss, train_acc = train_loss.item(), train_acc.item()  # one host sync per epoch
            progress["train_seconds"] += time.perf_counter() - epoch_start
            val_loss, val_acc = validate(eval_model, test_images, test_labels, normalize, train["batch_size"],
                                         train["precision"], rank, world_size)
            val_loss, val_acc = val_loss.item(), val_acc.item()
            progress["best_val_acc"] = max(progress["best_val_acc"], val_acc)
            lr = scheduler.get_last_lr()[0]

            row = {"step": epoch, "train/loss": train_loss, "train/acc": train_acc, "val/loss": val_loss,
                   "val/acc": val_acc, "lr": lr}
            log_epoch(live, row)
            tqdm.write(f"epoch {epoch}/{train['epochs']}: train loss {train_loss:.4f} acc {train_acc:.4f} | "
                       f"val loss {val_loss:.4f} acc {val_acc:.4f} | lr {lr:.2e}")  # rank > 0: stdout is silenced
            progress["epoch"] = epoch
            progress["history"].append(row)
            progress["wall_seconds"] = wall_before + time.perf_counter() - start
            with stopped.deferred():  # a signal now waits until this epoch is saved
                if context.is_main:
                    save_checkpoint(CHECKPOINT_FILE, run_fingerprint, progress, model, optimizer, scheduler,
                                    generator)

        wall_seconds = wall_before + time.perf_counter() - start
        summary_values = {"params": num_params, "best_val_acc": progress["best_val_acc"],
                          "wall_time_s": round(wall_seconds, 2),
                          "images_per_s": round(train["epochs"] * len(train_labels) / progress["train_seconds"], 1)}
        for name, value in summary_values.items():
            live.log_metric(name, value, plot=False)
    if context.is_main:  # the unwrapped model: the same state_dict keys as on one process
        save_model(MODEL_FILE, model, {"mean": stats["mean"], "std": stats["std"]}, classes, train["precision"])
        CHECKPOINT_FILE.unlink(missing_ok=True)  # done: a later forced rerun trains afresh
    print(f"final val acc {progress['history'][-1]['val/acc']:.4f}, best {progress['best_val_acc']:.4f}, "
          f"{wall_seconds:.0f} s; saved {MODEL_FILE}")


if __name__ == "__main__":
    run(lambda: main(sys.argv[1:]))
