"""Which device a training run uses (`system.device`), and one GPU per concurrent run.

DVC's queue (`dvc queue start -j 4`) starts experiments side by side but assigns them no GPU, so without
help every one of them would train on cuda:0. So the train stage claims its GPUs itself: with `auto` or
`cuda`, each run takes GPUs that no other run of this project holds, by an exclusive lock per GPU in a
machine-wide folder. The lock is the open file's, so the kernel releases it whenever the process ends, by
SIGKILL too: a crashed run never keeps a GPU. A run of `train.nproc` ranks claims `nproc` GPUs. When every
GPU is held, the run waits for one to come free (and says so): a GPU shared by two trainings would run each
at half speed at best, and may run both out of memory. Inference (the evaluate stage, tools.predict) is light,
so it claims nothing and never waits: inference_device."""
import fcntl
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Annotated

import torch
from pydantic import Field

from .params import FLAG, Section, text
from .workspace import UserError

DEVICE_PATTERN = r"^(auto|cpu|cuda|cuda:\d+)$"
DEVICE_ALLOWED = "auto, cpu, cuda or cuda:K (K: a GPU index)"


class System(Section):
    """The `system` section: where and how a run executes, never what it computes, so no stage depends on it
    and changing it neither reruns training nor invalidates a checkpoint. compile is here because
    torch.compile changes the results only by floating-point rounding (as another GPU model would); the
    rendezvous address and port cannot change them at all, nor can the device (on one kind of device; the
    checkpoint's fingerprint holds the device type), nor can how often torchrun restarts crashed ranks (they
    resume from the checkpoint: bit for bit on the CPU, within cuDNN's run-to-run differences on a GPU)."""
    section = "system"
    device: text(DEVICE_PATTERN, DEVICE_ALLOWED)
    compile: FLAG
    master_addr: text()
    master_port: Annotated[int, Field(ge=1, le=65535, description="a TCP port, an integer from 1 to 65535")]
    max_restarts: Annotated[int, Field(ge=0, description="an integer >= 0")]


LOCK_DIR = Path(tempfile.gettempdir()) / "cifar10-resnet-gpus"  # one for the machine: every checkout, every run


def visible_gpus():
    """The ids of the GPUs this process may use, in CUDA's order: CUDA_VISIBLE_DEVICES's entries when it is
    set (indices or UUIDs), else 0 .. device_count - 1."""
    count = torch.cuda.device_count()
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [part.strip() for part in listed.split(",") if part.strip()] if listed is not None else []
    return ids[:count] if listed is not None else [str(i) for i in range(count)]


class Claim:
    """GPUs held by this process: their ids and the locked files that hold them."""

    def __init__(self, gpus, files):
        self.gpus, self._files = gpus, files

    def release(self):
        for f in self._files:
            f.close()  # closing the file releases its lock
        self._files = []


def _lock_file(lock_dir, gpu):
    return lock_dir / f"gpu-{re.sub(r'[^A-Za-z0-9_.-]', '_', gpu)}.lock"


def _try_lock(path):
    f = open(path, "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    return f


def claim_gpus(count, gpus, lock_dir=LOCK_DIR, poll_s=2.0, say=print):
    """Claim `count` of `gpus` (ids) that no other process holds, in order; wait while fewer are free."""
    if count > len(gpus):
        raise UserError(f"{count} GPU(s) needed (train.nproc) but {len(gpus)} visible: {', '.join(gpus) or 'none'}")
    lock_dir.mkdir(parents=True, exist_ok=True)
    waiting = False
    while True:
        held = {}
        for gpu in gpus:
            f = _try_lock(_lock_file(lock_dir, gpu))
            if f:
                held[gpu] = f
            if len(held) == count:
                return Claim(list(held), list(held.values()))
        for f in held.values():  # not enough: hold none while waiting, so two waiting runs cannot deadlock
            f.close()
        if not waiting:
            say(f"waiting for {count} free GPU(s): {len(gpus) - len(held)} of the {len(gpus)} visible are held by "
                f"other runs of this project (locks in {lock_dir})", flush=True)
            waiting = True
        time.sleep(poll_s)


def choose_device(setting, count=1, lock_dir=LOCK_DIR):
    """(device, Claim or None) for system.device `setting` and `count` processes on this node.

    cpu: the CPU. cuda:K: visible GPU K, as asked (no claim; one process). auto: like cuda where PyTorch sees
    a GPU, else the CPU. cuda: claim `count` free GPUs; this process uses the first (the ranks it launches
    get exactly the claimed ones: launch_environment)."""
    if setting == "cpu" or (setting == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu"), None
    gpus = visible_gpus()
    if not gpus:
        raise UserError(f"system.device = {setting!r} but PyTorch sees no CUDA GPU; use auto or cpu")
    if setting.startswith("cuda:"):
        index = int(setting.split(":")[1])
        if index >= len(gpus) or count > 1:
            raise UserError(f"system.device = {setting!r}: {len(gpus)} GPU(s) visible (0 to {len(gpus) - 1}), and "
                            "it names one GPU for one process; use auto or cuda to let each run claim its GPUs")
        return torch.device("cuda", index), None
    claim = claim_gpus(count, gpus, lock_dir)
    return torch.device("cuda", gpus.index(claim.gpus[0])), claim


def is_held(gpu, lock_dir=LOCK_DIR):
    """Whether a run holds GPU `gpu` (an id) now: a look, not a claim (its lock is taken and dropped at once)."""
    path = _lock_file(lock_dir, gpu)
    if not path.is_file():  # never claimed: no lock file to make just to look
        return False
    f = _try_lock(path)
    if f:
        f.close()
    return f is None


def inference_device(setting, lock_dir=LOCK_DIR):
    """The device inference runs on for system.device `setting`, at once: it claims nothing and never waits.
    auto and cuda: the first visible GPU no run holds, else the first visible GPU, shared with a training (a
    model's forward passes take little of its time and memory); auto without a GPU: the CPU. cpu and cuda:K
    as choose_device."""
    gpus = visible_gpus() if setting in ("auto", "cuda") and torch.cuda.is_available() else []
    if not gpus:
        return choose_device(setting)[0]  # the CPU, cuda:K as set, or cuda's error without a GPU: no claim
    free = [gpu for gpu in gpus if not is_held(gpu, lock_dir)]
    return torch.device("cuda", gpus.index((free or gpus)[0]))


def rank_device(setting):
    """The device type of a rank under torchrun: its launcher chose the GPUs and shows it exactly those (each
    rank then takes cuda:LOCAL_RANK), or the CPU."""
    return torch.device("cpu" if setting == "cpu" or not torch.cuda.is_available() else "cuda")


def launch_environment(claim):
    """What the ranks' environment needs: CUDA_VISIBLE_DEVICES listing exactly the claimed GPUs."""
    return {"CUDA_VISIBLE_DEVICES": ",".join(claim.gpus)} if claim else {}


def describe(device, claim):
    """'cpu', or e.g. 'cuda:1 (GPU 3 of CUDA_VISIBLE_DEVICES, NVIDIA A100-SXM4-80GB, claimed)'."""
    if device.type != "cuda":
        return str(device)
    gpus = visible_gpus()
    how = "claimed" if claim else "as set"
    return f"{device} (GPU {gpus[device.index or 0]}, {torch.cuda.get_device_name(device)}, {how})"
