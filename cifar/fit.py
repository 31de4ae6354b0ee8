"""The train stage's run: one process's training (the only one, or one rank of several), every epoch scored,
logged and checkpointed, a progress line a person can read, then the run's metrics and the model."""
import copy
import io
import time
from contextlib import redirect_stdout

import torch
from torchsummary import summary
from tqdm import tqdm

from . import devices, distributed
from .augment import TTA_MODES
from .data import load_split, training_split
from .live import log_epoch, open_log
from .model import count_parameters, save_model
from .resume import Progress, StopSignals, checkpoint_path, fingerprint, load_checkpoint, save_checkpoint
from .training import Data, ema_batchnorm, make_trainer, monitor_scores, score, train_epoch
from .trial import Pruned
from .workspace import (
    BATCHES_DIR,
    MODEL_FILE,
    RUN_METRICS_FILE,
    STATS_FILE,
    SUMMARY_FILE,
    UserError,
    read_json,
    write_json,
    write_text,
)

LONG_CPU_RUN_S = 3600  # past this estimate on a CPU, point to the quick run


def fit(model_params, recipe, system, model, stats, classes, device, claim, node=0, trial=None, *, split):
    """Train `model` by `recipe` (its precision resolved) on `device` with the data `split` (split_data), as
    one rank of node `node` under torchrun; the main rank writes the model and metrics. `trial`: the search
    trial this run is (cifar.trial), or None. With held-out validation images, the final model is also scored
    on them once with every test-time augmentation (score_tta_modes), so evaluate.tta is chosen afterwards."""
    train, monitor, monitor_split = split
    run_fingerprint = fingerprint(model_params, recipe, device)
    # under torchrun: joins the process group, takes cuda:LOCAL_RANK, checks every node's fingerprint is node 0's
    context = distributed.setup(device, node, run_fingerprint)
    # fixed input shapes: let cuDNN pick its fastest kernels (which may differ from run to run: on a GPU, a
    # resumed run is not bit for bit the uninterrupted one)
    torch.backends.cudnn.benchmark = True
    data = Data.on_device(train, monitor, stats, context.device, monitor_split)
    if context.is_main:
        write_text(SUMMARY_FILE, layer_table(model))
    num_params = count_parameters(model)

    # Build the run, or restore it from the checkpoint of an interrupted one
    trainer = make_trainer(model, recipe, context, system.compile, len(data.labels))
    # a search trial's own key: two trials of the same params at once never share (or resume) one file
    checkpoint = checkpoint_path(run_fingerprint, trial.checkpoint_key if trial is not None else None)
    progress = restore(trainer, checkpoint, run_fingerprint, recipe, context)
    where = devices.describe(context.device, claim)
    print(f"training {num_params:,} parameters on {where} in {recipe.precision}"
          f"{', compiled' if system.compile else ''}"
          f"{f', {context.world_size} processes' if context.world_size > 1 else ''}: "
          f"{len(data.labels)} train / {len(data.monitor_labels)} {data.monitor_split} images, "
          f"{recipe.epochs} epochs", flush=True)

    # Train, log and save one epoch at a time
    start, wall_before = time.perf_counter(), progress.wall_seconds
    stopped = StopSignals(lambda: progress.stop_message(checkpoint))
    run_bar = tqdm(total=recipe.epochs, initial=progress.finished, desc="run", unit="epoch", position=0,
                   disable=not context.is_main, dynamic_ncols=True)
    with open_log(context) as live, stopped, run_bar:
        for row in progress.history:  # the finished epochs' curves, as the interrupted run logged them
            log_epoch(live, row)
            if trial is not None:  # and the study's values of them (a retried trial may have none)
                trial.report(row["step"], row[f"{data.monitor_split}/acc"])
        for epoch in range(progress.finished + 1, recipe.epochs + 1):
            row = train_and_score(trainer, data, recipe, context, progress, epoch)
            log_epoch(live, row)
            run_bar.update()
            progress.wall_seconds = wall_before + time.perf_counter() - start
            if epoch == progress.first_epoch:
                estimate(progress, recipe, context.device)
            with stopped.deferred():  # a signal now waits until this epoch is saved
                if context.is_main:
                    save_checkpoint(checkpoint, run_fingerprint, progress, trainer)
            # a search's trial: report the epoch once it is saved (a trial stopped after reporting it resumes
            # after it), and stop if the study's pruner says so
            if trial is not None:
                try:
                    trial.after_epoch(epoch, recipe.epochs, row[f"{data.monitor_split}/acc"])
                except Pruned:  # never run again, unlike a killed trial: nothing to resume
                    checkpoint.unlink(missing_ok=True)
                    raise
        progress.wall_seconds = wall_before + time.perf_counter() - start
        live.log_metric(f"best_{data.monitor_split}_acc", progress.best_acc, plot=False)
        if data.monitor_split == "validation" and context.is_main:
            for mode, accuracy in score_tta_modes(trainer.result, data, recipe).items():
                live.log_metric(f"validation/acc_with_tta/{mode}", accuracy, plot=False)
        live.summary["device"] = where  # which GPU (or the CPU) trained it, beside the last epoch's values

    # The run's metrics and the model
    if context.is_main:
        write_json(RUN_METRICS_FILE, run_metrics(progress, num_params, len(data.labels)))
        # the unwrapped model (the same state_dict keys as on one process), or its EMA when on
        save_model(MODEL_FILE, trainer.result, stats, classes, recipe.precision)
        checkpoint.unlink(missing_ok=True)  # done: a later forced rerun trains afresh
    split = data.monitor_split
    print(f"final {split} acc {progress.history[-1][f'{split}/acc']:.4f}, best {progress.best_acc:.4f}, "
          f"{progress.wall_seconds:.0f} s; saved {MODEL_FILE}")


def score_tta_modes(model, data, recipe):
    """{TTA mode: the final model's accuracy on the held-out images with it}, every mode of evaluate.tta once:
    what chooses the TTA without the test set and without training again (no training output depends on
    evaluate.tta). 'none' is the last epoch's own validation accuracy."""
    return {mode: score(model, data.monitor_images, data.monitor_labels, data.normalize, recipe.batch_size,
                        recipe.precision, mode)[1].item() for mode in TTA_MODES}


def read_stats():
    """data/stats.json, checked: every rank normalizes by it, so a bad one must stop the run before any starts."""
    stats = read_json(STATS_FILE, "stats")
    if not (isinstance(stats, dict) and all(
            isinstance(stats.get(key), list) and len(stats[key]) == 3 and
            all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in stats[key]) for key in ("mean", "std"))
            and all(v > 0 for v in stats["std"])):
        raise UserError(f"{STATS_FILE}: not the stats stage's {{\"mean\": [3 numbers], \"std\": [3 numbers > 0]}}; "
                        "rerun it (dvc repro --force stats)")
    return stats


def split_data(recipe, num_classes):
    """(training images and labels, the images every epoch is scored on, their name), every batch read and
    checked. With train.validation_images > 0, those are held out of the training set (data.training_split),
    training never sees them, and the test set is not read at all: the evaluate stage scores it, once. Else, as in the
    study, every epoch is scored on the test set."""
    train, held = training_split(BATCHES_DIR, recipe.validation_images, num_classes)
    if held is None:
        return train, load_split(BATCHES_DIR, "test"), "test"
    return train, held, "validation"


def restore(trainer, checkpoint, run_fingerprint, recipe, context):
    """The Progress of the interrupted run the `checkpoint` file holds (the trainer restored to it), or a fresh
    one. The main rank alone saves it and reads it, and sends it to every rank, on every node
    (resume.load_checkpoint)."""
    progress = load_checkpoint(checkpoint, run_fingerprint, trainer, context.main_rank)
    if progress:
        print(f"resuming from {checkpoint} after epoch {progress.finished}/{recipe.epochs}")
    else:
        progress = Progress(recipe.epochs)
    progress.first_epoch = progress.finished + 1  # this process's first: the one its estimate is made after
    return progress


def train_and_score(trainer, data, recipe, context, progress, epoch):
    """Train one epoch, score it on data.monitor_*, and record it in `progress`; returns its row of the curves."""
    epoch_start = time.perf_counter()
    train_loss, train_acc = train_epoch(trainer, data, recipe, context, desc=f"epoch {epoch}/{recipe.epochs}")
    train_loss, train_acc = train_loss.item(), train_acc.item()  # one host sync per epoch
    progress.train_seconds += time.perf_counter() - epoch_start
    if trainer.ema is not None:
        ema_batchnorm(trainer, data, recipe, context)
    loss, acc = (v.item() for v in monitor_scores(trainer, data, recipe, context))
    lr = trainer.scheduler.get_last_lr()[0]
    split = data.monitor_split
    row = {"step": epoch, "train/loss": train_loss, "train/acc": train_acc, f"{split}/loss": loss,
           f"{split}/acc": acc, "lr": lr}
    seconds = time.perf_counter() - epoch_start
    tqdm.write(f"epoch {epoch}/{recipe.epochs} ({seconds:.0f} s): train loss {train_loss:.4f} acc {train_acc:.4f} | "
               f"{split} loss {loss:.4f} acc {acc:.4f} | lr {lr:.2e}")  # rank > 0: stdout is silenced
    progress.finished = epoch
    progress.history.append(row)
    progress.best_acc = max(progress.best_acc, acc)
    progress.last_epoch_seconds = seconds
    return row


def estimate(progress, recipe, device):
    """After this process's first epoch: its time, and what the whole run will take at that pace (the first
    epoch also warms up, so the estimate errs long); on a CPU, past an hour, where the quick run is."""
    left = progress.last_epoch_seconds * (recipe.epochs - progress.finished)
    tqdm.write(f"first epoch {progress.last_epoch_seconds:.0f} s: the remaining {recipe.epochs - progress.finished} "
               f"epoch(s) take about {duration(left)}")
    if device.type == "cpu" and left > LONG_CPU_RUN_S:
        tqdm.write("that is long for a CPU: README.md's 'A quick run' trains a narrower model for fewer epochs "
                   "in minutes (or Ctrl-C now and rerun later: the run resumes from its last epoch)")


def duration(seconds):
    """'45 s', '12 min' or '3.5 h'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


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
