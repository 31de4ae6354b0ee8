"""One GPU per concurrent run, without GPUs: concurrent processes claim 4 simulated GPUs (their ids) through
the real locks in a folder of their own, and the device setting is resolved with CUDA's answers
monkeypatched; inference takes its GPU at once, claiming none."""
import importlib
import multiprocessing
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

from cifar import devices
from cifar.devices import (
    choose_device,
    claim_gpus,
    describe,
    inference_device,
    launch_environment,
    rank_device,
    visible_gpus,
)
from cifar.workspace import UserError

GPUS = ["0", "1", "2", "3"]
FORK = multiprocessing.get_context("fork")  # the test's torch is already imported: a fork starts at once


def holder(lock_dir, count, pipe):
    """Claim `count` GPUs, report them, hold them until told to go (or killed)."""
    claim = claim_gpus(count, GPUS, lock_dir, poll_s=0.05, say=lambda *a, **k: pipe.send("waiting"))
    pipe.send(claim.gpus)
    pipe.recv()


class Run:
    """A process holding GPUs, as a concurrently running train stage does."""

    def __init__(self, lock_dir, count=1):
        self.pipe, child = FORK.Pipe()
        self.process = FORK.Process(target=holder, args=(lock_dir, count, child), daemon=True)
        self.process.start()

    def answer(self, timeout=20):
        """The GPUs it claimed, or 'waiting'; None if it said nothing within `timeout` s."""
        return self.pipe.recv() if self.pipe.poll(timeout) else None

    def claimed(self, timeout=20):
        answer = self.answer(timeout)
        while answer == "waiting":
            answer = self.answer(timeout)
        return answer

    def finish(self):
        self.pipe.send("go")
        self.process.join(10)


def test_two_concurrent_runs_get_different_gpus(tmp_path):
    runs = [Run(tmp_path) for _ in range(2)]
    claims = [run.claimed() for run in runs]
    assert sorted(claims) == [["0"], ["1"]]
    for run in runs:
        run.finish()


def test_a_fifth_run_on_four_gpus_waits_until_one_is_free(tmp_path):
    runs = [Run(tmp_path) for _ in range(4)]
    claims = [run.claimed() for run in runs]
    assert sorted(gpu for claim in claims for gpu in claim) == GPUS  # four runs, four GPUs, none shared
    fifth = Run(tmp_path)
    assert fifth.answer() == "waiting" and fifth.answer(timeout=1) is None  # it says so once, and waits
    runs[2].finish()  # a run ends: its GPU is free
    assert fifth.claimed() == claims[2]
    for run in [*runs[:2], runs[3], fifth]:
        run.finish()


def test_a_killed_runs_gpu_is_free_again(tmp_path):
    runs = [Run(tmp_path) for _ in range(4)]
    claims = [run.claimed() for run in runs]
    waiting = Run(tmp_path)
    assert waiting.answer() == "waiting"
    os.kill(runs[1].process.pid, signal.SIGKILL)  # no chance to clean up: the kernel drops its lock
    assert waiting.claimed() == claims[1]
    for run in [runs[0], *runs[2:], waiting]:
        run.finish()


def test_a_two_process_run_claims_two_gpus_and_waits_for_two(tmp_path):
    pair = Run(tmp_path, count=2)
    assert pair.claimed() == ["0", "1"]
    single = Run(tmp_path)
    assert single.claimed() == ["2"]
    second_pair = Run(tmp_path, count=2)
    assert second_pair.answer() == "waiting"  # only GPU 3 is free; it holds none while it waits
    third = Run(tmp_path)
    assert third.claimed() == ["3"]
    pair.finish()
    assert second_pair.claimed() == ["0", "1"]
    for run in [single, second_pair, third]:
        run.finish()


def test_more_gpus_than_visible_is_an_error(tmp_path):
    with pytest.raises(UserError, match=r"5 GPU\(s\) needed \(train.nproc\) but 4 visible: 0, 1, 2, 3"):
        claim_gpus(5, GPUS, tmp_path)


@pytest.fixture
def four_gpus(monkeypatch, tmp_path):
    """CUDA answering as a machine with 4 GPUs would; the locks in a folder of the test's own."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return tmp_path


def test_the_device_setting(four_gpus, monkeypatch):
    assert choose_device("cpu") == (torch.device("cpu"), None)
    assert choose_device("cuda:2") == (torch.device("cuda", 2), None)
    with pytest.raises(UserError, match=r"system.device = 'cuda:4': 4 GPU\(s\) visible \(0 to 3\)"):
        choose_device("cuda:4")
    with pytest.raises(UserError) as e:  # one GPU named, for a run of two processes
        choose_device("cuda:0", count=2)
    assert str(e.value) == ("system.device = 'cuda:0': 4 GPU(s) visible (0 to 3), and it names one GPU for one "
                            "process; use auto or cuda to let each run claim its GPUs")
    first, claim = choose_device("auto", lock_dir=four_gpus)
    second, other = choose_device("cuda", lock_dir=four_gpus)  # the same process: a lock is per open file
    assert (first, claim.gpus, second, other.gpus) == (torch.device("cuda", 0), ["0"], torch.device("cuda", 1), ["1"])
    pair = choose_device("auto", count=2, lock_dir=four_gpus)[1]
    assert pair.gpus == ["2", "3"] and launch_environment(pair) == {"CUDA_VISIBLE_DEVICES": "2,3"}
    for held in (claim, other, pair):
        held.release()
    assert choose_device("auto", lock_dir=four_gpus)[1].gpus == ["0"]  # released: free again


def test_cuda_visible_devices_limits_the_choice(four_gpus, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # CUDA shows those two, as cuda:0 and cuda:1
    assert visible_gpus() == ["3", "1"]
    busy = claim_gpus(1, ["3"], four_gpus)  # another run holds GPU 3
    device, claim = choose_device("auto", lock_dir=four_gpus)
    assert device == torch.device("cuda", 1) and claim.gpus == ["1"]  # GPU 1 is this process's cuda:1
    busy.release()
    claim.release()


def test_a_claimed_gpu_is_the_cuda_index_of_its_position_not_its_id(four_gpus, monkeypatch):
    """CUDA numbers the visible GPUs from 0 in CUDA_VISIBLE_DEVICES's order: GPU 0, listed second, is cuda:1,
    and GPU 2, listed first, is cuda:0."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,0")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    device, claim = choose_device("auto", lock_dir=four_gpus)
    assert (device, claim.gpus) == (torch.device("cuda", 0), ["2"])
    other_device, other = choose_device("cuda", lock_dir=four_gpus)  # GPU 2 held: the next listed
    assert (other_device, other.gpus) == (torch.device("cuda", 1), ["0"])
    assert launch_environment(other) == {"CUDA_VISIBLE_DEVICES": "0"}
    claim.release()
    other.release()


def test_without_a_gpu_auto_is_the_cpu_and_cuda_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert choose_device("auto") == (torch.device("cpu"), None)
    with pytest.raises(UserError, match="system.device = 'cuda' but PyTorch sees no CUDA GPU"):
        choose_device("cuda")


def test_the_training_line_names_the_gpu_by_its_id_and_model_and_how_it_was_chosen(four_gpus, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,0")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: f"GPU model of {device}")
    assert describe(torch.device("cpu"), None) == "cpu"
    device, claim = choose_device("cuda", lock_dir=four_gpus)
    assert describe(device, claim) == "cuda:0 (GPU 2, GPU model of cuda:0, claimed)"
    assert describe(torch.device("cuda", 1), None) == "cuda:1 (GPU 0, GPU model of cuda:1, as set)"
    assert describe(torch.device("cuda"), None) == "cuda (GPU 2, GPU model of cuda, as set)"  # no index: cuda:0
    claim.release()


def test_a_rank_trains_on_the_cpu_or_on_its_launchers_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert [rank_device(s) for s in ("auto", "cuda", "cuda:1", "cpu")] == [torch.device("cuda")] * 3 + [
        torch.device("cpu")]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert rank_device("auto") == torch.device("cpu")


def test_a_run_that_waits_says_so_once_polls_and_takes_the_gpus_freed(tmp_path, monkeypatch):
    """In one process (a lock is per open file): GPUs 0 and 1 of 3 held; a run needing 2 waits, says so once,
    sleeps poll_s between tries, and gets 1 and 2 once 0 and 1 are free."""
    busy = claim_gpus(2, ["0", "1", "2"], tmp_path / "locks" / "nested")  # the lock folder is made, parents too
    said, slept = [], []
    monkeypatch.setattr(devices.time, "sleep", lambda s: slept.append(s) or (len(slept) == 2 and busy.release()))
    claim = claim_gpus(2, ["0", "1", "2"], tmp_path / "locks" / "nested", say=lambda *a, **k: said.append((a, k)))
    assert claim.gpus == ["0", "1"] and slept == [2.0, 2.0]  # the default poll: every 2 s
    assert said == [((f"waiting for 2 free GPU(s): 2 of the 3 visible are held by other runs of this project "
                      f"(locks in {tmp_path / 'locks' / 'nested'})",), {"flush": True})]
    claim.release()
    claim.release()  # a second release does nothing
    assert claim_gpus(3, ["0", "1", "2"], tmp_path / "locks" / "nested").gpus == ["0", "1", "2"]


def test_a_gpu_named_by_uuid_gets_a_lock_file_of_safe_characters(tmp_path):
    claim = claim_gpus(1, ["GPU-8a/Zz:09_.-"], tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["gpu-GPU-8a_Zz_09_.-.lock"]
    claim.release()


def test_no_gpu_visible_is_said_as_none(tmp_path):
    with pytest.raises(UserError, match=r"^1 GPU\(s\) needed \(train.nproc\) but 0 visible: none$"):
        claim_gpus(1, [], tmp_path)
    assert launch_environment(None) == {}  # no claim (the CPU, or cuda:K as set): nothing to add


def test_inference_takes_a_free_gpu_else_shares_one_and_never_waits(four_gpus, monkeypatch):
    """Trainings hold GPUs 0 and 1: inference takes GPU 2; they hold all four: it shares the first, at once.
    It claims none, so a training started after it still gets every GPU no training holds."""
    monkeypatch.setattr(devices.time, "sleep", lambda s: pytest.fail("waited for a GPU"))
    claim_gpus(4, GPUS, four_gpus).release()  # trainings that ended: every GPU has its lock file, free
    first_two = claim_gpus(2, GPUS, four_gpus)
    assert inference_device("auto", four_gpus) == inference_device("cuda", four_gpus) == torch.device("cuda", 2)
    last_two = claim_gpus(2, GPUS, four_gpus)  # GPU 2 free to claim: inference held nothing
    assert last_two.gpus == ["2", "3"]
    assert inference_device("auto", four_gpus) == inference_device("cuda", four_gpus) == torch.device("cuda", 0)
    assert inference_device("cuda:3", four_gpus) == torch.device("cuda", 3)  # as set, held or not
    assert inference_device("cpu", four_gpus) == torch.device("cpu")
    first_two.release()
    last_two.release()


def test_inference_looks_at_the_visible_gpus_in_cuda_order_and_makes_no_lock_file(four_gpus, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    busy = claim_gpus(1, ["3"], four_gpus)  # GPU 1 was never claimed: it has no lock file
    assert inference_device("auto", four_gpus) == torch.device("cuda", 1)  # GPU 1, this process's cuda:1
    assert [p.name for p in four_gpus.iterdir()] == ["gpu-3.lock"]  # looking made no lock file
    busy.release()


def test_inference_without_a_gpu_is_on_the_cpu_and_cuda_is_an_error(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert inference_device("auto", tmp_path) == torch.device("cpu")
    with pytest.raises(UserError, match="system.device = 'cuda' but PyTorch sees no CUDA GPU"):
        inference_device("cuda", tmp_path)


@pytest.mark.parametrize("entry", ["stages.evaluate", "tools.predict"])
def test_evaluate_and_predict_never_wait_behind_training(four_gpus, monkeypatch, stage, entry):
    """Trainings hold every GPU: evaluate and tools.predict take the first, shared, at once, and stop only at
    the missing model. Their inference_device looks at the test's locks, not the machine's."""
    held = claim_gpus(4, GPUS, four_gpus)
    monkeypatch.setattr(devices.time, "sleep", lambda s: pytest.fail("waited for a GPU"))
    monkeypatch.setattr(devices, "claim_gpus", lambda *a, **k: pytest.fail("claimed a GPU"))
    module, got = importlib.import_module(entry), []
    monkeypatch.setattr(module, "inference_device",
                        lambda setting: got.append(inference_device(setting, four_gpus)) or got[-1])
    work = four_gpus / "work"
    work.mkdir()
    shutil.copy(Path(__file__).resolve().parent.parent / "params.yaml", work)  # system.device: auto
    (work / "cat.png").touch()
    ran = stage(work, entry, "cat.png") if entry == "tools.predict" else stage(work, "evaluate")
    assert ran.code == 1 and ran.err.startswith("error: models/model.pt: no such checkpoint"), ran.output
    assert got == [torch.device("cuda", 0)]
    held.release()
