"""Stage train: the study's recipe (the `train` params) on the `model` params.

Writes models/model.pt (weights, architecture, normalization), models/summary.txt (the layer table), through
DVCLive metrics/train/ (per-epoch curves, the last epoch's values), and metrics/train/run.json (parameters,
training time, images/s). After every epoch it saves models/checkpoint.pt (a queued run: a file outside its
temporary copy), from which a rerun with the same params, data and code resumes (cifar/resume.py)."""
import sys

import torch

from cifar import devices, distributed
from cifar.data import read_classes
from cifar.fit import fit, read_stats, split_data
from cifar.model import ModelParams, build_model
from cifar.params import load_params
from cifar.precision import resolve_precision
from cifar.training import Recipe
from cifar.trial import search_trial
from cifar.workspace import BATCHES_DIR, command


def main(argv=None):
    """Check everything the run needs, then train here or, for several processes, launch them.

    With train.nproc * train.nnodes > 1 this first process is only the launcher: it checks every input a
    rank reads (params, the data files, the statistics), claims the node's GPUs, then torchrun starts
    `python -m stages.train` once per rank, and every rank comes back through main(), passes the same checks
    (cheap, and each rank needs their results) and, being under torchrun, trains. So bad input stops the run
    before any rank starts, and a rank that fails has crashed: torchrun restarts the ranks. A stop that every
    rank agrees on (the nodes differ) is reported by the launcher, not retried."""
    if distributed.under_torchrun():
        distributed.die_with_launcher()
    with distributed.group_stop_reported():
        run(argv)


def run(argv):
    params = load_params(ModelParams, Recipe, devices.System)  # never evaluate.tta: chosen after training
    recipe, system = Recipe.from_params(params), devices.System(**params["system"])
    node = distributed.node_rank(argv, recipe)
    torch.manual_seed(recipe.seed)
    model = build_model(**params["model"])  # the budget is checked before any work
    stats = read_stats()
    classes = read_classes(BATCHES_DIR)
    split = split_data(recipe, len(classes))  # every batch read: bad data stops the run here
    if distributed.under_torchrun():  # a rank: its launcher holds the GPUs
        device, claim = devices.rank_device(system.device), None
    else:
        device, claim = devices.choose_device(system.device, recipe.nproc)
    distributed.check(recipe, device)
    # resolved before anything is fingerprinted: `auto` means bf16 on one GPU and fp16 on another
    recipe = recipe.model_copy(update={"precision": resolve_precision(recipe.precision, device)})
    if distributed.needs_launch(recipe):
        del split  # each rank reads its own
        distributed.launch(recipe, system, node, "stages.train", devices.launch_environment(claim))
    else:
        fit(params["model"], recipe, system, model, stats, classes, device, claim, node, search_trial(recipe),
            split=split)


if __name__ == "__main__":
    command(main, sys.argv[1:])
