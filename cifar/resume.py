"""Resumable training: the per-epoch checkpoint, the fingerprint that says which run it belongs to, and
SIGINT/SIGTERM turned into a clean stop.

The checkpoint (models/checkpoint.pt) is a scratch file, not a DVC output: DVC neither deletes it before
rerunning the train stage nor caches or pushes it, and the stage deletes it once training completes, so a
forced rerun trains afresh. (As a `persist` output it would switch off DVC's run-cache for the stage, and as
a `cache: false` one its absence after `dvc pull` into a fresh clone would make the train stage look changed.)"""
import hashlib
import json
import signal
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from .imports import code_of
from .workspace import BATCHES_DIR, STATS_FILE, UserError, atomic_path

CHECKPOINT_FILE = Path("models/checkpoint.pt")


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

    def stop_message(self):
        """Where a stopped run stands, for the message of StopSignals."""
        resume = f"{CHECKPOINT_FILE} holds it: rerun to resume" if self.finished else "nothing to resume"
        return f"after epoch {self.finished}/{self.epochs}; {resume}"


def fingerprint(model, recipe, device):
    """What a checkpoint must share with this run to be resumed: the model params and the recipe, its
    precision resolved for this device (`auto` trains in bf16 on one GPU and fp16 on another: a checkpoint of
    one must not resume in the other), never `system` (it never changes what is computed); the device type
    (RNG states differ between CPU and CUDA); the data (the batch files and data/stats.json, by content) and
    the code that trains: the train stage's files, by content (found by reading its imports, so the same in
    any process that calls this)."""
    if recipe.precision == "auto":
        raise ValueError("fingerprint: resolve the recipe's precision for the device first")
    digest = hashlib.sha256(json.dumps({"model": dict(model), "train": recipe.model_dump(),
                                        "device": device.type}, sort_keys=True).encode())
    for path in [*sorted(Path(BATCHES_DIR).iterdir()), Path(STATS_FILE), *code_of("stages/train.py")]:
        digest.update(path.name.encode())
        with open(path, "rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()


def save_checkpoint(path, run_fingerprint, progress, trainer):
    """Everything to continue after `progress.finished` finished epochs exactly as if never stopped."""
    state = {
        "fingerprint": run_fingerprint, "progress": asdict(progress),
        "model": trainer.model.state_dict(), "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(), "scaler": trainer.scaler.state_dict(),
        "ema": trainer.ema.state_dict() if trainer.ema is not None else None, "flips": trainer.flips,
        "rng": {"generator": trainer.generator.get_state(), "cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path, run_fingerprint, trainer, main_rank=0):
    """Restore the trainer's state from `path` and return its Progress, or return None (saying why) when
    there is no checkpoint or it belongs to other params, data or code: training then starts afresh. On
    several ranks, the main rank (the one that saved it) alone reads it and sends it to every rank over the
    process group, so the ranks of other nodes resume without a shared file system."""
    distributed = dist.is_available() and dist.is_initialized()
    state = read_checkpoint(path, run_fingerprint) if not distributed or dist.get_rank() == main_rank else None
    if distributed:
        box = [state]
        dist.broadcast_object_list(box, src=main_rank)
        state = box[0]
    return None if state is None else restore_state(state, trainer)


def read_checkpoint(path, run_fingerprint):
    """The checkpoint's state, or None (saying why) when there is none or it is another run's."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        stale = state["fingerprint"] != run_fingerprint
    except Exception as e:  # a damaged scratch file is not worth stopping for
        print(f"{path}: unreadable ({type(e).__name__}); starting afresh")
        return None
    if stale:
        print(f"{path}: from other params, data or code; starting afresh")
        return None
    return state


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
    if state["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
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
