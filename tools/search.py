"""Search the study's design space with Optuna: `python -m tools.search SPACE.yaml --trials N [-S key=value ...]`.

Every trial is a DVC experiment: `dvc exp run --temp -n STUDY-tK -S ... train`, in a copy of the workspace, so
that several trials run at once and the workspace stays free. A trial trains and is scored on the held-out
validation images (train.validation_images > 0): the search never reads the test set, and the objective is
the final validation accuracy with evaluate.tta's test-time augmentation. The train stage reports every epoch's
validation accuracy (without TTA) to the study, and Optuna's MedianPruner stops a trial that is behind (it
fails, so DVC keeps no experiment of it). A proposal
over model.max_params, or one the params' schemas refuse, is refused before training.

The study lives in a storage that outlives the process (default: SQLite in .optuna/, git-ignored; for several
machines, one PostgreSQL URL): rerun the same command after a stop and it continues the same study, until N
trials have finished or been pruned. Each worker's trials keep a heartbeat; a trial whose worker died (killed,
its machine lost) is failed once its heartbeat is older than 3 beats and run again with the same params.

Writes reports/STUDY/: trials.md (every trial's state, params, validation accuracy, epochs), Optuna's figures
(history.png, importances.png, parallel_coordinate.png) and logs/ (each trial's output). The best trial's
params become a tools.sweep preset: `python -m tools.sweep --best-of STUDY --seeds 0 1 2`."""
import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy
import torch

from cifar.augment import EvaluateParams
from cifar.data import DataParams
from cifar.devices import System
from cifar.export import ExportParams
from cifar.imports import ROOT, code_of
from cifar.model import ModelParams, ResNet, count_parameters
from cifar.params import check_section, load_yaml, parse_value, read_params
from cifar.training import Recipe
from cifar.trial import PRUNED_ATTR, TRIAL_ENV, trial_id
from cifar.workspace import TRAIN_LOG_DIR, UserError, command, write_text
from tools.sweep import format_value, parse_override

DEFAULT_STORAGE = "sqlite:///.optuna/search.db"
REPORTS = Path("reports")
SCHEMAS = {schema.section: schema for schema in [DataParams, ModelParams, Recipe, EvaluateParams, ExportParams, System]}
SEARCHED = ("model", "train", "evaluate")  # what a trial may vary: what it trains and how it is scored
NOT_SEARCHED = {  # keys of those sections a space may not vary, and why
    "model.max_params": "the budget is the search's constraint, not a choice",
    "train.validation_images": "every trial is scored on the same held-out images (set it with -S)",
    "train.nproc": "a search trial trains on one process (the search runs trials side by side instead)",
    "train.nnodes": "a search trial trains on one process (the search runs trials side by side instead)",
}
# metrics/train/metrics.json: the final model's accuracy on the held-out images, with evaluate.tta
OBJECTIVE = ("validation", "acc_with_tta")
WHAT = {"space": "space", "base": "params.yaml or -S settings", "code": "train stage's code"}
MAX_REFUSED_PER_TRIAL = 10  # refusals cost nothing, but a space mostly over budget would propose forever
SCHEMA_ATTEMPTS = 5  # processes that open a new storage together race to create its tables


class Refused(Exception):
    """A proposal refused before training (over budget, or its keys disagree): a failed trial, recorded with
    the reason, that does not count towards the trials asked for."""


class NotRun(Exception):
    """A trial asked for after the study had its N (two workers asked at once), or after the search was
    stopped: failed without running."""


# The space


@dataclass(frozen=True)
class Dimension:
    """One key's range (low..high, on a log scale if asked, in steps if asked) or its choices."""
    key: str
    kind: type = None  # int or float for a range
    low: float = None
    high: float = None
    log: bool = False
    step: float = None
    choices: tuple = None

    def labels(self):
        """Optuna's categorical choices: each value, lists spelt as `-S` spells them (Optuna stores scalars only)."""
        return [format_value(c) if isinstance(c, list) else c for c in self.choices]

    def suggest(self, trial):
        """The trial's value of this key, asked of Optuna."""
        if self.choices is not None:
            return self.value(trial.suggest_categorical(self.key, self.labels()))
        if self.kind is int:
            return trial.suggest_int(self.key, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)

    def value(self, label):
        """A value as Optuna recorded it, back as params.yaml holds it."""
        return self.choices[self.labels().index(label)] if self.choices is not None else label


def key_schema(key, source):
    """The schema of `section.key`, or a one-line error."""
    section, _, name = key.partition(".")
    schema = SCHEMAS.get(section)
    if schema is None or not name:
        raise UserError(f"{source}: {key!r} is not a params.yaml key section.key (sections: {', '.join(SCHEMAS)})")
    if name not in schema.model_fields:
        raise UserError(f"{source}: unknown key {key} (allowed in {section}: {', '.join(schema.model_fields)})")
    return schema


def check_values(base, values, source):
    """Each of `values` ({key: value}) checked on its own by its section's schema, inside `base` (params by
    section): the error names the key, the value and what the key allows."""
    for key, value in values.items():
        schema = key_schema(key, source)
        section, name = key.split(".")
        check_section(schema, {**base[section], name: value}, source, keys=[name])


def dimension(key, spec, base, source):
    """A Dimension from the space file's entry: a list of choices, or {low, high, log?, step?} for a number."""
    schema = key_schema(key, source)
    if key.split(".")[0] not in SEARCHED:
        raise UserError(f"{source}: {key} cannot be searched: only keys of {', '.join(SEARCHED)} (fixed settings "
                        "of other sections go in -S)")
    if key in NOT_SEARCHED:
        raise UserError(f"{source}: {key} cannot be searched: {NOT_SEARCHED[key]}")
    if isinstance(spec, list):
        if not spec:
            raise UserError(f"{source}: {key}: no choices (give a list of at least one value)")
        for choice in spec:
            check_values(base, {key: choice}, source)
        return Dimension(key, choices=tuple(spec))
    kind = schema.model_fields[key.split(".")[1]].annotation
    allowed = {"low", "high", "log", "step"}
    if not isinstance(spec, dict) or not {"low", "high"} <= set(spec) or set(spec) - allowed:
        raise UserError(f"{source}: {key}: expected a list of choices or {{low: L, high: H}} with optional log: "
                        "true and step: S")
    if kind not in (int, float):
        raise UserError(f"{source}: {key} is not a number: give a list of choices")
    low, high, log, step = spec["low"], spec["high"], spec.get("log", False), spec.get("step")
    check_values(base, {key: low}, source)
    check_values(base, {key: high}, source)
    if not low < high:
        raise UserError(f"{source}: {key}: low {low} must be below high {high} (a fixed value goes in -S)")
    if not isinstance(log, bool) or (log and low <= 0):
        raise UserError(f"{source}: {key}: log must be true or false, and a log scale needs low > 0")
    if step is not None and (isinstance(step, bool) or not isinstance(step, kind) or step <= 0 or log):
        raise UserError(f"{source}: {key}: step must be a positive {kind.__name__}, and not with log: true")
    return Dimension(key, kind, low, high, log, step)


@dataclass(frozen=True)
class Space:
    """The search space (its dimensions), the trials to run first, and the file's mapping as read."""
    dimensions: tuple
    first: tuple
    raw: dict

    @property
    def keys(self):
        return [d.key for d in self.dimensions]

    def suggest(self, trial):
        return {d.key: d.suggest(trial) for d in self.dimensions}

    def values(self, optuna_params):
        """A trial's params as Optuna recorded them, back as params.yaml holds them."""
        return {d.key: d.value(optuna_params[d.key]) for d in self.dimensions if d.key in optuna_params}

    def labels(self, values):
        """{key: value} as Optuna records it (enqueue_trial)."""
        return {d.key: (format_value(values[d.key]) if isinstance(values[d.key], list) else values[d.key])
                for d in self.dimensions if d.key in values}


def parse_space(raw, base, source):
    """The Space of a space file's mapping: `space:` {key: choices or range}, and optionally `first:` a list of
    {key: value} trials to run before sampling (e.g. the study's recipe, as a baseline)."""
    if not isinstance(raw, dict) or "space" not in raw or set(raw) - {"space", "first"}:
        raise UserError(f"{source}: expected a mapping with 'space' (key: choices or range) and optionally 'first'")
    if not isinstance(raw["space"], dict) or not raw["space"]:
        raise UserError(f"{source}: 'space' must map at least one params.yaml key to its choices or range")
    dimensions = tuple(dimension(key, spec, base, source) for key, spec in raw["space"].items())
    space = Space(dimensions, (), raw)
    first = raw.get("first") or []
    if not isinstance(first, list) or not all(isinstance(trial, dict) for trial in first):
        raise UserError(f"{source}: 'first' must be a list of {{key: value}} mappings")
    for trial in first:
        for key, value in trial.items():
            if key not in space.keys:
                raise UserError(f"{source}: first: {key} is not a key of the space ({', '.join(space.keys)})")
            d = next(d for d in dimensions if d.key == key)
            inside = value in d.choices if d.choices is not None else (
                isinstance(value, (int, float)) and not isinstance(value, bool) and d.low <= value <= d.high)
            if not inside:
                raise UserError(f"{source}: first: {key} = {value!r} is outside the space's "
                                f"{list(d.choices) if d.choices is not None else [d.low, d.high]}")
    return Space(dimensions, tuple(first), raw)


def settings_of(overrides, base):
    """The -S settings as {key: value}, each checked by its section's schema; base updated with them."""
    settings = {}
    for text in overrides:
        key, value = parse_override(text)
        settings[key] = parse_value(value)
        check_values(base, {key: settings[key]}, "-S")
        section, name = key.split(".")
        base[section] = {**base[section], name: settings[key]}
    return settings


def check_search(base):
    """What every trial needs: images held out to score it on, and one process."""
    recipe = Recipe.model_construct(**base["train"])  # its values as they are: the trials check them whole
    if not recipe.validation_images:
        raise UserError("the search is scored on held-out images and never reads the test set: set "
                        "-S train.validation_images=N (N > 0, e.g. 5000 of CIFAR-10's 50,000)")
    if recipe.world_size > 1:
        raise UserError(f"train.nproc * train.nnodes = {recipe.world_size}: a search trial trains on one process; "
                        "--jobs runs trials side by side instead")


def refusal(base, values):
    """Why a trial's params cannot train (its sections' schemas as a whole, then the budget), or None."""
    params = {section: dict(values_) for section, values_ in base.items()}
    for key, value in values.items():
        section, name = key.split(".")
        params[section][name] = value
    try:
        for section in SEARCHED:
            check_section(SCHEMAS[section], params[section], "trial")
    except UserError as e:
        return str(e).removeprefix("trial: ")
    model = params["model"]
    with torch.device("meta"):  # shapes only: a proposal of 300M parameters is counted without allocating them
        n = count_parameters(ResNet(model["blocks"], model["widths"]))
    if n > model["max_params"]:
        return f"{n:,} parameters, over model.max_params = {model['max_params']:,}"
    return None


# The study


@dataclass
class Search:
    """One worker's search: the study, its space and settings, and what it runs trials with."""
    study: object
    storage: object
    space: Space
    settings: dict
    base: dict  # params.yaml's model, train and evaluate with the settings: what a trial's values go into
    trials: int
    pruner: dict
    report_dir: Path
    jobs: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    errors: list = field(default_factory=list)  # a thread's error stops every thread of this worker
    # the running trials' processes, and whether the search was stopped: the worker forwards its stop to them
    trials_lock: threading.Lock = field(default_factory=threading.Lock)
    running: set = field(default_factory=set)
    stopped_by: str = ""

    @property
    def name(self):
        return self.study.study_name


def redact(url):
    """A storage URL without its password, for messages."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest and ":" in rest.split("@")[0]:
        rest = rest.split("@")[0].split(":")[0] + ":***@" + rest.split("@", 1)[1]
    return scheme + sep + rest


def open_storage(url, heartbeat):
    """Optuna's RDB storage at `url` (SQLite, PostgreSQL, MySQL), with heartbeats every `heartbeat` seconds:
    a trial 3 beats silent is failed, and RetryHeartbeatStaleTrialCallback asks for it again, same params."""
    import optuna

    if url.startswith("sqlite:///"):
        # absolute: the trials run in DVC's copies of the workspace, elsewhere
        path = Path(url.removeprefix("sqlite:///")).absolute()
        path.parent.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{path}"
        engine = {"connect_args": {"timeout": 60}}  # several workers: wait for SQLite's lock rather than fail
    else:
        engine = {"pool_pre_ping": True}
    for attempt in range(SCHEMA_ATTEMPTS):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            try:
                return optuna.storages.RDBStorage(
                    url, engine_kwargs=engine, heartbeat_interval=heartbeat, grace_period=3 * heartbeat,
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback())
            except Exception as e:  # the driver's or SQLAlchemy's: a bad URL, no server, a refused login, or
                # a lost race: processes that open a new storage together (workers, or a worker and a reader) all
                # create its tables; the losers see "already exists" (SQLite, PostgreSQL's DuplicateTable) or a
                # unique violation (PostgreSQL's catalog), and find the tables made when they try again.
                lost_race = isinstance(e, sqlalchemy.exc.IntegrityError) or "already exists" in str(e)
                if not lost_race or attempt == SCHEMA_ATTEMPTS - 1:
                    raise UserError(f"--storage {redact(url)}: cannot open ({type(e).__name__}: "
                                    f"{' '.join(str(e).split())[:300]})")
                time.sleep(0.5 + random.random())


def train_code():
    """A digest of the code a trial trains with: the train stage and every project module it imports."""
    digest = hashlib.sha256()
    for path in code_of("stages/train.py"):
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def identity(space, base):
    """What every trial of a study must share, on every machine: the space, the params it starts from (the
    searched sections and the data's checksum: its path may differ between machines) and the training code."""
    return {"space": space.raw, "base": {**{s: base[s] for s in SEARCHED}, "data.md5": base["data"]["md5"]},
            "code": train_code()}


def check_code(study):
    """Before each trial: the workspace's training code is still the study's (each trial trains a copy of it)."""
    if train_code() != study.user_attrs["code"]:
        raise UserError(f"the train stage's code changed since study '{study.study_name}' began: commit or undo the "
                        "change, or name a new study (--study)")


def open_study(name, storage, space, base, seed):
    """The study `name` in `storage`: created (with what its trials share, and the space's first trials
    queued), or continued where the same space, params and code made it."""
    import optuna

    identity_ = identity(space, base)
    try:
        study = optuna.create_study(study_name=name, storage=storage, direction="maximize")
        for key, value in identity_.items():
            study.set_user_attr(key, value)
        for first in space.first:
            study.enqueue_trial(space.labels(first))
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage)
        for _ in range(50):  # a worker that created it a moment ago may still be writing what made it
            if set(identity_) <= set(study.user_attrs):
                break
            time.sleep(0.1)
        for key, value in identity_.items():
            if study.user_attrs.get(key) != json.loads(json.dumps(value)):
                raise UserError(f"study '{name}' was started with another {WHAT[key]}: rerun it as it was started "
                                f"(same space file, -S settings and params.yaml, same code), or name a new study "
                                f"(--study)")
    # constant_liar: workers running at once avoid each other's pending proposals. The seed moves on with the
    # trials already asked for, so a resumed worker does not propose its first trials again.
    sampler = optuna.samplers.TPESampler(seed=seed + len(study.trials), constant_liar=True)
    return optuna.load_study(study_name=name, storage=storage, sampler=sampler)


def counts(study):
    """{state name: trials}, the refused and not-run apart from the failed."""
    found = {}
    for t in study.get_trials(deepcopy=False):
        found[state(t)] = found.get(state(t), 0) + 1
    return found


def done(found):
    return found.get("complete", 0) + found.get("pruned", 0)


def state(trial):
    """A trial's state, the refused and not-run apart from the failed."""
    attrs = trial.user_attrs
    return "refused" if "refused" in attrs else "not run" if "not_run" in attrs else trial.state.name.lower()


def outcome(trial):
    """What became of a trial, in words."""
    attrs = trial.user_attrs
    if "refused" in attrs:
        return f"refused before training: {attrs['refused']}"
    if "not_run" in attrs:
        return f"not run: {attrs['not_run']}"
    if trial.state.name == "COMPLETE":
        return f"{attrs['experiment']}: validation accuracy {trial.value:.4f} after {attrs['epochs']} epochs"
    if trial.state.name == "FAIL" and "experiment" in attrs:
        return f"{attrs['experiment']}: failed"
    if trial.state.name == "PRUNED":
        return f"{attrs['experiment']}: pruned after epoch {attrs.get(PRUNED_ATTR, '?')}"
    return trial.state.name.lower()


def progress(search, started):
    """The optimize callback that prints one line per trial once Optuna has recorded it."""
    def report(study, trial):
        found = counts(study)
        best = ""
        if found.get("complete"):
            best = f"; best {study.best_trial.value:.4f} (trial {study.best_trial.number})"
        extra = "".join(f", {found[k]} {k}" for k in ["refused", "fail", "not run"] if found.get(k))
        print(f"trial {trial.number} {outcome(trial)} | {done(found)}/{search.trials} done "
              f"({found.get('complete', 0)} finished, {found.get('pruned', 0)} pruned{extra}){best} | "
              f"{time.monotonic() - started:.0f} s", flush=True)
    return report


def trial_command(search, name, values):
    """`dvc exp run --temp` of the train stage alone (the search never reads the test set, which evaluate
    scores), with the study's settings and the trial's values."""
    params = {**{k: format_value(v) for k, v in search.settings.items()},
              **{k: format_value(v) for k, v in values.items()}}
    settings = [arg for key, value in params.items() for arg in ("-S", f"{key}={value}")]
    return [sys.executable, "-m", "dvc", "exp", "run", "--temp", "-n", name, *settings, "train"]


def trial_environment(search, number):
    """The trial's environment: which trial it is (cifar.trial), and on a CPU its share of the cores."""
    env = {**os.environ, TRIAL_ENV: json.dumps({
        "storage": search.storage.url, "study": search.name, "number": number, "pruner": search.pruner,
        "worker_pid": os.getpid()})}
    if search.jobs > 1 and "OMP_NUM_THREADS" not in os.environ:  # trials side by side on a CPU share its cores
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // search.jobs))
    return env


def read_result(search, name):
    """The finished experiment's final metrics (metrics/train/metrics.json), read from DVC's cache."""
    import dvc.api
    from dvc.exceptions import DvcException

    path = (TRAIN_LOG_DIR / "metrics.json").as_posix()
    with search.lock:  # one DVC API call at a time in this process
        try:
            return json.loads(dvc.api.read(path, rev=name))
        except (DvcException, FileNotFoundError, ValueError) as e:
            raise UserError(f"experiment {name}: {path} not readable ({type(e).__name__}: {e})".splitlines()[0])


def last_error(log):
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.startswith(("error:", "ERROR"))]
    return lines[0] if lines else "no error line"


def counted(trial):
    """Whether a trial counts towards the N asked for: finished, pruned, or running (it may yet finish)."""
    return trial.state.name in ("COMPLETE", "PRUNED", "RUNNING") and not {"refused", "not_run"} & set(trial.user_attrs)


def objective(search):
    """One trial: its values, refused or run as a DVC experiment; the final validation accuracy with TTA."""
    import optuna

    def run_trial(trial):
        # two workers that asked at once may both have taken the N-th trial: the later one stands down
        if sum(counted(t) for t in search.study.get_trials(deepcopy=False) if t.number < trial.number) >= search.trials:
            trial.set_user_attr("not_run", f"the study had its {search.trials} trials")
            raise NotRun()
        check_code(search.study)
        values = search.space.suggest(trial)
        reason = refusal(search.base, values)
        if reason:
            trial.set_user_attr("refused", reason)
            raise Refused(reason)
        name = f"{search.name}-t{trial.number}"
        trial.set_user_attr("experiment", name)
        log = search.report_dir / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        print(f"trial {trial.number} {name} started: {' '.join(f'{k}={format_value(v)}' for k, v in values.items())}"
              f" (log: {log})", flush=True)
        with open(log, "w") as out:
            code = run_process(search, trial, trial_command(search, name, values),
                               env=trial_environment(search, trial.number), stdout=out, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL)
        if code:
            attrs = search.storage.get_trial_user_attrs(trial_id(search.storage, search.name, trial.number))
            if PRUNED_ATTR in attrs:
                trial.set_user_attr(PRUNED_ATTR, attrs[PRUNED_ATTR])
                raise optuna.TrialPruned()
            raise UserError(f"trial {trial.number} ({name}) failed: {last_error(log)} (its log: {log})")
        metrics = read_result(search, name)
        trial.set_user_attr("epochs", metrics["step"])
        return metrics[OBJECTIVE[0]][OBJECTIVE[1]]
    return run_trial


def run_process(search, trial, args, **kwargs):
    """Run a trial's command in its own process group, which stop() signals: a signal to the worker alone
    (kill PID, a scheduler's SIGTERM) stops its trials as surely as a terminal's Ctrl-C does."""
    with search.trials_lock:  # a stop either comes before this trial starts, or finds its process
        if search.stopped_by:
            trial.set_user_attr("not_run", f"the search was stopped by {search.stopped_by}")
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
    stage's clean stop (they fail, and are not counted)."""
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


def work(search, started, poll_s=2.0):
    """One worker's loop: trials until the study has N finished or pruned ones. The last ones may be running
    in other workers (or in one that died, whose trials fail once their heartbeat is stale and are asked for
    again): then it waits for them."""
    import optuna

    run_trial, report = objective(search), progress(search, started)
    while not search.errors:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(search.study)
        trials = search.study.get_trials(deepcopy=False)
        finished = sum(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
        if finished >= search.trials:
            return
        refused = sum("refused" in t.user_attrs for t in trials)
        if refused > MAX_REFUSED_PER_TRIAL * search.trials:
            raise UserError(f"{refused} proposals refused before training (over model.max_params, or keys that "
                            "disagree): narrow the space")
        waiting = any(t.state.name == "WAITING" for t in trials)
        if not waiting and sum(counted(t) for t in trials) >= search.trials:
            time.sleep(poll_s)
            continue
        search.study.optimize(run_trial, n_trials=1, catch=(Refused, NotRun), callbacks=[report])


# The report


def trials_table(search):
    """trials.md: every trial's state, params, validation accuracy and epochs reached, and what became of it."""
    keys = search.space.keys
    header = ["trial", "state", *keys, "validation accuracy", "epochs", "note"]
    rows = []
    retried = {t.system_attrs.get("failed_trial"): t.number for t in search.study.get_trials(deepcopy=False)
               if "failed_trial" in t.system_attrs}
    for t in search.study.get_trials(deepcopy=False):
        values = search.space.values(t.params)
        epochs = t.user_attrs.get("epochs", max(t.intermediate_values, default=None))
        note = outcome(t)
        if t.number in retried:
            note = f"its worker stopped; run again as trial {retried[t.number]}"
        elif "failed_trial" in t.system_attrs:
            note += f" (trial {t.system_attrs['failed_trial']} run again)"
        rows.append([str(t.number), state(t), *(format_value(values[k]) if k in values else "–"
                                                          for k in keys),
                     "–" if t.value is None else f"{t.value:.4f}", "–" if epochs is None else str(epochs), note])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in rows]) + "\n"


def effort(search):
    """The epochs the finished and pruned trials trained, against all of them running to the end, and the time
    the trials took."""
    trials = search.study.get_trials(deepcopy=False)
    epochs = search.base["train"]["epochs"]
    counted_trials = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    trained = sum(t.user_attrs.get("epochs", t.user_attrs.get(PRUNED_ATTR, epochs)) for t in counted_trials)
    seconds = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in trials
                  if t.datetime_complete and t.datetime_start)
    return (f"Epochs trained by them: {trained} of {len(counted_trials) * epochs} had each run its {epochs} "
            f"(pruning saved {len(counted_trials) * epochs - trained}). Trials' time, all added up: "
            f"{seconds / 60:.1f} min.")


def write_report(search):
    """reports/STUDY/: trials.md and Optuna's figures (those it can draw from the trials so far)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as figures

    out = search.report_dir
    notes = []
    for name, draw in [("history", figures.plot_optimization_history), ("importances", figures.plot_param_importances),
                       ("parallel_coordinate", figures.plot_parallel_coordinate)]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                axes = draw(search.study)
            except (ValueError, RuntimeError) as e:  # e.g. importances need 2 finished trials that differ
                notes.append(f"- {name}.png: not drawn ({' '.join(str(e).split())})")
                continue
        figure = axes.flat[0].figure if hasattr(axes, "flat") else axes.figure
        if name == "history":
            axes.set_ylabel("final validation accuracy")
        figure.set_size_inches(10, 6)
        figure.tight_layout()
        figure.savefig(out / f"{name}.png", dpi=100)
        plt.close(figure)
    found = counts(search.study)
    summary = (f"# Search '{search.name}'\n\n{done(found)} of {search.trials} trials done: "
               f"{found.get('complete', 0)} finished, {found.get('pruned', 0)} pruned; besides them "
               f"{found.get('refused', 0)} refused before training, {found.get('fail', 0)} failed or stopped. "
               f"Objective: the final validation accuracy, with evaluate.tta. {effort(search)}\n\n")
    if found.get("complete"):
        best = search.study.best_trial
        summary += (f"Best: trial {best.number} ({best.user_attrs['experiment']}), {best.value:.4f}: "
                    f"{' '.join(f'{k}={format_value(v)}' for k, v in search.space.values(best.params).items())}. "
                    f"Confirm it over seeds: `python -m tools.sweep --best-of {search.name} --seeds 0 1 2`.\n\n")
    write_text(out / "trials.md", summary + trials_table(search) + ("\n" + "\n".join(notes) + "\n" if notes else ""))


# The command


def best_values(name, url=DEFAULT_STORAGE):
    """{key: value} of the best finished trial of study `name`: tools.sweep's --best-of preset."""
    import optuna

    storage = open_storage(url, heartbeat=60)
    try:
        study = optuna.load_study(study_name=name, storage=storage)
        best = study.best_trial
    except KeyError:
        raise UserError(f"no study '{name}' in {redact(url)}")
    except ValueError:
        raise UserError(f"study '{name}' has no finished trial yet")
    space = parse_space(study.user_attrs["space"], base_params(), f"study '{name}'")
    return space.values(best.params)


def base_params():
    """params.yaml's sections, each checked as its stage checks it."""
    params = read_params()
    return {section: check_section(schema, params.get(section)) for section, schema in SCHEMAS.items()}


def default_jobs():
    """One trial per visible GPU, or one on a CPU (trials side by side would only share its cores)."""
    import torch

    return max(1, torch.cuda.device_count())


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tools.search", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("space", help="the space file (YAML): `space:` params.yaml keys of model, train and evaluate, "
                        "each a list of choices or {low, high, log?, step?}; optionally `first:` trials to run first")
    parser.add_argument("--trials", type=int, default=24, help="finished or pruned trials the study needs (default 24)")
    parser.add_argument("--study", help="the study's name and its experiments' prefix (default: the space file's name)")
    parser.add_argument("--storage", default=DEFAULT_STORAGE,
                        help=f"Optuna's storage URL, shared by every worker (default {DEFAULT_STORAGE}; several "
                        "machines: postgresql://USER:PASSWORD@HOST/DB)")
    parser.add_argument("-S", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a params.yaml key set in every trial (repeatable), e.g. -S train.epochs=10")
    parser.add_argument("--jobs", type=int, help="trials at once in this worker (default: one per visible GPU, "
                        "or 1 on a CPU); each trial claims a free GPU")
    parser.add_argument("--seed", type=int, default=0, help="the TPE sampler's seed (default 0)")
    parser.add_argument("--pruner", choices=["median", "none"], default="median",
                        help="median (default): stop a trial below the finished trials' median at the same epoch")
    parser.add_argument("--startup-trials", type=int, default=5,
                        help="finished trials before the pruner stops any (default 5)")
    parser.add_argument("--warmup-epochs", type=int, default=2,
                        help="the first epoch at which a trial may be pruned (default 2)")
    parser.add_argument("--heartbeat", type=int, default=30,
                        help="seconds between a running trial's heartbeats; 3 missed: its worker is taken for dead "
                        "and the trial is run again (default 30)")
    parser.add_argument("--report-only", action="store_true", help="write the report of the trials so far, run none")
    args = parser.parse_args(argv)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # the search prints its own line per trial

    for flag, value, least in [("--trials", args.trials, 1), ("--jobs", args.jobs, 1),
                               ("--heartbeat", args.heartbeat, 1), ("--startup-trials", args.startup_trials, 0),
                               ("--warmup-epochs", args.warmup_epochs, 0)]:
        if value is not None and value < least:
            raise UserError(f"{flag} {value}: must be an integer >= {least}")
    source = Path(args.space)
    name = args.study or source.stem
    if not name.replace("-", "").replace("_", "").isalnum():
        raise UserError(f"study name {name!r}: letters, digits, - and _ only (it names the DVC experiments)")
    base = base_params()
    settings = settings_of(args.overrides, base)
    space = parse_space(load_yaml(source), base, source)
    check_search(base)
    storage = open_storage(args.storage, args.heartbeat)
    study = open_study(name, storage, space, base, args.seed)
    jobs = args.jobs or default_jobs()
    pruner = {"name": args.pruner, "startup_trials": args.startup_trials, "warmup_epochs": args.warmup_epochs}
    search = Search(study, storage, space, settings, base, args.trials, pruner, REPORTS / name, jobs)
    search.report_dir.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        found = counts(study)
        continuing = " (continuing)" if set(found) - {"waiting"} else ""
        print(f"search '{name}' in {redact(args.storage)}: {done(found)}/{args.trials} trials done{continuing}; "
              f"{jobs} at a time; objective: final validation accuracy; pruner: {args.pruner}", flush=True)
        started = time.monotonic()
        threads = [threading.Thread(target=work_thread, args=(search, started)) for _ in range(jobs)]
        for signum in (signal.SIGINT, signal.SIGTERM):  # to the worker alone or with its group, as Ctrl-C does
            signal.signal(signum, lambda signum, frame: stop(search, signal.Signals(signum)))
        # no KeyboardInterrupt: a join it interrupts leaves the thread looking ended (Python 3.11), and the
        # process would exit with its trial running and the trial's state never written
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    write_report(search)  # the trials so far, however the search ended
    if search.errors:
        raise search.errors[0]
    print(f"wrote {search.report_dir}/trials.md and its figures")


def work_thread(search, started):
    try:
        work(search, started)
    except Exception as e:  # main() reports it once the other threads' trials have ended; they start no more
        search.errors.append(e)


if __name__ == "__main__":
    command(main)
