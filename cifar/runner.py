"""A search worker's trials (tools.search, docs/experiments.md): each a `dvc exp run --temp` of the train stage
in its own process group, side by side (--jobs), until the study has the trials asked for.

What a trial is judged by: every epoch it reports its validation accuracy (the run's model, its EMA when on,
without TTA: cifar.trial), the pruner compares that with the finished trials' at the same epoch, and the
objective is the same measure after the last epoch, so a pruned trial was behind on the very number the
finished ones are ranked by. The final model is also scored with each TTA mode (cifar.fit); the trial's best
is recorded beside it and becomes evaluate.tta of the study's best (study.best_values)."""
import csv
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .params import format_value, parse_value
from .space import Space, refusal
from .study import (
    FAILED,
    NOT_RUN,
    REFUSED,
    STOPPED,
    base_params,
    check_code,
    check_params,
    counts,
    done,
    outcome,
    state,
    tta_choice,
    with_settings,
)
from .trial import PRUNED_ATTR, TRIAL_ENV, trial_id
from .workspace import TRAIN_LOG_DIR, UserError

MAX_REFUSED_PER_TRIAL = 10  # refusals cost nothing, but a space mostly over budget would propose forever
MAX_FAILURES_IN_A_ROW = 3  # a trial failing on its own (a crash, a bad combination) is recorded and the search goes
# on; this many in a row, with no trial finished between them, is a cause no trial will get past: the worker stops


class NotRun(Exception):
    """A trial asked for after the study had its N (two workers asked at once), or after the search was
    stopped: failed without running."""


class TrialFailed(Exception):
    """A trial whose training failed for reasons of its own: recorded failed, with the reason."""


@dataclass
class Search:
    """One worker's search: the study, its space and settings, and what it runs trials with."""
    study: object
    storage: object
    space: Space
    settings: dict
    base: dict  # params.yaml's sections with the settings: what a trial's values go into
    trials: int
    pruner: dict
    report_dir: Path
    jobs: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    errors: list = field(default_factory=list)  # a thread's error stops every thread of this worker
    failures: list = field(default_factory=list)  # this worker's failed trials since its last finished one
    # held by one thread from asking Optuna for a trial until its objective starts: Optuna pops a queued
    # (WAITING) trial by a read then a write, which on SQLite two threads can both win, running one trial twice
    asking: threading.Lock = field(default_factory=threading.Lock)
    asker: threading.local = field(default_factory=threading.local)
    # the running trials' processes, and whether the search was stopped: the worker forwards its stop to them
    trials_lock: threading.Lock = field(default_factory=threading.Lock)
    running: set = field(default_factory=set)
    stopped_by: str = ""

    @property
    def name(self):
        return self.study.study_name


def counted(trial):
    """Whether a trial counts towards the N asked for: finished, pruned, or running (it may yet finish)."""
    return state(trial) in ("complete", "pruned", "running")


def trial_command(search, name, values):
    """`dvc exp run --temp` of the train stage alone (the search never reads the test set, which evaluate
    scores), with the study's settings and the trial's values. --wait-for-lock (DVC >= 3.61): trials that
    start together queue for the repository's lock instead of failing after DVC's few seconds (dvc#5718)."""
    params = {**{k: format_value(v) for k, v in search.settings.items()},
              **{k: format_value(v) for k, v in values.items()}}
    settings = [arg for key, value in params.items() for arg in ("-S", f"{key}={value}")]
    return [sys.executable, "-m", "dvc", "--wait-for-lock", "exp", "run", "--temp", "-n", name, *settings, "train"]


def trial_environment(search, trial):
    """The trial's environment: which trial it is (cifar.trial) and its checkpoint's key (the study and the
    first trial of its params: a retry resumes its own checkpoint, no other trial does), and on a CPU its share
    of the cores."""
    frozen = search.storage.get_trial(trial_id(search.storage, search.name, trial.number))
    origin = frozen.system_attrs.get("failed_trial")  # the retry callback's record of the first of its params
    env = {**os.environ, TRIAL_ENV: json.dumps({
        "storage": search.storage.url, "study": search.name, "number": trial.number, "pruner": search.pruner,
        "checkpoint": f"{search.name}-t{trial.number if origin is None else origin}", "worker_pid": os.getpid()})}
    if search.jobs > 1 and "OMP_NUM_THREADS" not in os.environ:  # trials side by side on a CPU share its cores
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // search.jobs))
    return env


def read_experiment(search, name, path):
    """A file of the finished experiment `name`, read from DVC's cache."""
    import dvc.api
    from dvc.exceptions import DvcException

    with search.lock:  # one DVC API call at a time in this process
        try:
            return dvc.api.read(path, rev=name)
        except (DvcException, FileNotFoundError, ValueError) as e:
            raise UserError(f"experiment {name}: {path} not readable ({type(e).__name__}: {e})".splitlines()[0])


def report_curve(search, trial, name):
    """Every epoch's validation accuracy of the experiment into the study where the trial has none: a run DVC
    restored from its run cache reported nothing, and a resumed one may have missed some."""
    frozen = search.storage.get_trial(trial_id(search.storage, search.name, trial.number))
    text = read_experiment(search, name, (TRAIN_LOG_DIR / "plots/metrics/validation/acc.tsv").as_posix())
    for row in csv.DictReader(io.StringIO(text), delimiter="\t"):
        if int(row["step"]) not in frozen.intermediate_values:
            trial.report(float(row["acc"]), int(row["step"]))


def last_error(log):
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.startswith(("error:", "ERROR"))]
    return lines[0] if lines else "no error line"


def objective(search):
    """One trial: its values, refused or run as a DVC experiment; the final validation accuracy (see the
    module's docstring), with the TTA modes' scores recorded beside it."""
    import optuna

    def run_trial(trial):
        done_asking(search)
        for attr in (STOPPED, NOT_RUN, FAILED):  # a retry inherits its failed trial's attributes: not its fate
            if trial.user_attrs.get(attr):
                trial.set_user_attr(attr, "")
        # two workers that asked at once may both have taken the N-th trial: the later one stands down
        if sum(counted(t) for t in search.study.get_trials(deepcopy=False) if t.number < trial.number) >= search.trials:
            trial.set_user_attr(NOT_RUN, f"the study had its {search.trials} trials")
            raise NotRun()
        check_code(search.study)
        # the space's keys aside: `dvc exp run` writes a trial's values of them into params.yaml while it sets the
        # trial up, this worker's or another's, and params.yaml's own values of them reach no trial (each sets all)
        check_params(search.study, with_settings(base_params(), search.settings), search.space.keys)
        values = search.space.suggest(trial)
        reason = refusal(search.base, values)
        if reason:
            # pruned and infeasible (a constraint > 0): TPE learns the region, where it would ignore a failure
            trial.set_user_attr(REFUSED, reason)
            trial.set_constraint("trainable", 1.0)
            raise optuna.TrialPruned()
        name = f"{search.name}-t{trial.number}"
        trial.set_user_attr("experiment", name)
        log = search.report_dir / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        print(f"trial {trial.number} {name} started: {' '.join(f'{k}={format_value(v)}' for k, v in values.items())}"
              f" (log: {log})", flush=True)
        with open(log, "w") as out:
            code = run_process(search, trial, trial_command(search, name, values),
                               env=trial_environment(search, trial), stdout=out, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL)
        if code:
            attrs = search.storage.get_trial_user_attrs(trial_id(search.storage, search.name, trial.number))
            if PRUNED_ATTR in attrs:
                trial.set_user_attr(PRUNED_ATTR, attrs[PRUNED_ATTR])
                raise optuna.TrialPruned()
            if search.stopped_by:  # not the trial's fault: queued again at the next start (study.retry_stopped)
                trial.set_user_attr(STOPPED, search.stopped_by)
                raise NotRun()
            reason = last_error(log)
            trial.set_user_attr(FAILED, reason)
            raise TrialFailed(f"trial {trial.number} ({name}) failed: {reason} (its log: {log})")
        # what the trial trained, whenever params.yaml was edited: the study's params but for its own values
        check_params(search.study, parse_value(read_experiment(search, name, "params.yaml")), search.space.keys,
                     f"params.yaml (trial {trial.number} trained with it)")
        metrics = json.loads(read_experiment(search, name, (TRAIN_LOG_DIR / "metrics.json").as_posix()))
        report_curve(search, trial, name)
        trial.set_user_attr("epochs", metrics["step"])
        trial.set_user_attr("tta", metrics["validation"]["acc_with_tta"])
        return metrics["validation"]["acc"]
    return run_trial


def run_process(search, trial, args, **kwargs):
    """Run a trial's command in its own process group, which stop() signals: a signal to the worker alone
    (kill PID, a scheduler's SIGTERM) stops its trials as surely as a terminal's Ctrl-C does."""
    with search.trials_lock:  # a stop either comes before this trial starts, or finds its process
        if search.stopped_by:
            trial.set_user_attr(NOT_RUN, f"the search was stopped by {search.stopped_by}")
            trial.set_user_attr(STOPPED, search.stopped_by)
            raise NotRun()
        process = subprocess.Popen(args, process_group=0, **kwargs)
        search.running.add(process)
    try:
        return process.wait()
    finally:
        with search.trials_lock:
            search.running.discard(process)


def stop(search, received):
    """Stop the search on a signal: no trial starts any more, and the running ones get SIGINT, the train
    stage's clean stop (they fail, and are queued again at the next start)."""
    with search.trials_lock:
        if search.stopped_by:  # a second Ctrl-C changes nothing: the trials are stopping
            return
        search.stopped_by = "Ctrl-C (SIGINT)" if received == signal.SIGINT else received.name
        search.errors.insert(0, UserError(f"search stopped by {search.stopped_by}; rerun the same command to "
                                          f"continue it (the report of the trials so far is in {search.report_dir})"))
        for process in search.running:
            try:
                os.killpg(process.pid, signal.SIGINT)
            except ProcessLookupError:  # ended just now
                pass


def progress(search, started):
    """The optimize callback: one line per trial once Optuna has recorded it, and the count of this worker's
    failures in a row, which stops it at MAX_FAILURES_IN_A_ROW."""
    def report(study, trial):
        found = counts(study)
        best = ""
        if found.get("complete"):
            mode, accuracy = tta_choice(study.best_trial)
            best = f"; best {study.best_trial.value:.4f} (trial {study.best_trial.number}; {mode} TTA {accuracy:.4f})"
        extra = "".join(f", {found[k]} {k}" for k in ["refused", "fail", "not run"] if found.get(k))
        print(f"trial {trial.number} {outcome(trial)} | {done(found)}/{search.trials} done "
              f"({found.get('complete', 0)} finished, {found.get('pruned', 0)} pruned{extra}){best} | "
              f"{time.monotonic() - started:.0f} s", flush=True)
        with search.lock:
            if state(trial) in ("complete", "pruned"):
                search.failures.clear()
            elif trial.user_attrs.get(FAILED):
                search.failures.append(trial)
                if len(search.failures) == MAX_FAILURES_IN_A_ROW:
                    last = search.failures[-1]
                    search.errors.append(UserError(
                        f"{MAX_FAILURES_IN_A_ROW} trials in a row failed (the last, trial {last.number}: "
                        f"{last.user_attrs[FAILED]}; logs in {search.report_dir / 'logs'}): fix the cause and rerun "
                        "the same command to continue"))
    return report


def work(search, started, poll_s=2.0):
    """One worker's loop: trials until the study has N finished or pruned ones. The last ones may be running
    in other workers (or in one that died, whose trials fail once their heartbeat is stale and are asked for
    again): then it waits for them. (Optuna's MaxTrialsCallback and n_jobs count every pruned trial, refused
    ones too, and stop without waiting for other workers' running trials: hence this loop.)"""
    import optuna

    run_trial, report = objective(search), progress(search, started)
    while not search.errors:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(search.study)
        trials = search.study.get_trials(deepcopy=False)
        if done(counts(search.study)) >= search.trials:
            return
        refused = sum(state(t) == "refused" for t in trials)
        if refused > MAX_REFUSED_PER_TRIAL * search.trials:
            raise UserError(f"{refused} proposals refused before training (over model.max_params, or keys that "
                            "disagree): narrow the space")
        waiting = any(t.state.name == "WAITING" for t in trials)
        if not waiting and sum(counted(t) for t in trials) >= search.trials:
            time.sleep(poll_s)
            continue
        search.asking.acquire()
        search.asker.holds = True
        try:
            search.study.optimize(run_trial, n_trials=1, catch=(NotRun, TrialFailed), callbacks=[report])
        finally:
            done_asking(search)


def done_asking(search):
    """This thread has its trial (or none came): another may ask for one."""
    if getattr(search.asker, "holds", False):
        search.asker.holds = False
        search.asking.release()


def work_thread(search, started):
    try:
        work(search, started)
    except Exception as e:  # main() reports it once the other threads' trials have ended; they start no more
        search.errors.append(e)
