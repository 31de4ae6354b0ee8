"""Interruption and storage, through DVC itself: training killed or stopped mid-run resumes to the same
result; a stale checkpoint is ignored; `dvc push`/`dvc pull` restore every output bit for bit. Every test
works on its own copy of the data repository and compares with uninterrupted runs of the same params that
conftest's fixtures make (trained_repo's `dvc repro`, and the sweep's blocks-1111, queued), so none depends
on another having run."""
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch
import yaml
from dvcrepo import (
    CHECKPOINT,
    copy_repo,
    dvc,
    finished_epochs,
    read_json,
    set_params,
    stages_run,
    start,
    stop_after_first_epoch,
    training_results,
)

from cifar import fit
from cifar.training import train_epoch

EPOCHS = 3  # the test repositories' train.epochs


@pytest.fixture
def repo(data_repo, tmp_path):
    """The data stages run and committed, training not yet."""
    return copy_repo(data_repo.repo, tmp_path / "repo")


def without_evaluation(found):
    return {k: v for k, v in found.items() if k != "evaluate"}


def test_an_uninterrupted_run_leaves_no_checkpoint(trained_repo):
    assert stages_run(trained_repo.output) == {"train", "evaluate", "export", "plot"}
    assert "resuming" not in trained_repo.output and "starting afresh" not in trained_repo.output
    assert not (trained_repo.repo / CHECKPOINT).exists()  # done: a forced rerun trains afresh


def test_dvc_repro_killed_mid_training_resumes_to_the_same_result(repo, trained_repo):
    process = start(repo, sys.executable, "-m", "dvc", "repro")
    code, _, epoch = stop_after_first_epoch(repo, process, signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert finished_epochs(repo) in range(epoch, EPOCHS) and not (repo / "models/model.pt").exists()
    output = dvc(repo, "repro", "train")  # (evaluate and plot would follow as usual: test_pipeline)
    assert "resuming from models/checkpoint.pt after epoch" in output
    assert stages_run(output) == {"train"}
    assert training_results(repo) == without_evaluation(trained_repo.results)
    assert not (repo / CHECKPOINT).exists()


def assert_stopped_at_once(repo, code, stderr, signum, epoch):
    """Stopped within the epoch the signal hit, saving nothing more: the exit status and the last line say
    so, the checkpoint holds the epoch before, and there is no model."""
    last = stderr.strip().splitlines()[-1]
    assert code == 128 + signum and "Traceback" not in stderr, stderr
    assert finished_epochs(repo) == epoch < EPOCHS, f"signalled after epoch {epoch}, saved {finished_epochs(repo)}"
    assert last == (f"error: training stopped by {signal.Signals(signum).name} after epoch {epoch}/{EPOCHS}; "
                    "models/checkpoint.pt holds it: rerun to resume"), stderr
    assert not (repo / "models/model.pt").exists()


def test_sigterm_stops_at_once_after_saving_and_a_rerun_resumes_even_on_another_port(repo, trained_repo, stage):
    """The train stage as its own process, signalled from outside as a scheduler or `kill` would; the rerun
    runs in this process (the same entry point and code: the checkpoint belongs to it)."""
    code, stderr, epoch = stop_after_first_epoch(repo, start(repo, sys.executable, "-m", "stages.train"),
                                                 signal.SIGTERM)
    assert_stopped_at_once(repo, code, stderr, signal.SIGTERM, epoch)
    # where the run executes is not part of what it computes (device: the CPU, as for the process above)
    set_params(repo, system__master_port=29999, system__device="cpu")
    ran = stage(repo, "train")
    assert ran.code == 0 and f"resuming from models/checkpoint.pt after epoch {epoch}/{EPOCHS}" in ran.output
    assert training_results(repo) == without_evaluation(trained_repo.results)


def test_sigint_mid_epoch_stops_at_once_and_a_checkpoint_of_other_params_is_ignored(repo, swept, stage,
                                                                                    monkeypatch):
    """In this process, with Ctrl-C (SIGINT) raised by the first training step of epoch 2 (the SIGTERM test
    signals a real process from outside); then a run of other params finds that checkpoint."""
    set_params(repo, system__device="cpu")

    def epoch_with_sigint(trainer, data, recipe, context, desc):
        if desc.startswith("epoch 2/"):
            trainer.step_model.register_forward_hook(lambda *_: os.kill(os.getpid(), signal.SIGINT))
        return train_epoch(trainer, data, recipe, context, desc)

    with monkeypatch.context() as patched:
        patched.setattr(fit, "train_epoch", epoch_with_sigint)
        ran = stage(repo, "train")
    assert_stopped_at_once(repo, ran.code, ran.err, signal.SIGINT, 1)
    set_params(repo, model__blocks=[1, 1, 1, 1])
    ran = stage(repo, "train")
    assert ran.code == 0 and "models/checkpoint.pt: from other params, data or code; starting afresh" in ran.output
    assert "resuming" not in ran.output and not (repo / CHECKPOINT).exists()
    # exactly what the uninterrupted [1, 1, 1, 1] run decided (the sweep's blocks-1111, run by DVC's queue beside
    # another experiment), not a mix with the other model's checkpoint
    assert training_results(repo) == without_evaluation(swept.results["blocks-1111"])


# every trick on, with values that make each show in 3 tiny epochs
ALL_TRICKS = {"train__optimizer": "sgd", "train__max_lr": 0.05, "train__weight_decay": 5e-4,
              "train__label_smoothing": 0.2, "train__flip": "alternating", "train__ema_decay": 0.6,
              "train__cutout": 8, "train__bn_lr_scale": 8, "evaluate__tta": "flip_translate", "system__device": "cpu"}


def test_a_run_with_every_trick_killed_mid_training_resumes_to_the_uninterrupted_result(data_repo, tmp_path, stage):
    """SGD's momentum, the EMA, the alternating flips and BatchNorm's own parameter group are state: the
    checkpoint holds them. (The train stage runs in this process but for the killed run, a real process
    killed with SIGKILL.)"""
    whole = copy_repo(data_repo.repo, tmp_path / "whole")
    set_params(whole, **ALL_TRICKS)
    assert stage(whole, "train").code == 0
    killed = copy_repo(data_repo.repo, tmp_path / "killed")
    set_params(killed, **ALL_TRICKS)
    code, _, epoch = stop_after_first_epoch(killed, start(killed, sys.executable, "-m", "stages.train"), signal.SIGKILL)
    assert code == -signal.SIGKILL and finished_epochs(killed) in range(epoch, EPOCHS)
    state = torch.load(killed / CHECKPOINT, weights_only=True)
    assert state["ema"]["n_averaged"] > 0 and state["flips"].dtype == torch.bool
    assert "momentum_buffer" in next(iter(state["optimizer"]["state"].values()))
    assert len(state["optimizer"]["param_groups"]) == 2  # BatchNorm's at 8 times the learning rate
    ran = stage(killed, "train")
    assert ran.code == 0 and "resuming from models/checkpoint.pt after epoch" in ran.output
    assert training_results(killed) == training_results(whole)

    # the saved model is the EMA, which every epoch validated: evaluate scores it as the last epoch did
    assert stage(killed, "evaluate").code == 0
    test, last = read_json(killed, "metrics/evaluate/metrics.json"), read_json(killed, "metrics/train/metrics.json")
    assert test["without_tta"]["accuracy"] == pytest.approx(last["test"]["acc"], abs=1e-6)
    assert test["without_tta"]["loss"] == pytest.approx(last["test"]["loss"], rel=1e-5)
    assert test["loss"] != pytest.approx(test["without_tta"]["loss"], rel=1e-4)  # the 6 views' mean logits


def test_push_then_pull_into_an_empty_cache_restores_every_output_bit_for_bit(trained_repo, tmp_path):
    repo = copy_repo(trained_repo.repo, tmp_path / "repo")
    dvc(repo, "remote", "add", "-d", "local", str(tmp_path / "remote"))
    dvc(repo, "push")
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    outputs = [out["path"] for stage in lock["stages"].values() for out in stage["outs"]]
    assert len(outputs) == 13  # the five stages' 11, and export's model.onnx and metrics/export
    saved = {path: file_bytes(repo / path) for path in outputs}
    for path in outputs:
        shutil.rmtree(repo / path) if (repo / path).is_dir() else (repo / path).unlink()
    shutil.rmtree(repo / ".dvc/cache")
    dvc(repo, "pull")
    assert {path: file_bytes(repo / path) for path in outputs} == saved
    assert "up to date" in dvc(repo, "status")


def file_bytes(path):
    """A file's bytes, or a folder's {relative name: bytes}."""
    if path.is_dir():
        return {str(p.relative_to(path)): p.read_bytes() for p in sorted(Path(path).rglob("*")) if p.is_file()}
    return path.read_bytes()
