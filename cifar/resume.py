"""Resumable training: the per-epoch checkpoint, the fingerprint that says which run it belongs to, and
SIGINT/SIGTERM turned into a clean stop.

The checkpoint (models/checkpoint.pt, or for a run in a temporary copy of DVC's queue a file outside that copy:
checkpoint_path) is a scratch file, not a DVC output: DVC neither deletes it before rerunning the train stage
nor caches or pushes it, and the stage deletes it once training completes, so a forced rerun trains afresh.
(As a `persist` output it would switch off DVC's run-cache for the stage, and as a `cache: false` one its
absence after `dvc pull` into a fresh clone would make the train stage look changed.)"""
import hashlib
import json
import os
import signal
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from .imports import ROOT, code_of
from .workspace import BATCHES_DIR, STATS_FILE, UserError, atomic_path

CHECKPOINT_FILE = Path("models/checkpoint.pt")
QUEUED_CHECKPOINTS = Path(".dvc/tmp/checkpoints")  # in the original repository: queued runs' checkpoints


@dataclass
class Progress:
    """How far a run of `epochs` epochs has come: the finished epochs' rows (as logged), the best per-epoch
    accuracy so far (on the images every epoch is scored on), and the seconds spent training (the epochs
    alone) and in all (scoring and saving too)."""
    epochs: int
    finished: int = 0  # epochs finished and saved
    history: list = field(default_factory=list)
    best_acc: float = 0.0
    train_seconds: float = 0.0
    wall_seconds: float = 0.0
    last_epoch_seconds: float = 0.0
    first_epoch: int = 1  # this process's first epoch (after a resume, not 1), after which it estimates the run

    def stop_message(self, checkpoint=CHECKPOINT_FILE):
        """Where a stopped run stands, for the message of StopSignals."""
        how = "rerun" if checkpoint == CHECKPOINT_FILE else "queue the same experiment again"
        resume = f"{checkpoint} holds it: {how} to resume" if self.finished else "nothing to resume"
        return f"after epoch {self.finished}/{self.epochs}; {resume}"


def fingerprint(model, recipe, device):
    """What a checkpoint must share with this run to be resumed, in parts that say what differs (and that
    every node of a run must share: distributed.setup): `params`, the model params and the recipe, its
    precision resolved for this device (`auto` trains in bf16 on one GPU and fp16 on another: a checkpoint of
    one must not resume in the other), never `system` (it never changes what is computed); `device`, its type
    (RNG states differ between CPU and CUDA); `data`, the batch files and data/stats.json; `code`, the
    train stage's files (found by reading its imports, so the same in any process that calls this), each file
    by content; and `versions`, those of torch, CUDA and cuDNN (versions()), whose kernels compute the run."""
    if recipe.precision == "auto":
        raise ValueError("fingerprint: resolve the recipe's precision for the device first")
    params = json.dumps({"model": dict(model), "train": recipe.model_dump()}, sort_keys=True)
    return {"params": hashlib.sha256(params.encode()).hexdigest(), "device": device.type,
            "data": file_digests([*Path(BATCHES_DIR).iterdir(), Path(STATS_FILE)]),
            "code": file_digests(code_of("stages/train.py"), ROOT), "versions": versions()}


def file_digests(paths, root=Path()):
    """{each file's path relative to `root`: the sha256 of its content}."""
    digests = {}
    for path in paths:
        with open(path, "rb") as f:
            digests[Path(path).relative_to(root).as_posix()] = hashlib.file_digest(f, "sha256").hexdigest()
    return digests


def versions():
    """The libraries whose kernels compute the run: a checkpoint of other versions would not resume to the
    same result."""
    # str: torch's own version class is no type that a weights_only load accepts
    return {"torch": str(torch.__version__), "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}


def checkpoint_path(run_fingerprint, run_key=None):
    """Where the run's checkpoint lives: models/checkpoint.pt, except in a run in a temporary copy (DVC's
    queue, `dvc exp run --temp`), which DVC discards when the run ends however it ends. There it lives in the
    original repository, which DVC names in DVC_ROOT for such runs, under .dvc/tmp (git-ignored), named by
    the fingerprint and `run_key` (a search trial's identity, the same for its retries): the same experiment
    queued again finds it, and two runs of one fingerprint at once (search trials) never share it."""
    root = os.environ.get("DVC_ROOT")
    if root is None or Path(root).resolve() == Path.cwd().resolve():
        return CHECKPOINT_FILE
    named = run_fingerprint if run_key is None else {**run_fingerprint, "run_key": run_key}
    key = hashlib.sha256(json.dumps(named, sort_keys=True).encode()).hexdigest()[:16]
    return Path(root) / QUEUED_CHECKPOINTS / f"{key}.pt"


def save_checkpoint(path, run_fingerprint, progress, trainer):
    """Everything to continue after `progress.finished` finished epochs as if never stopped (on the CPU bit
    for bit; on a GPU cuDNN's choice of kernels may differ: fit). Of the CUDA RNGs, only the training
    device's: the one the run uses (a rank's own GPU)."""
    device = trainer.generator.device
    state = {
        "fingerprint": run_fingerprint, "versions": versions(), "progress": asdict(progress),
        "model": trainer.model.state_dict(), "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(), "scaler": trainer.scaler.state_dict(),
        "ema": trainer.ema.state_dict() if trainer.ema is not None else None, "flips": trainer.flips,
        "rng": {"generator": trainer.generator.get_state(), "cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None},
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path, run_fingerprint, trainer, main_rank=0):
    """Restore the trainer's state from `path` and return its Progress, or return None (saying why) when
    there is no checkpoint, it belongs to other params, data or code, or other versions of torch, CUDA or
    cuDNN wrote it: training then starts afresh. On several ranks, the main rank (the one that saved it)
    alone reads it and sends it to every rank over the process group, so the ranks of other nodes resume
    without a shared file system."""
    distributed = dist.is_available() and dist.is_initialized()
    state = read_checkpoint(path, run_fingerprint) if not distributed or dist.get_rank() == main_rank else None
    if distributed:
        box = [state]
        dist.broadcast_object_list(box, src=main_rank)
        state = box[0]
    return None if state is None else restore_state(state, trainer)


def read_checkpoint(path, run_fingerprint):
    """The checkpoint's state, or None (saying why) when there is none, it is another run's, or other versions
    of torch, CUDA or cuDNN wrote it."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        stale, written_by = state["fingerprint"] != run_fingerprint, state["versions"]
    except Exception as e:  # a damaged scratch file is not worth stopping for
        print(f"{path}: unreadable ({type(e).__name__}); starting afresh")
        return None
    if written_by != versions():  # first: the fingerprint holds them too, but this says which
        print(f"{path}: written by {describe(written_by)}, but this is {describe(versions())}; starting afresh")
        return None
    if stale:
        print(f"{path}: from other params, data or code; starting afresh")
        return None
    return state


def describe(found):
    """'torch 2.5.1 (CUDA 12.4, cuDNN 90100)' for versions()."""
    return f"torch {found['torch']} (CUDA {found['cuda']}, cuDNN {found['cudnn']})"


def restore_state(state, trainer):
    """The trainer restored to a checkpoint's state; returns its Progress."""
    trainer.model.load_state_dict(state["model"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    trainer.scaler.load_state_dict(state["scaler"])
    if trainer.ema is not None:
        trainer.ema.load_state_dict(state["ema"])
    trainer.flips = None if state["flips"] is None else state["flips"].to(trainer.generator.device)
    trainer.generator.set_state(state["rng"]["generator"])
    torch.set_rng_state(state["rng"]["cpu"])
    if state["rng"]["cuda"] is not None:
        torch.cuda.set_rng_state(state["rng"]["cuda"], trainer.generator.device)
    return Progress(**state["progress"])


class Stopped(UserError):
    """Training stopped by a signal; the exit status is the shell's 128 + the signal number."""

    def __init__(self, signum, message):
        self.exit_status = 128 + signum
        super().__init__(message)


class StopSignals:
    """While active, SIGINT and SIGTERM raise Stopped in the main thread, aborting the step in progress,
    with the message 'training stopped by SIG...' plus what `describe()` says; inside `deferred()` (saving
    the checkpoint) they wait until the block has finished."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, describe):
        self.describe, self.received, self._deferring, self._previous = describe, None, False, {}

    def _stop(self):
        raise Stopped(self.received, f"training stopped by {signal.Signals(self.received).name} {self.describe()}")

    def _handle(self, signum, frame):
        self.received = signum
        if not self._deferring:
            self._stop()

    def __enter__(self):
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    @contextmanager
    def deferred(self):
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False
        if self.received is not None:
            self._stop()
