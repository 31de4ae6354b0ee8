"""Stage train: the study's recipe (the `train` params) on the `model` params.

Writes models/model.pt (weights, architecture, normalization), models/summary.txt (the layer table), through
DVCLive metrics/train/ (per-epoch curves, the last epoch's values), and metrics/train/run.json (parameters,
training time, images/s). After every epoch it saves models/checkpoint.pt, from which a rerun with the same
params, data and code resumes (see resume.py)."""
import copy
import io
import sys
import time
from contextlib import redirect_stdout
from dataclasses import replace

import torch
from torchsummary import summary
from tqdm import tqdm

from . import devices, distributed
from .cifar10 import load_split, read_classes
from .live import log_epoch, open_log
from .model import build_model, count_parameters, save_model
from .params import Recipe, System, load_params
from .precision import resolve_precision
from .resume import CHECKPOINT_FILE, Progress, StopSignals, fingerprint, load_checkpoint, save_checkpoint
from .training import Data, make_trainer, train_epoch, validation_scores
from .workspace import (
    BATCHES_DIR,
    MODEL_FILE,
    RUN_METRICS_FILE,
    STATS_FILE,
    SUMMARY_FILE,
    read_json,
    run,
    write_json,
    write_text,
)


def main(argv=None):
    """Check everything the run needs, then train here or, for several processes, launch them.

    With train.nproc * train.nnodes > 1 this first process is only the launcher: it claims the node's GPUs,
    then torchrun starts `python -m stages.train` once per rank, and every rank comes back through main(),
    passes the same checks (cheap, and each rank needs their results) and, being under torchrun, trains."""
    params = load_params()
    recipe, system = Recipe.from_params(params), System.from_params(params)
    node = distributed.node_rank(argv, recipe)
    torch.manual_seed(recipe.seed)
    model = build_model(**params["model"])  # the budget is checked before any work
    stats = read_json(STATS_FILE, "stats")
    classes = read_classes(BATCHES_DIR)
    if distributed.under_torchrun():  # a rank: its launcher holds the GPUs
        device, claim = devices.rank_device(system.device), None
    else:
        device, claim = devices.choose_device(system.device, recipe.nproc)
    distributed.check(recipe, device)
    recipe = replace(recipe, precision=resolve_precision(recipe.precision, device))  # an unsupported one: an error
    if distributed.needs_launch(recipe):
        distributed.launch(recipe, system, node, "stages.train", devices.launch_environment(claim))
    else:
        train(params, recipe, system, model, stats, classes, device, claim)


def train(params, recipe, system, model, stats, classes, device, claim):
    """This process's training, the only one or one rank of several: every epoch logged and checkpointed,
    then the run's metrics and (rank 0) the model."""
    # The data, read before the ranks meet (a bad batch stops each rank alone, in one line), then on the device
    splits = load_split(BATCHES_DIR, "train"), load_split(BATCHES_DIR, "test")
    context = distributed.setup(device)  # under torchrun: joins the process group, takes cuda:LOCAL_RANK
    torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick its fastest kernels
    data = Data.on_device(*splits, stats, context.device)
    if context.is_main:
        write_text(SUMMARY_FILE, layer_table(model))
    num_params = count_parameters(model)

    # Build the run, or restore it from the checkpoint of an interrupted one
    trainer = make_trainer(model, recipe, context, system.compile, len(data.labels))
    run_fingerprint = fingerprint(params, context.device)
    progress = restore(trainer, run_fingerprint, recipe)
    where = devices.describe(context.device, claim)
    print(f"training {num_params:,} parameters on {where} in {recipe.precision}"
          f"{', compiled' if system.compile else ''}"
          f"{f', {context.world_size} processes' if context.world_size > 1 else ''}: "
          f"{len(data.labels)} train / {len(data.test_labels)} test images")

    # Train, log and save one epoch at a time
    start, wall_before = time.perf_counter(), progress.wall_seconds
    stopped = StopSignals(progress.stop_message)
    with open_log(context) as live, stopped:
        for row in progress.history:  # the finished epochs' curves, as the interrupted run logged them
            log_epoch(live, row)
        for epoch in range(progress.finished + 1, recipe.epochs + 1):
            row = run_epoch(trainer, data, recipe, context, progress, epoch)
            log_epoch(live, row)
            progress.wall_seconds = wall_before + time.perf_counter() - start
            with stopped.deferred():  # a signal now waits until this epoch is saved
                if context.is_main:
                    save_checkpoint(CHECKPOINT_FILE, run_fingerprint, progress, trainer)
        progress.wall_seconds = wall_before + time.perf_counter() - start
        live.log_metric("best_val_acc", progress.best_val_acc, plot=False)
        live.summary["device"] = where  # which GPU (or the CPU) trained it, beside the last epoch's values

    # The run's metrics and the model
    if context.is_main:
        write_json(RUN_METRICS_FILE, run_metrics(progress, num_params, len(data.labels)))
        # the unwrapped model (the same state_dict keys as on one process), or its EMA when on
        save_model(MODEL_FILE, trainer.result, stats, classes, recipe.precision)
        CHECKPOINT_FILE.unlink(missing_ok=True)  # done: a later forced rerun trains afresh
    print(f"final val acc {progress.history[-1]['val/acc']:.4f}, best {progress.best_val_acc:.4f}, "
          f"{progress.wall_seconds:.0f} s; saved {MODEL_FILE}")


def restore(trainer, run_fingerprint, recipe):
    """The Progress of the interrupted run the checkpoint holds (the trainer restored to it), or a fresh one.
    Every rank restores the same state from models/, which a single node's ranks share; rank 0 alone saves
    it. Other nodes do not have it, so a run over several nodes always starts afresh."""
    progress = None if recipe.nnodes > 1 else load_checkpoint(CHECKPOINT_FILE, run_fingerprint, trainer)
    if progress:
        print(f"resuming from {CHECKPOINT_FILE} after epoch {progress.finished}/{recipe.epochs}")
        return progress
    return Progress(recipe.epochs)


def run_epoch(trainer, data, recipe, context, progress, epoch):
    """Train one epoch, validate, and record it in `progress`; returns its row of the curves."""
    epoch_start = time.perf_counter()
    train_loss, train_acc = train_epoch(trainer, data, recipe, context, desc=f"epoch {epoch}/{recipe.epochs}")
    train_loss, train_acc = train_loss.item(), train_acc.item()  # one host sync per epoch
    progress.train_seconds += time.perf_counter() - epoch_start
    val_loss, val_acc = (v.item() for v in validation_scores(trainer, data, recipe, context))
    lr = trainer.scheduler.get_last_lr()[0]
    row = {"step": epoch, "train/loss": train_loss, "train/acc": train_acc, "val/loss": val_loss,
           "val/acc": val_acc, "lr": lr}
    tqdm.write(f"epoch {epoch}/{recipe.epochs}: train loss {train_loss:.4f} acc {train_acc:.4f} | "
               f"val loss {val_loss:.4f} acc {val_acc:.4f} | lr {lr:.2e}")  # rank > 0: stdout is silenced
    progress.finished = epoch
    progress.history.append(row)
    progress.best_val_acc = max(progress.best_val_acc, val_acc)
    return row


def run_metrics(progress, num_params, num_images):
    """What `dvc exp show` compares runs by, besides test accuracy: their size, training time and speed."""
    return {"params": num_params, "wall_time_s": round(progress.wall_seconds, 2),
            "images_per_s": round(progress.finished * num_images / progress.train_seconds, 1)}


def layer_table(model):
    """torchsummary's table, run on a copy so the forward pass leaves the BatchNorm statistics alone."""
    out = io.StringIO()
    with redirect_stdout(out):
        summary(copy.deepcopy(model).cpu(), input_size=(3, 32, 32), device="cpu")
    return f"ResNet {model.config}\n{out.getvalue()}"


if __name__ == "__main__":
    run(main, sys.argv[1:])
