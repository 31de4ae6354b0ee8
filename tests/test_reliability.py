"""Interruption, reproducibility and storage, through DVC itself: training killed or stopped mid-run resumes
to the same result; a stale checkpoint is ignored; two queued experiments run at once, each correctly;
`dvc push`/`dvc pull` restore every output bit for bit. The tests run in order and share one repository."""
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from dvcrepo import dvc, make_repo, read_json, results, run, set_params, stages_run, start

CHECKPOINT = "models/checkpoint.pt"
CURVES = ["train/loss", "train/acc", "val/loss", "val/acc", "lr"]
baseline = {}  # the uninterrupted seed-0 run's results, filled by the first test


@pytest.fixture(scope="module")
def repo(tmp_path_factory, archive):
    """The data stages run and committed (so queued experiments start from them), training not yet."""
    repo = make_repo(tmp_path_factory.mktemp("reliability"), archive, train__epochs=4)
    dvc(repo, "repro", "stats")
    run(repo, "git", "add", "dvc.lock")
    run(repo, "git", "commit", "-qm", "data")
    return repo


def training_results(repo):
    """What a training run decides (no timings): its metrics, every curve, the test evaluation if there."""
    found = {"metrics": results(read_json(repo, "metrics/train/metrics.json")),
             "curves": {name: (repo / f"metrics/train/plots/metrics/{name}.tsv").read_text() for name in CURVES}}
    if (repo / "models/model.pt").is_file():
        found["model"] = (repo / "models/model.pt").read_bytes()
    return found


def finished_epochs(repo):
    try:
        return torch.load(repo / CHECKPOINT, weights_only=True)["progress"]["epoch"]
    except FileNotFoundError:
        return 0


def stop_after_first_epoch(repo, process, signum):
    """Send `signum` to the process group of `process` once the checkpoint holds a finished epoch."""
    deadline = time.monotonic() + 300
    while finished_epochs(repo) < 1:
        assert process.poll() is None, f"exited before a checkpoint:\n{process.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, "no checkpoint after 300 s"
        time.sleep(0.02)
    os.killpg(process.pid, signum)
    stdout, stderr = process.communicate(timeout=120)
    return process.returncode, stderr


def test_an_uninterrupted_run_leaves_no_checkpoint(repo):
    assert stages_run(dvc(repo, "repro")) == {"train", "evaluate", "plot"}
    assert not (repo / CHECKPOINT).exists()  # done: a forced rerun trains afresh
    baseline.update(training_results(repo), evaluate=read_json(repo, "metrics/evaluate/metrics.json"))


def test_dvc_repro_killed_mid_training_resumes_to_the_same_result(repo):
    # as on a first run: neither dvc.lock nor the run-cache knows a result that DVC could check out instead
    run(repo, "git", "checkout", "--", "dvc.lock")
    shutil.rmtree(repo / ".dvc/cache/runs")
    process = start(repo, sys.executable, "-m", "dvc", "repro")
    code, _ = stop_after_first_epoch(repo, process, signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert finished_epochs(repo) in (1, 2, 3) and not (repo / "models/model.pt").exists()
    output = dvc(repo, "repro")
    assert "resuming from models/checkpoint.pt after epoch" in output
    assert stages_run(output) == {"train", "evaluate", "plot"}
    assert read_json(repo, "metrics/evaluate/metrics.json") == baseline["evaluate"]
    assert training_results(repo) == {k: v for k, v in baseline.items() if k != "evaluate"}
    assert not (repo / CHECKPOINT).exists()


def stop_training_directly(repo, signum):
    """Run the train stage directly, stop it with `signum` after an epoch; return the finished epochs."""
    (repo / "models/model.pt").unlink(missing_ok=True)
    code, stderr = stop_after_first_epoch(repo, start(repo, sys.executable, "-m", "stages.train"), signum)
    last = stderr.strip().splitlines()[-1]
    assert code == 128 + signum and "Traceback" not in stderr, stderr
    epochs = finished_epochs(repo)
    assert last == (f"error: training stopped by {signal.Signals(signum).name} after epoch {epochs}/4; "
                    "models/checkpoint.pt holds it: rerun to resume"), stderr
    assert epochs >= 1 and not (repo / "models/model.pt").exists()
    return epochs


def test_sigterm_stops_cleanly_after_saving_and_a_rerun_resumes(repo):
    epochs = stop_training_directly(repo, signal.SIGTERM)
    assert f"resuming from models/checkpoint.pt after epoch {epochs}/4" in run(repo, sys.executable, "-m",
                                                                                 "stages.train")
    assert training_results(repo) == {k: v for k, v in baseline.items() if k != "evaluate"}


def test_sigint_stops_cleanly_and_a_checkpoint_of_other_params_is_ignored(repo):
    stop_training_directly(repo, signal.SIGINT)
    set_params(repo, train__seed=1)
    output = dvc(repo, "repro")
    assert "models/checkpoint.pt: from other params, data or code; starting afresh" in output
    assert "resuming" not in output and not (repo / CHECKPOINT).exists()
    other = training_results(repo)  # and another seed gives other results
    assert other["metrics"] != baseline["metrics"] and other["curves"]["train/loss"] != baseline["curves"]["train/loss"]
    baseline["seed 1"] = other["metrics"]


def test_two_queued_experiments_run_at_once_each_with_its_own_correct_metrics(repo):
    run(repo, "git", "checkout", "--", "params.yaml", "dvc.lock")  # back to the committed data stages, seed 0
    shutil.rmtree(repo / ".dvc/cache/runs")  # no run-cache: both experiments must really train
    for seed in (0, 1):
        dvc(repo, "exp", "run", "--queue", "-S", f"train.seed={seed}")
    assert "Started '2' new experiments task queue workers" in dvc(repo, "queue", "start", "-j", "2")
    deadline = time.monotonic() + 600
    try:
        while " Running" in (status := dvc(repo, "queue", "status")) or " Queued" in status:
            assert time.monotonic() < deadline, f"queue still busy after 600 s:\n{status}"
            time.sleep(1)
    finally:
        dvc(repo, "queue", "stop")
    assert status.count(" Success") == 2, status

    experiments = {}
    for base in json.loads(dvc(repo, "exp", "show", "--json")):
        for experiment in base.get("experiments") or []:
            data = experiment["revs"][0]["data"]
            seed = data["params"]["params.yaml"]["data"]["train"]["seed"]
            experiments[seed] = {name: metrics["data"] for name, metrics in data["metrics"].items()}
    assert sorted(experiments) == [0, 1]
    assert results(experiments[0]["metrics/train/metrics.json"]) == baseline["metrics"]
    assert experiments[0]["metrics/evaluate/metrics.json"] == baseline["evaluate"]
    assert results(experiments[1]["metrics/train/metrics.json"]) == baseline["seed 1"]


def test_push_then_pull_into_an_empty_cache_restores_every_output_bit_for_bit(repo, tmp_path):
    dvc(repo, "repro")  # seed 0 again: restored from the run-cache the experiments left
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "results")
    dvc(repo, "remote", "add", "-d", "local", str(tmp_path / "remote"))
    dvc(repo, "push")
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    outputs = [out["path"] for stage in lock["stages"].values() for out in stage["outs"]]
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
