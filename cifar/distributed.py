"""Training on several processes with PyTorch's own distributed engine: torchrun (torch.distributed.run) starts
one process (rank) per GPU, or several on a CPU, on one or more nodes, and DistributedDataParallel averages
the gradients over them in backward. NCCL on CUDA, gloo on the CPU.

With train.nproc * train.nnodes > 1, the train stage (started as usual by `dvc repro`) checks its params,
then hands itself to torchrun's launcher: `python -m stages.train` comes back as every rank. Each rank
loads the whole data set, draws the same shuffled order and crops as one process would, trains on its own
slice of every global batch (see training.train_epoch), and only rank 0 writes."""
import argparse
import atexit
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .workspace import UserError


@dataclass(frozen=True)
class Context:
    """This process's place in the run: one process is rank 0 of a world of 1."""
    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self):
        return self.rank == 0


def under_torchrun():
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def needs_launch(recipe):
    """Several processes asked for, and this is not yet one of them."""
    return recipe.world_size > 1 and not under_torchrun()


def threads_per_process(nproc):
    """The CPU's cores shared out among the node's processes, so they do not fight over them."""
    return max(1, (os.cpu_count() or 1) // nproc)


def check(recipe, device):
    """What this machine cannot do, found before any process starts."""
    if recipe.world_size == 1:
        return
    if recipe.sync_bn and device.type != "cuda":
        raise UserError(f"train.sync_bn = True with train.nproc * train.nnodes = {recipe.world_size} needs CUDA "
                        "GPUs: PyTorch's SyncBatchNorm does not run on the CPU; set train.sync_bn: false")
    if device.type == "cuda" and recipe.nproc > torch.cuda.device_count():
        raise UserError(f"train.nproc = {recipe.nproc} but this machine has {torch.cuda.device_count()} GPU(s): "
                        "one process per GPU at most")


def node_rank(argv, recipe):
    """`--node-rank K` of the stage's command line: which node this is, for train.nnodes > 1 (0, the
    default, is the node whose rank 0 writes the outputs)."""
    parser = argparse.ArgumentParser(prog="python -m stages.train", description="The train stage.")
    parser.add_argument("--node-rank", type=int, default=0,
                        help="this node's rank, 0 to train.nnodes - 1 (default 0: the node that writes the outputs)")
    rank = parser.parse_args(argv).node_rank
    if not 0 <= rank < recipe.nnodes:
        raise UserError(f"--node-rank {rank}: must be 0 to {recipe.nnodes - 1} (train.nnodes = {recipe.nnodes})")
    return rank


def torchrun_args(recipe, system, node, module):
    """torchrun's command line for the ranks of this node: one node on its own (--standalone: a free local
    port), or several meeting at system.master_addr:system.master_port (static rendezvous, node 0 hosts it)."""
    args = [f"--nproc-per-node={recipe.nproc}"]
    if recipe.nnodes == 1:
        args.append("--standalone")
    else:
        args += [f"--nnodes={recipe.nnodes}", f"--node-rank={node}", f"--master-addr={system.master_addr}",
                 f"--master-port={system.master_port}"]
    return args + ["-m", module]


def launch(recipe, system, node, module, environment):
    """Run `python -m module` as recipe.nproc ranks on this node through torchrun's own launcher, with
    `environment` added to theirs (the GPUs this launcher claimed for them), and wait. When a rank fails,
    torchrun stops the others; the failure becomes one UserError line (the rank's own error is printed above
    it)."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = torchrun_args(recipe, system, node, module)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads_per_process(recipe.nproc)))
    os.environ.update(environment)  # torchrun's ranks inherit this process's environment
    sys.stdout.flush()
    try:
        torchrun.run(torchrun.parse_args(args))
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        raise UserError(f"training on {recipe.world_size} processes failed: rank {rank} exited with code "
                        f"{failure.exitcode} (its error is above), and torchrun stopped the others")


def setup(device):
    """This process's Context. Under torchrun: joins the process group (NCCL with one GPU per local rank,
    or gloo on the CPU with a share of its cores), leaves it at exit, and on ranks other than 0 silences
    stdout so that only rank 0 reports (errors still reach stderr)."""
    if not under_torchrun():
        if device.type == "cuda":
            torch.cuda.set_device(device)  # the claimed GPU is this process's current one, for every library
        return Context(device)
    local_rank = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        torch.set_num_threads(threads_per_process(int(os.environ["LOCAL_WORLD_SIZE"])))
        dist.init_process_group("gloo")
    atexit.register(teardown)
    context = Context(device, dist.get_rank(), dist.get_world_size())
    if not context.is_main:
        sys.stdout = open(os.devnull, "w")
    return context


def teardown():
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(model, context, sync_bn):
    """The module the training steps call: the model itself on one process; on several,
    DistributedDataParallel around it (rank 0's weights broadcast at the start, gradients averaged over
    the ranks in backward), with its BatchNorms made SyncBatchNorm if asked. The conversion replaces the
    BatchNorm children in place and keeps their parameters and buffers, so `model` (which is saved) stays
    the trained module, with the same state_dict keys."""
    if context.world_size == 1:
        return model
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    device_ids = [context.device] if context.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def shard(n, rank, world_size):
    """This rank's contiguous slice of n items, split as evenly as possible (sizes differ by at most one;
    a rank gets none only when n < world_size)."""
    return slice(n * rank // world_size, n * (rank + 1) // world_size)


def all_sum(*tensors):
    """The tensors (scalars) summed over all ranks, in one all_reduce."""
    total = torch.stack([t.to(torch.float64) for t in tensors])
    dist.all_reduce(total)
    return tuple(total)


def broadcast_buffers(model):
    """Rank 0's buffers (the BatchNorm running statistics) on every rank, so all evaluate the model rank 0 saves."""
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)
