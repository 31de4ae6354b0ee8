"""Training on several processes with PyTorch's own distributed engine: torchrun (torch.distributed.run) starts
one process (rank) per GPU, or several on a CPU, on one or more nodes, and DistributedDataParallel averages
the gradients over them in backward. NCCL on CUDA, gloo on the CPU.

With train.nproc * train.nnodes > 1, the train stage (started as usual by `dvc repro`) checks its params and
reads its data, then hands itself to torchrun's launcher: `python -m stages.train` comes back as every rank.
Each rank loads the whole data set, draws the same shuffled order and crops as one process would, trains on
its own slice of every global batch (see training.train_epoch), and only the main rank (see Context) writes."""
import argparse
import atexit
import ctypes
import os
import signal
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .workspace import UserError

# What the launcher tells its ranks: its process id (a rank ends when its launcher is gone: die_with_launcher),
# and the file in which a rank leaves the message of a stop every rank agreed on (GroupStop)
LAUNCHER_PID, STOP_FILE = "CIFAR10_LAUNCHER_PID", "CIFAR10_STOP_FILE"
PR_SET_PDEATHSIG = 1  # prctl's option (linux/prctl.h): a signal for this process when its parent dies


class GroupStop(UserError):
    """Bad input that every rank finds alike, together (the nodes differ): the run stops, and is not retried."""


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


def launch(recipe, system, node, module, environment):
    """Run `python -m module` as recipe.nproc ranks on this node through torchrun's own launcher, with
    `environment` added to theirs (the GPUs this launcher claimed for them), and wait. The stage has checked
    every input a rank reads before this, so a rank that fails has crashed, and torchrun restarts them all
    (system.max_restarts). When the restarts are spent, torchrun stops the others and the failure becomes one
    UserError line (the rank's own error is printed above it); a GroupStop the ranks left becomes its own."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = torchrun_args(recipe, system, node, module)
    # each rank's share of the cores (torch reads OMP_NUM_THREADS at start), unless the user set it: two
    # "nodes" sharing one machine, as the tests run them, must share its cores too
    os.environ.setdefault("OMP_NUM_THREADS", str(threads_per_process(recipe.nproc)))
    os.environ.update(environment)  # torchrun's ranks inherit this process's environment
    # A fresh store for every restart: by default the ranks of every attempt share the agent's one store, and
    # restarted ranks then read the dead ranks' gloo addresses left in it and hang in init_process_group.
    os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    sys.stdout.flush()
    with tempfile.TemporaryDirectory(prefix="cifar10-launch-") as folder:
        stop = Path(folder) / "stop"
        os.environ.update({LAUNCHER_PID: str(os.getpid()), STOP_FILE: str(stop)})
        try:
            torchrun.run(torchrun.parse_args(args))
        except ChildFailedError as e:
            rank, failure = e.get_first_failure()
            raise UserError(f"training on {recipe.world_size} processes failed: rank {rank} exited with code "
                            f"{failure.exitcode} (its error is above) after {system.max_restarts} restart(s) "
                            "(system.max_restarts), and torchrun stopped the others")
        if stop.is_file():
            raise UserError(stop.read_text())


def die_with_launcher():
    """In a rank on Linux: the kernel SIGKILLs it when its parent, torchrun's agent in the launcher, dies
    (prctl's PR_SET_PDEATHSIG), however the launcher dies; a rank left behind would train on beside the next
    run, or wait in a collective until gloo's or NCCL's timeout. SIGKILL, since a rank blocked in a collective
    runs no Python signal handler; the checkpoint is written whole or not at all."""
    if sys.platform != "linux":
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if LAUNCHER_PID in os.environ and os.getppid() != int(os.environ[LAUNCHER_PID]):
        os.kill(os.getpid(), signal.SIGKILL)  # the launcher died before prctl: no signal will come


@contextmanager
def group_stop_reported():
    """In a rank: a GroupStop leaves its message for the launcher (STOP_FILE, written once per node) and ends
    the rank with status 0, since torchrun restarts ranks that end otherwise; every rank stops alike, and the
    launcher reports it."""
    try:
        yield
    except GroupStop as e:
        if not under_torchrun() or STOP_FILE not in os.environ:
            raise
        if os.environ["LOCAL_RANK"] == "0":
            Path(os.environ[STOP_FILE]).write_text(str(e))


def setup(device, node=0, run_fingerprint=None):
    """This process's Context. Under torchrun: joins the process group (NCCL with one GPU per local rank,
    or gloo on the CPU), leaves it at exit, finds the main rank (node 0's first), checks that every rank's
    run fingerprint (resume.fingerprint) is the main rank's, and on the other ranks silences stdout so that
    only the main one reports (errors still reach stderr)."""
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
    # One all-gather tells every rank every rank's node and fingerprint, which finds the main rank and checks
    # that the nodes agree, and the restarts so far: on several nodes only the failed rank's agent counts one
    # (the others restart for the new round its rendezvous opens), so the count is the most any rank was told.
    ranks = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, {"node": node, "first": local_rank == 0, "fingerprint": run_fingerprint,
                                   "restarts": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))})
    main_rank = next((r for r, peer in enumerate(ranks) if peer["node"] == 0 and peer["first"]), 0)
    check_nodes_agree(ranks, main_rank)
    restarts = max(peer["restarts"] for peer in ranks)
    context = Context(device, dist.get_rank(), dist.get_world_size(), main_rank)
    if not context.is_main:
        sys.stdout = open(os.devnull, "w")
    if restarts:
        print(f"torchrun restarted the ranks after a failure (restart {restarts} of at most "
              f"{os.environ.get('TORCHELASTIC_MAX_RESTARTS', 0)})", flush=True)
    return context


def check_nodes_agree(ranks, main_rank):
    """A GroupStop naming each node whose fingerprint is not the main rank's, and what differs: before any
    step, every rank raises it alike. Nodes with a stale checkout, other params, other data or other versions
    of torch, CUDA or cuDNN would otherwise train together, silently."""
    main = ranks[main_rank]
    found = {peer["node"]: differences(main["fingerprint"], peer["fingerprint"]) for peer in ranks
             if peer["fingerprint"] != main["fingerprint"]}
    if found:
        raise GroupStop("; ".join(f"node {node} differs from node {main['node']} in {', '.join(what)}"
                                  for node, what in sorted(found.items())) +
                        ": every node needs the same checkout, params, data and versions of torch, CUDA and cuDNN "
                        "(docs/distributed.md)")


def differences(a, b):
    """What differs between two fingerprints (resume.fingerprint): each part that differs by its name, or for
    the parts that are files ({path: digest}, the data and the code), each file that differs, and for the
    libraries' versions, each library's ('torch version')."""
    found = []
    for part in a.keys() | b.keys():
        mine, theirs = a.get(part), b.get(part)
        if isinstance(mine, dict) and isinstance(theirs, dict):
            found += [f"{name} version" if part == "versions" else name for name in mine.keys() | theirs.keys()
                      if mine.get(name) != theirs.get(name)]
        elif mine != theirs:
            found.append(part)
    return sorted(found)


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
    """The tensors (scalars, or vectors of one length) summed over all ranks in float64, in one all_reduce."""
    total = torch.stack([t.to(torch.float64) for t in tensors])
    dist.all_reduce(total)
    return tuple(total)


def broadcast_buffers(model):
    """Rank 0's buffers (the BatchNorm running statistics) on every rank, so all evaluate the model the main
    rank saves."""
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)
