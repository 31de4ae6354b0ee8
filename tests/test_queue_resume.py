"""A queued experiment stopped mid-training resumes when the same experiment is queued again, to the result of
an uninterrupted run: DVC discards the temporary copy a queued run trains in, so its checkpoint lives in the
original repository (.dvc/tmp/checkpoints, named by the run's fingerprint)."""
import signal

import psutil
import torch
from deadlines import WAIT_S, wait_until
from dvcrepo import copy_repo, dvc, experiment_refs, experiment_results, run, start_workers, stop_queue


def wait(condition, what):
    return wait_until(condition, WAIT_S, what, interval=0.2)


def saved_epoch(checkpoints):
    """(the checkpoint in `checkpoints`, its finished epochs) once one holds a finished epoch, else None."""
    for path in checkpoints.glob("*.pt"):
        finished = torch.load(path, weights_only=True)["progress"]["finished"]
        if finished:
            return path, finished
    return None


def training_process(repo):
    """The train stage of a queued run: `python -m stages.train` in a temporary copy under .dvc/tmp/exps."""
    for process in psutil.process_iter(["cmdline", "cwd"]):
        if "stages.train" in (process.info["cmdline"] or []) and \
                (process.info["cwd"] or "").startswith(str(repo / ".dvc/tmp/exps")):
            return process
    return None


def refs(repo, prefix):
    return run(repo, "git", "for-each-ref", "--format=%(refname)", prefix).split()


def test_a_queued_experiment_stopped_mid_training_resumes_when_queued_again(data_repo, trained_repo, tmp_path):
    repo = copy_repo(data_repo.repo, tmp_path / "repo")  # trained_repo's params, data and code, not yet trained
    checkpoints = repo / ".dvc/tmp/checkpoints"
    try:
        dvc(repo, "exp", "run", "--queue", "-n", "stopped")
        start_workers(repo, tmp_path / "stopped.log", jobs=1)
        checkpoint, epoch = wait(lambda: saved_epoch(checkpoints), "checkpoint outside the temporary copy")
        wait(lambda: training_process(repo), "train stage in a temporary copy").send_signal(signal.SIGTERM)
        wait(lambda: refs(repo, "refs/exps/celery/failed"), "failed experiment")
        assert (f"training stopped by SIGTERM after epoch {epoch}/3; {checkpoint} holds it: queue the same "
                "experiment again to resume") in dvc(repo, "queue", "logs", "stopped")
        assert checkpoint.is_file() and not list((repo / ".dvc/tmp/exps").glob("tmp*"))  # only the copy is gone

        dvc(repo, "exp", "run", "--queue", "-n", "again")
        start_workers(repo, tmp_path / "again.log", jobs=1)
        wait(lambda: "again" in experiment_refs(repo), "finished experiment")
    finally:
        stop_queue(repo)
    assert f"resuming from {checkpoint} after epoch {epoch}/3" in dvc(repo, "queue", "logs", "again")
    assert experiment_results(repo, experiment_refs(repo)["again"]) == trained_repo.results
    assert not checkpoint.exists()  # done: the same experiment queued once more trains afresh
