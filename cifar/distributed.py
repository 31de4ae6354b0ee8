"""Training on several processes with PyTorch's own distributed engine: torchrun (torch.distributed.run) starts
one process (rank) per GPU, or several on a CPU, on one or more nodes, and DistributedDataParallel averages
the gradients over them in backward. NCCL on CUDA, gloo on the CPU.

With train.nproc * train.nnodes > 1, the train stage (started as usual by `dvc repro`) checks its params,
then hands itself to torchrun's launcher: `python -m stages.train` comes back as every rank. Each rank
loads the whole data set, draws the same shuffled order and crops as one process would, trains on its own
slice of every global batch (see training.train_epoch), and only the main rank (see Context) writes."""
import argparse
import atexit
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .workspace import UserError

# The exit status of a rank stopped by bad input (a UserError: params, data files): torchrun restarts ranks
# that crash (system.max_restarts), but a rank with this status would fail the same way again, so it is not.
BAD_INPUT_EXIT = 3


@dataclass(frozen=True)
class Context:
    """This process's place in the run: one process is rank 0 of a world of 1. The main rank writes the
    outputs and reports: rank 0 on one node, node 0's first rank on several."""
    device: torch.device
    rank: int = 0
    world_size: int = 1
    main_rank: int = 0

    @property
    def is_main(self):
        return self.rank == self.main_rank


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
    default, is the node whose first rank writes the outputs)."""
    parser = argparse.ArgumentParser(prog="python -m stages.train", description="The train stage.")
    parser.add_argument("--node-rank", type=int, default=0,
                        help="this node's rank, 0 to train.nnodes - 1 (default 0: the node that writes the outputs)")
    rank = parser.parse_args(argv).node_rank
    if not 0 <= rank < recipe.nnodes:
        raise UserError(f"--node-rank {rank}: must be 0 to {recipe.nnodes - 1} (train.nnodes = {recipe.nnodes})")
    return rank


def torchrun_args(recipe, system, node, module):
    """torchrun's command line for the ranks of this node: one node on its own (--standalone: a free local
    port), or several meeting at system.master_addr:system.master_port, where node 0 hosts the rendezvous.
    After a rank fails, torchrun restarts all of them up to system.max_restarts times. Several nodes meet
    through torch's c10d rendezvous, not the static one: after a failure it gathers every node's agent into a
    new round, so all nodes restart together (the static one restarts only the failed node's ranks). It
    numbers the nodes in its own order, so each rank is told its node (--node-rank) to find node 0's first
    rank, the one that writes (see setup)."""
    args = [f"--nproc-per-node={recipe.nproc}", f"--max-restarts={system.max_restarts}"]
    if recipe.nnodes == 1:
        return args + ["--standalone", "-m", module]
    return args + [f"--nnodes={recipe.nnodes}", "--rdzv-backend=c10d", "--rdzv-id=cifar10-resnet",
                   f"--rdzv-endpoint={system.master_addr}:{system.master_port}",
                   f"--rdzv-conf=is_host={int(node == 0)}", "-m", module, f"--node-rank={node}"]


def _no_restart_after_bad_input(agent_class):
    """torchrun's agent, except that a rank which exited with BAD_INPUT_EXIT uses up the restarts: the group
    fails at once instead of retrying what cannot succeed."""
    class Agent(agent_class):
        def _monitor_workers(self, worker_group):
            result = super()._monitor_workers(worker_group)
            if any(failure.exitcode == BAD_INPUT_EXIT for failure in result.failures.values()):
                self._remaining_restarts = 0
            return result
    return Agent


def launch(recipe, system, node, module, environment):
    """Run `python -m module` as recipe.nproc ranks on this node through torchrun's own launcher, with
    `environment` added to theirs (the GPUs this launcher claimed for them), and wait. When a rank fails,
    torchrun stops the others; the failure becomes one UserError line (the rank's own error is printed above
    it)."""
    from unittest import mock

    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher import api

    args = torchrun_args(recipe, system, node, module)
    # each rank's share of the cores (torch reads OMP_NUM_THREADS at start), unless the user set it: two
    # "nodes" sharing one machine, as the tests run them, must share its cores too
    os.environ.setdefault("OMP_NUM_THREADS", str(threads_per_process(recipe.nproc)))
    os.environ.update(environment)  # torchrun's ranks inherit this process's environment
    # A fresh store for every restart: by default the ranks of every attempt share the agent's one store, and
    # restarted ranks then read the dead ranks' gloo addresses left in it and hang in init_process_group.
    os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    sys.stdout.flush()
    try:
        with mock.patch.object(api, "LocalElasticAgent", _no_restart_after_bad_input(api.LocalElasticAgent)):
            torchrun.run(torchrun.parse_args(args))
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        if failure.exitcode == BAD_INPUT_EXIT:
            raise UserError(f"training on {recipe.world_size} processes failed: rank {rank} stopped on bad input "
                            "(its error is above), not restarted, and torchrun stopped the others")
        raise UserError(f"training on {recipe.world_size} processes failed: rank {rank} exited with code "
                        f"{failure.exitcode} (its error is above) after {system.max_restarts} restart(s) "
                        "(system.max_restarts), and torchrun stopped the others")


@contextmanager
def bad_input_status():
    """In a rank, a UserError without an exit status of its own exits with BAD_INPUT_EXIT, which torchrun's
    agent does not restart (a signal's Stopped keeps 128 + signum: a killed rank is restarted)."""
    try:
        yield
    except UserError as e:
        if under_torchrun() and not hasattr(e, "exit_status"):
            e.exit_status = BAD_INPUT_EXIT
        raise


def setup(device, node=0):
    """This process's Context. Under torchrun: joins the process group (NCCL with one GPU per local rank,
    or gloo on the CPU), leaves it at exit, finds the main rank (node 0's first), and on the other ranks
    silences stdout so that only the main one reports (errors still reach stderr)."""
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
        dist.init_process_group("gloo")  # on the CPU's share launch() gave this rank (OMP_NUM_THREADS)
    atexit.register(teardown)
    # One all-reduce (max) finds the main rank, the only rank that offers its own number, and the restarts so
    # far: on several nodes only the failed rank's agent counts one (the others restart for the new round its
    # rendezvous opens), so the count is the most any rank was told.
    rank, first_of_node_0 = dist.get_rank(), node == 0 and local_rank == 0
    found = torch.tensor([rank if first_of_node_0 else 0, int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))],
                         device=device)
    dist.all_reduce(found, op=dist.ReduceOp.MAX)
    main_rank, restarts = found.tolist()
    context = Context(device, rank, dist.get_world_size(), main_rank)
    if not context.is_main:
        sys.stdout = open(os.devnull, "w")
    if restarts:
        print(f"torchrun restarted the ranks after a failure (restart {restarts} of at most "
              f"{os.environ.get('TORCHELASTIC_MAX_RESTARTS', 0)})", flush=True)
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
    """Rank 0's buffers (the BatchNorm running statistics) on every rank, so all evaluate the model the main
    rank saves."""
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)
