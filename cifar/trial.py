"""A search trial's side of `python -m tools.search` (docs/experiments.md, "Searching the design space"): the
train stage of an experiment that an Optuna study proposed reports each epoch's validation accuracy to the study
(the run's model, its EMA when on, without TTA: the measure the objective takes at the last epoch), and stops when
the study's pruner says the trial is behind on it. tools.search names the trial in the environment
(TRIAL_ENV); a run without it is an ordinary run and never imports Optuna.

Only Optuna's public storage and pruner interfaces are used: the worker that asked for the trial owns it (its
heartbeat, its final state), and this process only adds intermediate values and a user attribute to it."""
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

from .workspace import UserError

TRIAL_ENV = "CIFAR_SEARCH_TRIAL"  # JSON: storage URL, study name, trial number, checkpoint key, pruner, worker pid
PRUNED_ATTR = "pruned_after_epoch"  # the user attribute that tells the worker its trial was pruned, not broken
WATCH_INTERVAL_S = 1.0


class Pruned(UserError):
    """The study's pruner stopped this trial: the train stage fails, so DVC records no experiment."""


def make_pruner(name, startup_trials, warmup_epochs):
    """Optuna's MedianPruner: after `startup_trials` trials have finished, a trial whose accuracy at an epoch
    (from `warmup_epochs` on) is below the median of the finished trials' at the same epoch is stopped. 'none'
    never stops one."""
    import optuna

    if name == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=warmup_epochs)


def trial_id(storage, study_name, number):
    """The storage's id of trial `number` of the study: what its public per-trial methods take."""
    return storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study_name), number)


class SearchTrial:
    """The trial this run is, from TRIAL_ENV's JSON."""

    def __init__(self, spec):
        import optuna

        self.number, self.study_name = spec["number"], spec["study"]
        self.storage = optuna.storages.RDBStorage(spec["storage"])
        self.study = optuna.load_study(study_name=self.study_name, storage=self.storage,
                                       pruner=make_pruner(**spec["pruner"]))
        self.id = trial_id(self.storage, self.study_name, self.number)
        # the trial and its retries (same params) share it; two trials at once never do (resume.checkpoint_path)
        self.checkpoint_key = spec["checkpoint"]
        watch_worker(spec["worker_pid"])

    def report(self, epoch, accuracy):
        """The epoch's validation accuracy, as the study's intermediate value of this trial at that step."""
        self.storage.set_trial_intermediate_value(self.id, epoch, accuracy)

    def after_epoch(self, epoch, epochs, accuracy):
        """Report the epoch's accuracy; raise Pruned when the pruner says stop (never after the last epoch:
        the trial is then finished)."""
        self.report(epoch, accuracy)
        if epoch < epochs and self.study.pruner.prune(self.study, self.storage.get_trial(self.id)):
            self.storage.set_trial_user_attr(self.id, PRUNED_ATTR, epoch)
            raise Pruned(f"search trial {self.number} of '{self.study_name}' pruned after epoch {epoch}/{epochs}: "
                         f"validation accuracy {accuracy:.4f} (its model, EMA when on, without TTA) is below the "
                         "median of the finished trials' at that epoch")


def search_trial(recipe):
    """The SearchTrial this run is, or None for an ordinary run."""
    spec = os.environ.get(TRIAL_ENV)
    if not spec:
        return None
    if recipe.world_size > 1:  # tools.search refuses this too; a trial's pruning decision is one process's
        raise UserError(f"a search trial trains on one process, not train.nproc * train.nnodes = {recipe.world_size}")
    return SearchTrial(json.loads(spec))


def watch_worker(pid):
    """Stop this run (SIGTERM: the train stage's clean stop) when the worker that started it is gone, killed
    by SIGKILL too: else the trial would train on, and finish as an experiment of a trial the study has given
    up on and will run again."""
    def watch():
        while True:
            time.sleep(WATCH_INTERVAL_S)
            if not alive(pid):
                print(f"the search worker (pid {pid}) is gone: stopping this trial", file=sys.stderr, flush=True)
                os.kill(os.getpid(), signal.SIGTERM)
                return
    threading.Thread(target=watch, daemon=True, name="search-worker-watch").start()


def alive(pid):
    """Whether process `pid` runs: a killed worker not yet reaped by its parent is a zombie, and dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:  # no /proc (not Linux): the signal's answer stands
        return True
