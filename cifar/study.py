"""A search's Optuna study (tools.search, docs/experiments.md): its storage, what every trial of it must share
(the space, the params and the training code), its sampler, and its trials' states and outcomes in words."""
import hashlib
import json
import random
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import sqlalchemy

from .augment import TTA_MODES
from .imports import ROOT, code_of
from .params import check_section, read_params
from .resume import file_digests
from .space import SCHEMAS, SEARCHED, parse_space
from .trial import PRUNED_ATTR
from .workspace import UserError

DEFAULT_STORAGE = "sqlite:///.optuna/search.db"
PRUNE_RECORDED = "pruned_trial"  # system attribute: the failed trial whose prune this trial records
WHAT = {"space": "space", "base": "params.yaml or -S settings", "code": "train stage's code"}
SCHEMA_ATTEMPTS = 5  # processes that open a new storage together race to create its tables
STOPPED, NOT_RUN, REFUSED, FAILED = "stopped", "not_run", "refused", "failed"  # user attributes: why not finished


def redact(url):
    """A storage URL without its password, for messages."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest and ":" in rest.split("@")[0]:
        rest = rest.split("@")[0].split(":")[0] + ":***@" + rest.split("@", 1)[1]
    return scheme + sep + rest


def retry_callback():
    """What becomes of a trial whose worker died (its heartbeat stale) or that a stop ended: Optuna's retry, a new
    trial with the same params and the failed one's per-epoch values (a retried trial resumes from its
    checkpoint, and its values before that must still reach the pruner). A trial the pruner had already stopped
    (its train stage said so before the worker could record it) is recorded as pruned instead: its checkpoint is
    gone, and a retry would train it again from scratch only to be pruned where it was."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(inherit_intermediate_values=True)

    def retry_unless_pruned(study, trial):
        if PRUNED_ATTR not in trial.user_attrs:
            return retry(study, trial)
        study.add_trial(optuna.trial.create_trial(
            state=optuna.trial.TrialState.PRUNED, params=trial.params, distributions=trial.distributions,
            user_attrs=trial.user_attrs, intermediate_values=trial.intermediate_values,
            system_attrs={PRUNE_RECORDED: trial.number}))
    return retry_unless_pruned


def open_storage(url, heartbeat):
    """Optuna's RDB storage at `url` (SQLite, PostgreSQL, MySQL), with heartbeats every `heartbeat` seconds:
    a trial 3 beats silent is failed and run again, same params (retry_callback)."""
    import optuna

    if url.startswith("sqlite:///"):
        # absolute: the trials run in DVC's copies of the workspace, elsewhere
        path = Path(url.removeprefix("sqlite:///")).absolute()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"--storage {url}: cannot make its folder {path.parent} ({e.strerror or e})")
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
                    heartbeat_stale_trial_callback=retry_callback())
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
    """A digest of the code a trial trains with: the train stage and every project module it imports, each file
    by content, as the checkpoint's fingerprint reads them (resume.file_digests)."""
    digests = file_digests(code_of("stages/train.py"), ROOT)
    return hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()


def base_params():
    """params.yaml's sections, each checked as its stage checks it."""
    params = read_params()
    return {section: check_section(schema, params.get(section)) for section, schema in SCHEMAS.items()}


def with_settings(base, settings):
    """`base` (params by section) with the -S settings ({section.key: value}) in it."""
    params = {section: dict(values) for section, values in base.items()}
    for key, value in settings.items():
        section, name = key.split(".")
        params[section][name] = value
    return params


def identity(space, base):
    """What every trial of a study must share, on every machine: the space, the params it starts from (the
    searched sections and the data's checksum: its path may differ between machines) and the training code."""
    return {"space": space.raw, "base": identity_params(base), "code": train_code()}


def check_code(study):
    """Before each trial: the workspace's training code is still the study's (each trial trains a copy of it)."""
    if train_code() != study.user_attrs["code"]:
        raise UserError(f"the train stage's code changed since study '{study.study_name}' began: commit or undo the "
                        "change, or name a new study (--study)")


def check_params(study, params, ignore=(), source="params.yaml"):
    """`params` (by section: the workspace's params.yaml with the -S settings, or what a trial trained) are
    still those the study began with, but for the keys `ignore` (the space's: each trial sets its own); else
    one line naming the keys that changed. An edit in the middle of a search would change what the rest of its
    trials train."""
    new, old = identity_params(params), study.user_attrs["base"]
    changed = [f"{s}.{k}" for s in SEARCHED for k in new[s] if new[s][k] != old[s].get(k) and f"{s}.{k}" not in ignore]
    changed += ["data.md5"] * (new["data.md5"] != old["data.md5"])
    if changed:
        raise UserError(f"{source} changed since study '{study.study_name}' began ({', '.join(changed)}): undo "
                        "the change to continue it, or name a new study (--study)")


def identity_params(params):
    """What of the params a study's trials share: the searched sections and the data's checksum, as stored."""
    return json.loads(json.dumps({**{s: params[s] for s in SEARCHED}, "data.md5": params["data"]["md5"]}))


def without_keys(params, keys):
    """identity_params' `params` without the `keys` (section.name)."""
    return {section: ({k: v for k, v in values.items() if f"{section}.{k}" not in keys} if isinstance(values, dict)
                      else values) for section, values in params.items()}


def old_experiments(name):
    """The DVC experiments named as trials of study `name` are (NAME-tK), in this repository, or none outside
    one: what a study created again under an old name would collide with."""
    listed = subprocess.run([sys.executable, "-m", "dvc", "exp", "list", "--all-commits", "--name-only"],
                            capture_output=True, text=True)
    pattern = re.compile(rf"{re.escape(name)}-t\d+")
    return sorted({line.strip() for line in listed.stdout.splitlines() if pattern.fullmatch(line.strip())},
                  key=lambda n: int(n.rsplit("-t", 1)[1])) if listed.returncode == 0 else []


def open_study(name, storage, space, base, seed):
    """The study `name` in `storage`: created (with what its trials share, and the space's first trials
    queued), or continued where the same space, params and code made it; trials a stop interrupted are queued
    again (retry_stopped)."""
    import optuna

    identity_ = identity(space, base)
    if name not in [s.study_name for s in optuna.get_all_study_summaries(storage)]:
        old = old_experiments(name)
        if old:
            raise UserError(f"study '{name}' is new, but experiments of an earlier study of that name remain "
                            f"({', '.join(old[:3])}{'...' if len(old) > 3 else ''}): remove them "
                            f"(dvc exp remove {' '.join(old)}) or name a new study (--study)")
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
            stored, found = study.user_attrs.get(key), json.loads(json.dumps(value))
            if key == "base" and stored is not None:  # the space's keys aside, as check_params (runner) does
                stored, found = (without_keys(params, space.keys) for params in (stored, found))
            if stored != found:
                raise UserError(f"study '{name}' was started with another {WHAT[key]}: rerun it as it was started "
                                f"(same space file, -S settings and params.yaml, same code), or name a new study "
                                f"(--study)")
        retry_stopped(study)
    # constant_liar: workers running at once avoid each other's pending proposals. No seed (the default): each
    # worker draws its own proposals from the OS's entropy, so two workers never draw the same start-up trials
    # (with one seed they would: optuna#3790). A fixed seed reproduces a search run by one worker; it moves on
    # with the trials already asked for, so a resumed worker does not propose its first trials again.
    sampler = optuna.samplers.TPESampler(seed=None if seed is None else seed + len(study.trials), constant_liar=True)
    return optuna.load_study(study_name=name, storage=storage, sampler=sampler)


def retry_stopped(study):
    """Queue again, with the same params, each trial a stop (Ctrl-C, SIGTERM) ended or kept from starting and
    not yet queued again: a stop never loses a trial, the `first` ones included."""
    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    for t in trials:
        if t.state.name == "FAIL" and t.user_attrs.get(STOPPED) and t.number not in retried:
            retry_callback()(study, t)


def counts(study):
    """{state name: trials}, the refused and not-run apart from the failed."""
    found = {}
    for t in study.get_trials(deepcopy=False):
        found[state(t)] = found.get(state(t), 0) + 1
    return found


def done(found):
    return found.get("complete", 0) + found.get("pruned", 0)


def state(trial):
    """A trial's state in words: the refused (pruned, to teach TPE: runner) and the not run apart."""
    attrs, name = trial.user_attrs, trial.state.name
    if name == "PRUNED" and attrs.get(REFUSED):
        return "refused"
    if name == "FAIL" and attrs.get(NOT_RUN):
        return "not run"
    return name.lower()


def tta_choice(trial):
    """(mode, accuracy) of the trial's best TTA on validation, the cheapest of equals, or None."""
    scores = trial.user_attrs.get("tta")
    if not scores:
        return None
    mode = max(TTA_MODES, key=lambda m: (scores[m], -TTA_MODES.index(m)))
    return mode, scores[mode]


def outcome(trial):
    """What became of a trial, in words."""
    attrs, kind = trial.user_attrs, state(trial)
    if kind == "refused":
        return f"refused before training: {attrs[REFUSED]}"
    if kind == "not run":
        return f"not run: {attrs[NOT_RUN]}"
    if kind == "complete":
        mode, accuracy = tta_choice(trial)
        return (f"{attrs['experiment']}: validation accuracy {trial.value:.4f} after {attrs['epochs']} epochs "
                f"(best TTA: {mode}, {accuracy:.4f})")
    if kind == "fail" and attrs.get(STOPPED):
        return f"{attrs.get('experiment', 'not started')}: stopped by {attrs[STOPPED]}"
    if kind == "fail" and attrs.get(FAILED):
        return f"{attrs['experiment']}: failed: {attrs[FAILED]}"
    if kind == "pruned":
        return f"{attrs.get('experiment', 'not started')}: pruned after epoch {attrs.get(PRUNED_ATTR, '?')}"
    return kind


def best_values(name, url=DEFAULT_STORAGE):
    """{key: value} of the best finished trial of study `name`, with evaluate.tta its best TTA on validation:
    tools.sweep's --best-of preset."""
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
    return {**space.values(best.params), "evaluate.tta": tta_choice(best)[0]}
