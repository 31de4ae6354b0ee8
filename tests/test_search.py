"""tools.search: an Optuna study whose every trial is a DVC experiment (docs/experiments.md). Bad input is one
line before any trial; a tiny search on the synthetic set finishes one trial, prunes a hopeless one, refuses one
over budget, restores one from DVC's run cache, and is resumed after its worker is killed in the middle of a
trial, running exactly the trials asked for; four trials at a time all finish; two workers never propose the
same trial; a trial that fails on its own is recorded and the search goes on. tests/test_search_machines.py runs
two workers on a real PostgreSQL.

Every test that starts or waits on processes has its own deadline (deadlines.finish, wait_until), and fails
saying what it waited for: a search that never ends fails in minutes, not at CI's outer limit."""
import json
import multiprocessing
import os
import re
import signal
import time

import optuna
import psutil
import pytest
import sqlalchemy
import yaml
from deadlines import finish, wait_until
from dvc.api import DVCFileSystem
from dvcrepo import copy_repo, dvc, experiment_refs, read_json, run, set_params, start

from cifar.augment import TTA_MODES
from cifar.params import format_value, parse_value
from cifar.space import NOT_SEARCHED, TRAINABLE_DRAWS
from cifar.study import counts, done, open_storage, state

SPLIT = "train.validation_images=100"  # of the synthetic set's 600 training images
HOPELESS_LR = 1e-7
SPACE = {"space": {"train.max_lr": {"low": HOPELESS_LR, "high": 0.05, "log": True},
                   "model.widths": [[8, 16, 32, 64], [512, 1024, 2048, 4096]]},  # the second: 318M parameters
         "first": [{"train.max_lr": 0.02, "model.widths": [8, 16, 32, 64]},
                   {"train.max_lr": HOPELESS_LR, "model.widths": [8, 16, 32, 64]},
                   {"model.widths": [512, 1024, 2048, 4096]},
                   {"train.max_lr": 0.02, "model.widths": [8, 16, 32, 64]}]}  # the first again: DVC's run cache
LOCK_ERROR = "Unable to acquire lock"


def write_space(path, space):
    path.write_text(yaml.safe_dump(space, sort_keys=False) if isinstance(space, dict) else space)
    return path


@pytest.fixture
def folder(data_repo, tmp_path):
    """A folder with the test repository's params.yaml: what the checks before any trial read."""
    target = tmp_path / "repo"
    target.mkdir()
    (target / "params.yaml").write_text((data_repo.repo / "params.yaml").read_text())
    return target


BAD_SPACES = [
    ("missing", None, [SPLIT], "missing.yaml: not found"),
    ("broken YAML", "space: {train.max_lr: [0.1,\n", [SPLIT], "not valid YAML"),
    ("not a mapping", "- 1\n", [SPLIT], "expected a mapping with 'space'"),
    ("unknown key", {"space": {"train.max_lrr": [0.1]}}, [SPLIT], "unknown key train.max_lrr (allowed in train:"),
    ("unknown section", {"space": {"trian.max_lr": [0.1]}}, [SPLIT], "'trian.max_lr' is not a params.yaml key"),
    ("outside model, train", {"space": {"system.device": ["cpu"]}}, [SPLIT],
     "system.device cannot be searched: only keys of model, train"),
    ("the budget", {"space": {"model.max_params": [10]}}, [SPLIT], NOT_SEARCHED["model.max_params"]),
    ("the TTA", {"space": {"evaluate.tta": ["none", "flip"]}}, [SPLIT], "evaluate.tta cannot be searched: every "
     "trial's final model is scored with each TTA mode"),
    ("every choice over budget", {"space": {"model.widths": [[512, 1024, 2048, 4096]], "train.max_lr": [0.1]}},
     [SPLIT], f"none of {TRAINABLE_DRAWS} random proposals can train (e.g. 317,821,450 parameters, over "
     "model.max_params"),
    ("widths that never match blocks", {"space": {"model.widths": [[8, 16], [8, 16, 32]]}}, [SPLIT],
     f"none of {TRAINABLE_DRAWS} random proposals can train (e.g. model.blocks [2, 1, 1, 1] and model.widths"),
    ("empty choices", {"space": {"train.optimizer": []}}, [SPLIT], "train.optimizer: no choices"),
    ("inverted range", {"space": {"train.max_lr": {"low": 0.1, "high": 0.01}}}, [SPLIT],
     "train.max_lr: low 0.1 must be below high 0.01"),
    ("empty range", {"space": {"train.epochs": {"low": 3, "high": 3}}}, [SPLIT], "low 3 must be below high 3"),
    ("a choice the schema refuses", {"space": {"train.optimizer": ["adam", "rmsprop"]}}, [SPLIT],
     "train.optimizer = 'rmsprop' must be one of adam, sgd"),
    ("an end the schema refuses", {"space": {"train.warmup_fraction": {"low": 0.1, "high": 1.5}}}, [SPLIT],
     "train.warmup_fraction = 1.5 must be a number > 0 and < 1"),
    ("an integer key's float range", {"space": {"train.batch_size": {"low": 10.5, "high": 50}}}, [SPLIT],
     "train.batch_size = 10.5 must be an integer >= 1"),
    ("a range of choices-only key", {"space": {"train.flip": {"low": 0, "high": 1}}}, [SPLIT],
     "train.flip is not a number: give a list of choices"),
    ("a first trial outside the space", {"space": {"train.max_lr": [0.1]}, "first": [{"train.max_lr": 0.2}]},
     [SPLIT], "first: train.max_lr = 0.2 is outside the space's [0.1]"),
    ("no validation split", {"space": {"train.max_lr": [0.1]}}, [], "set -S train.validation_images=N"),
    ("a setting the schema refuses", {"space": {"train.max_lr": [0.1]}}, [SPLIT, "train.epochs=0"],
     "-S: train.epochs = 0 must be an integer >= 1"),
    ("several processes", {"space": {"train.max_lr": [0.1]}}, [SPLIT, "train.nproc=2"],
     "a search trial trains on one process"),
]


@pytest.mark.parametrize("space, settings, expected", [case[1:] for case in BAD_SPACES],
                         ids=[case[0] for case in BAD_SPACES])
def test_a_bad_space_or_setting_is_one_line_before_any_trial(folder, stage, space, settings, expected):
    path = folder / "missing.yaml" if space is None else write_space(folder / "space.yaml", space)
    ran = stage(folder, "tools.search", str(path), *[arg for s in settings for arg in ("-S", s)])
    assert ran.code == 1 and ran.out == "" and ran.err.count("\n") == 1, ran.output
    assert ran.err.startswith("error: ") and expected in ran.err, ran.err
    assert sorted(p.name for p in folder.iterdir()) == sorted(["params.yaml", *(["space.yaml"] if space else [])])


def test_an_unreachable_storage_is_one_line_without_its_password(folder, stage):
    path = write_space(folder / "space.yaml", {"space": {"train.max_lr": [0.1]}})
    ran = stage(folder, "tools.search", str(path), "-S", SPLIT, "--storage",
                "postgresql://searcher:secret@127.0.0.1:1/studies")
    assert ran.code == 1 and ran.err.count("\n") == 1, ran.output
    assert ran.err.startswith("error: --storage postgresql://searcher:***@127.0.0.1:1/studies: cannot open ("), ran.err
    assert "secret" not in ran.output


def test_a_storage_path_that_cannot_be_made_is_one_line(folder, stage):
    path = write_space(folder / "space.yaml", {"space": {"train.max_lr": [0.1]}})
    ran = stage(folder, "tools.search", str(path), "-S", SPLIT, "--storage", "sqlite:////proc/x/y.db")
    assert ran.code == 1 and ran.err.count("\n") == 1 and "Traceback" not in ran.err, ran.output
    assert ran.err.startswith("error: --storage sqlite:////proc/x/y.db: cannot make its folder /proc/x ("), ran.err


@pytest.mark.parametrize("value", [0.9999996, 1e-5, 5e-4, 0.1, 0.30000000000000004, 1 / 3, 1.0, 0.0, 3e20, 2.5e-9])
def test_a_value_reaches_params_yaml_exactly(value):
    """What a trial's -S says is the float Optuna proposed: 6 significant digits made 0.9999996 a 1."""
    text = format_value(value)
    assert parse_value(text) == value and yaml.safe_load(f"x: {text}")["x"] in (value, text), text


def test_a_trial_s_checkpoint_is_its_own_and_its_retries(tmp_path, monkeypatch):
    """Two trials of one fingerprint at once (the same params) never share a checkpoint file; a retried trial,
    named by the trial it retries, finds its own."""
    from cifar.resume import checkpoint_path

    workspace, copy = tmp_path / "repo", tmp_path / "repo/.dvc/tmp/exps/tmp1234"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    monkeypatch.setenv("DVC_ROOT", str(workspace))
    run_ = {"params": "a", "code": {"x.py": "1"}}
    assert checkpoint_path(run_, "s-t1") != checkpoint_path(run_, "s-t2") != checkpoint_path(run_)
    assert checkpoint_path(run_, "s-t1") == checkpoint_path(dict(reversed(list(run_.items()))), "s-t1")
    assert checkpoint_path(run_, "s-t1").parent == workspace / ".dvc/tmp/checkpoints"


def test_a_trial_whose_worker_died_is_run_again_unless_it_was_already_pruned(tmp_path):
    """Once its heartbeat is stale, a dead worker's trial is asked for again with the same params and its
    epochs' values (it resumes from its checkpoint); one whose train stage was pruned before the worker could
    record it is recorded as pruned (its checkpoint deleted: a retry would train from scratch to be pruned)."""
    from cifar.trial import PRUNED_ATTR, trial_id

    storage = open_storage(f"sqlite:///{tmp_path / 'studies.db'}", heartbeat=1)
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    distribution = optuna.distributions.FloatDistribution(1e-4, 1.0, log=True)
    for pruned in [False, True]:  # two trials running, reported 2 epochs, and their worker gone
        trial = study.ask({"train.max_lr": distribution})
        for epoch, value in [(1, 0.3), (2, 0.4)]:
            trial.report(value, epoch)
        if pruned:  # what cifar.trial does before its train stage stops
            trial.set_user_attr(PRUNED_ATTR, 2)
        storage.record_heartbeat(trial_id(storage, "s", trial.number))

    def stale_ones_failed():  # once 3 beats are missed (the storage's grace period)
        optuna.storages.fail_stale_trials(study)
        return all(t.state.name == "FAIL" for t in study.get_trials()[:2])
    wait_until(stale_ones_failed, 30, "the silent trials to be failed", interval=0.5)

    died_running, died_pruned, retry, record = study.get_trials()
    assert died_running.state.name == died_pruned.state.name == "FAIL"
    assert retry.state.name == "WAITING" and retry.params == died_running.params
    assert retry.system_attrs["failed_trial"] == died_running.number and retry.intermediate_values == {1: 0.3, 2: 0.4}
    assert record.state.name == "PRUNED" and record.params == died_pruned.params, record
    assert record.intermediate_values == {1: 0.3, 2: 0.4} and record.user_attrs[PRUNED_ATTR] == 2
    assert "failed_trial" not in record.system_attrs  # so the worker never runs it again
    assert done(counts(study)) == 1


def open_new_storage(path, barrier):
    barrier.wait()
    open_storage(f"sqlite:///{path}", heartbeat=60)


def test_processes_that_open_a_new_storage_together_all_open_it(tmp_path):
    """Workers (or a worker and a reader) that open a new storage at once all create its tables: the losers of
    that race try again rather than fail with "table ... already exists"."""
    fork = multiprocessing.get_context("fork")  # tools.search already imported: the processes start at once
    for attempt in range(8):
        barrier = fork.Barrier(4)
        processes = [fork.Process(target=open_new_storage, args=(tmp_path / f"{attempt}.db", barrier))
                     for _ in range(4)]
        for p in processes:
            p.start()
        for p in processes:
            p.join(120)
        assert [p.exitcode for p in processes] == [0] * 4, f"attempt {attempt}"


def storage_url(repo):
    return f"sqlite:///{repo / '.optuna/search.db'}"


def load(repo, name):
    return optuna.load_study(study_name=name, storage=storage_url(repo))


def trials_so_far(repo, name):
    """The study's trials, or none while the worker has yet to create it."""
    if not (repo / ".optuna/search.db").is_file():
        return []
    try:
        return load(repo, name).trials
    except (KeyError, sqlalchemy.exc.SQLAlchemyError):  # not made yet, or its tables being made now
        return []


def trial_processes(repo):
    """The processes of a trial still running in `repo`'s experiment copies: its dvc exp run and train stage."""
    found = []
    for p in psutil.process_iter(["cmdline", "cwd"]):
        try:
            if str(repo) in (p.info["cwd"] or "") and {"stages.train", "exp"} & set(p.info["cmdline"] or []):
                found.append(p)
        except psutil.Error:
            continue
    return found


def sampled_trainer(repo, worker):
    """(number, train stage process) of the first sampled trial of study 'tiny' once it trains, else None."""
    running = [t.number for t in trials_so_far(repo, "tiny")[4:] if t.state.name == "RUNNING"]
    if not running:
        return None
    try:
        trainers = [p for p in psutil.Process(worker.pid).children(recursive=True) if "stages.train" in p.cmdline()]
    except psutil.Error:  # a process of it ended while it was read
        return None
    return (running[0], trainers[0]) if trainers else None


def signal_all(processes, action):
    """psutil's suspend or resume of each of `processes` still there; returns them."""
    for p in processes:
        try:
            getattr(p, action)()
        except psutil.NoSuchProcess:
            pass
    return processes


def search(repo, space_file, *args, trials=3):
    return ["python", "-m", "tools.search", str(space_file), "--trials", str(trials), "--startup-trials", "1",
            "--heartbeat", "1", "-S", SPLIT, *args]


def experiment_params(repo, ref):
    return yaml.safe_load(DVCFileSystem(str(repo), rev=ref).read_text("params.yaml"))


def counted(trials):
    return [t for t in trials if state(t) in ("complete", "pruned")]


def test_workers_that_open_a_study_at_the_same_moment_draw_different_trials_unless_seeded(folder, monkeypatch):
    """Each worker's sampler is its own (no seed by default), where one seed would give every worker that opens
    the study at the same count the same start-up trials; --seed K with one worker reproduces a search."""
    from cifar.space import parse_space
    from cifar.study import base_params, open_study

    monkeypatch.chdir(folder)
    base = base_params()
    space = parse_space({"space": {"train.max_lr": {"low": 0.005, "high": 0.05, "log": True}}}, base, "space")
    storage = open_storage(f"sqlite:///{folder / 'studies.db'}", heartbeat=60)

    def first_proposals(name, seed):
        workers = [open_study(name, storage, space, base, seed) for _ in range(2)]  # both before any trial
        return [w.ask().suggest_float("train.max_lr", 0.005, 0.05, log=True) for w in workers]

    unseeded, seeded = first_proposals("unseeded", None), first_proposals("seeded", 7)
    assert unseeded[0] != unseeded[1] and seeded[0] == seeded[1], (unseeded, seeded)


def test_a_tiny_search_prunes_refuses_and_resumes_after_a_kill_with_exactly_the_trials_asked_for(data_repo,
                                                                                                tmp_path):
    repo = copy_repo(data_repo.repo, tmp_path / "repo")
    space_file = write_space(tmp_path / "tiny.yaml", SPACE)

    # First worker: the four first trials, then SIGKILL to the worker alone in the middle of a sampled trial
    worker = start(repo, *search(repo, space_file, trials=4))
    # the sampled trial (after the four `first` ones), stopped still the moment its first epoch is saved: else, on
    # a fast CPU (epochs under a second), it would train on until it noticed its worker's death (it looks every
    # second) and might be pruned after epoch 2 first (its prune is then what the study records:
    # test_a_trial_whose_worker_died_is_run_again_unless_it_was_already_pruned)
    number, trainer = wait_until(lambda: sampled_trainer(repo, worker), 600, "a sampled trial's train stage", [worker])
    started = trainer.create_time()
    wait_until(lambda: any(f.stat().st_mtime >= started for f in (repo / ".dvc/tmp/checkpoints").glob("*.pt")), 120,
               "its first epoch saved", [worker], interval=0.01)
    held = signal_all(psutil.Process(worker.pid).children(recursive=True), "suspend")  # the whole trial
    os.kill(worker.pid, signal.SIGKILL)
    first_output = finish(worker, 60, "the killed worker's exit")[1]
    signal_all(held, "resume")
    # its trial notices and stops: no trial trains on for a dead worker
    wait_until(lambda: not trial_processes(repo), 30, "the killed worker's trial to stop")

    # The same command again: it continues the study, and runs the killed trial again
    code, rerun, err = finish(start(repo, *search(repo, space_file, trials=4)), 900, "the resumed search")
    assert code == 0, (rerun, err)
    assert "trials done (continuing)" in rerun.splitlines()[0], rerun

    trials = load(repo, "tiny").trials
    states = [state(t) for t in trials]
    assert len(counted(trials)) == 4, states  # exactly the trials asked for
    finished, pruned, refused, cached = trials[:4]
    killed = trials[number]
    assert finished.state.name == "COMPLETE" and finished.params == {"train.max_lr": 0.02,
                                                                   "model.widths": "[8,16,32,64]"}
    # the hopeless trial: pruned before its last epoch, and its record says so
    assert pruned.state.name == "PRUNED" and pruned.params["train.max_lr"] == HOPELESS_LR, states
    assert pruned.user_attrs["pruned_after_epoch"] == 2 and set(pruned.intermediate_values) == {1, 2}
    # over budget: refused before training, with the reason, and infeasible to TPE (which ignores a failed trial)
    assert state(refused) == "refused" and "over model.max_params = 5,000,000" in refused.user_attrs["refused"]
    assert refused.state.name == "PRUNED" and refused.constraints == {"trainable": 1.0}, refused.constraints
    assert not refused.intermediate_values and refused not in counted(trials)
    # the first trial again: DVC restored its training from the run cache, and its epochs still reach the study
    assert "Stage 'train' is cached" in (repo / "reports/tiny/logs/tiny-t3.log").read_text()
    assert cached.state.name == "COMPLETE" and cached.intermediate_values == finished.intermediate_values
    # the killed trial failed once its heartbeat was stale, and ran again with the same params, from its
    # checkpoint, its epochs before the kill carried over
    retry = next((t for t in trials if t.system_attrs.get("failed_trial") == killed.number), None)
    assert retry is not None, (states, killed.number, killed.user_attrs, killed.intermediate_values)
    assert killed.state.name == "FAIL" and retry.params == killed.params, states
    assert set(retry.intermediate_values) == set(range(1, max(retry.intermediate_values) + 1)), retry
    log = (repo / f"reports/tiny/logs/tiny-t{retry.number}.log").read_text()
    # from the last epoch it saved: each epoch is saved before it is reported, so at least the last one reported
    resumed = re.search(r"resuming from .* after epoch (\d)/3", log)
    assert resumed and int(resumed[1]) >= max(killed.intermediate_values, default=1), log
    # no checkpoint is left behind: the pruned trials' are deleted, the killed one's its retry used up
    assert not list((repo / ".dvc/tmp/checkpoints").glob("*")), list((repo / ".dvc/tmp/checkpoints").glob("*"))
    assert retry in counted(trials), states

    # every finished trial is one DVC experiment named for it, with exactly its params and its value: the final
    # validation accuracy without TTA, the measure it reported every epoch (what the pruner compared)
    refs = experiment_refs(repo)
    finished_trials = [t for t in trials if t.state.name == "COMPLETE"]
    assert sorted(refs) == sorted(f"tiny-t{t.number}" for t in finished_trials), (refs, states)
    for t in finished_trials:
        params = experiment_params(repo, refs[f"tiny-t{t.number}"])
        assert params["train"]["max_lr"] == t.params["train.max_lr"]  # exactly: no digit lost on the way
        assert format_value(params["model"]["widths"]) == t.params["model.widths"]
        assert params["train"]["validation_images"] == 100
        metrics = json.loads(DVCFileSystem(str(repo), rev=refs[f"tiny-t{t.number}"]).read_text(
            "metrics/train/metrics.json"))
        assert metrics["validation"]["acc"] == t.value == t.intermediate_values[3] and metrics["step"] == 3
        assert t.user_attrs["tta"] == metrics["validation"]["acc_with_tta"] and set(t.user_attrs["tta"]) == set(
            TTA_MODES)
        assert "test" not in metrics  # the search never read the test set
    # a line per trial, a table and Optuna's figures
    for line in [f"trial {finished.number} tiny-t{finished.number}: validation accuracy",
                 f"trial {pruned.number} tiny-t{pruned.number}: pruned after epoch 2",
                 f"trial {refused.number} refused before training: 317,821,450 parameters"]:
        assert line in first_output, first_output
    report = repo / "reports/tiny"
    table = (report / "trials.md").read_text()
    assert f"| {pruned.number} | pruned | 1e-07 | [8,16,32,64] | – | – | 2 |" in table, table
    assert f"| {refused.number} | refused | " in table, table
    assert f"| {killed.number} | fail |" in table and f"run again as trial {retry.number}" in table, table
    trained = sum(t.user_attrs.get("epochs", t.user_attrs.get("pruned_after_epoch")) for t in counted(trials))
    assert f"Epochs trained by them: {trained} of {4 * 3}" in table, table
    for figure in ["history.png", "importances.png", "parallel_coordinate.png"]:
        assert (report / figure).read_bytes()[:4] == b"\x89PNG"

    # the best trial, with its best TTA on validation, as a preset that tools.sweep queues over seeds
    best = load(repo, "tiny").best_trial
    mode = max(TTA_MODES, key=lambda m: (best.user_attrs["tta"][m], -TTA_MODES.index(m)))
    queued = run(repo, "python", "-m", "tools.sweep", "--best-of", "tiny", "--only", "tiny-best", "--seeds", "1", "2",
                 "--dry-run")
    assert f"-S train.max_lr={format_value(best.params['train.max_lr'])}" in queued and "-n tiny-best-s1" in queued
    assert f"-S evaluate.tta={mode}" in queued, queued
    dvc(repo, "exp", "show")  # DVC reads the trials' experiments as any other


def test_four_trials_at_a_time_all_finish_and_none_waits_on_a_lock_error(data_repo, tmp_path):
    """--jobs 4: trials that start together wait for DVC's lock (dvc --wait-for-lock) instead of failing on it;
    two of them of the same params at once (the first two) train apart, each from its own checkpoint."""
    repo = copy_repo(data_repo.repo, tmp_path / "repo")
    space_file = write_space(tmp_path / "jobs.yaml", {
        "space": {"train.max_lr": {"low": 0.005, "high": 0.05, "log": True}},
        "first": [{"train.max_lr": 0.02}, {"train.max_lr": 0.02}]})
    started = time.monotonic()
    code, out, err = finish(start(repo, "python", "-m", "tools.search", str(space_file), "--trials", "12", "--jobs",
                                  "4", "--pruner", "none", "-S", SPLIT, "-S", "train.epochs=1"), 900,
                            "12 trials at --jobs 4")
    seconds = time.monotonic() - started
    logs = "".join(p.read_text() for p in (repo / "reports/jobs/logs").glob("*.log"))
    assert LOCK_ERROR not in out + err + logs, (out, err)
    trials = load(repo, "jobs").trials
    assert code == 0 and [t.state.name for t in trials] == ["COMPLETE"] * 12, (out, err)
    assert trials[0].value == trials[1].value and trials[0].intermediate_values == trials[1].intermediate_values
    # they ran side by side: some trial started before another had finished
    spans = sorted((t.datetime_start, t.datetime_complete) for t in trials)
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:])), spans
    print(f"12 one-epoch trials at --jobs 4: {seconds:.0f} s, 0 failed")


def test_two_workers_started_together_never_propose_the_same_trial(data_repo, tmp_path):
    """Default flags: each worker draws its own proposals; 8 trials, all in TPE's random start-up (10)."""
    repo = copy_repo(data_repo.repo, tmp_path / "repo")
    space_file = write_space(tmp_path / "pair.yaml", {"space": {"train.max_lr": {"low": 0.005, "high": 0.05,
                                                                                 "log": True}}})
    command = ["python", "-m", "tools.search", str(space_file), "--trials", "8", "--pruner", "none", "-S", SPLIT,
               "-S", "train.epochs=1"]
    workers = [start(repo, *command) for _ in range(2)]
    outputs = [finish(w, 900, f"worker {i} of two") for i, w in enumerate(workers)]
    assert [code for code, _, _ in outputs] == [0, 0], outputs
    finished = [t for t in load(repo, "pair").trials if t.state.name == "COMPLETE"]
    assert len(finished) == 8, outputs
    assert len({t.params["train.max_lr"] for t in finished}) == 8, [t.params for t in finished]
    assert all("trial " in out for _, out, _ in outputs), "each worker ran some of the trials"


def test_a_trial_that_fails_on_its_own_is_recorded_and_the_search_goes_on_until_3_in_a_row(data_repo, tmp_path,
                                                                                         stage):
    """A trial whose experiment cannot be made (here its name is taken) fails with its reason and the next
    one runs; three failures in a row end the worker in one line."""
    repo = copy_repo(data_repo.repo, tmp_path / "repo")
    space_file = write_space(tmp_path / "fails.yaml", {"space": {"train.max_lr": {"low": 0.005, "high": 0.05}}})
    command = ["python", "-m", "tools.search", str(space_file), "--trials", "4", "--pruner", "none", "-S", SPLIT,
               "-S", "train.epochs=1"]
    assert stage(repo, "tools.search", *command[3:], "--report-only").code == 0  # the study, before the names
    for number in [1, 4, 5, 6]:
        dvc(repo, "exp", "run", "-n", f"fails-t{number}", "stats")
    code, out, err = finish(start(repo, *command), 900, "the search with failing trials")
    assert code == 1 and err.count("\n") == 1, (out, err)
    assert err.startswith("error: 3 trials in a row failed (the last, trial 6: "), err
    trials = load(repo, "fails").trials
    assert [state(t) for t in trials] == ["complete", "fail", "complete", "complete", "fail", "fail", "fail"], out
    assert all("fails-t" in t.user_attrs["failed"] for t in trials if state(t) == "fail"), trials[1].user_attrs
    assert f"trial 1 fails-t1: failed: {trials[1].user_attrs['failed']}" in out, out


def test_a_study_created_again_under_an_old_name_is_one_line(data_repo, tmp_path, stage):
    repo = copy_repo(data_repo.repo, tmp_path / "repo")
    dvc(repo, "exp", "run", "-n", "old-t0", "stats")  # an experiment by the name trial 0 would take (no training)
    path = write_space(tmp_path / "old.yaml", {"space": {"train.max_lr": [0.01, 0.02]}})
    ran = stage(repo, "tools.search", str(path), "-S", SPLIT, "--report-only")
    assert ran.code == 1 and ran.err.count("\n") == 1, ran.output
    assert ran.err == ("error: study 'old' is new, but experiments of an earlier study of that name remain (old-t0): "
                       "remove them (dvc exp remove old-t0) or name a new study (--study)\n"), ran.err
    assert stage(repo, "tools.search", str(path), "--study", "new", "-S", SPLIT, "--report-only").code == 0


def test_a_study_continues_only_with_the_space_params_and_code_that_started_it(folder, stage, monkeypatch):
    import cifar.study

    path = write_space(folder / "space.yaml", {"space": {"train.max_lr": [0.01, 0.02]}})
    started = stage(folder, "tools.search", str(path), "-S", SPLIT, "--report-only")
    assert started.code == 0 and (folder / "reports/space/trials.md").is_file(), started.output
    assert stage(folder, "tools.search", str(path), "-S", SPLIT, "--report-only").code == 0
    # params.yaml with a trial's value of a space key, as `dvc exp run` leaves it while it sets up another worker's
    # trial: the same study (no trial takes params.yaml's value of a key of its space)
    set_params(folder, train__max_lr=0.02)
    assert stage(folder, "tools.search", str(path), "-S", SPLIT, "--report-only").code == 0
    set_params(folder, train__max_lr=0.01)
    for change, settings, what in [("another split", ["-S", "train.validation_images=200"], "params.yaml or -S"),
                                   ("another space", ["-S", SPLIT], "space")]:
        if change == "another space":
            write_space(path, {"space": {"train.max_lr": [0.01, 0.03]}})
        ran = stage(folder, "tools.search", str(path), *settings, "--report-only")
        assert ran.code == 1 and ran.err.count("\n") == 1, ran.output
        assert f"study 'space' was started with another {what}" in ran.err, ran.err
    write_space(path, {"space": {"train.max_lr": [0.01, 0.02]}})
    monkeypatch.setattr(cifar.study, "train_code", lambda: "edited")
    ran = stage(folder, "tools.search", str(path), "-S", SPLIT, "--report-only")
    assert ran.code == 1 and "another train stage's code" in ran.err, ran.err


def test_params_or_code_changed_in_the_middle_of_a_search_stop_it_before_the_next_trial(folder, stage,
                                                                                         monkeypatch):
    """Checked before each trial (each trains a copy of the workspace), not only at the start."""
    import cifar.study
    from cifar.study import base_params, check_code, check_params, with_settings

    path = write_space(folder / "space.yaml", {"space": {"train.max_lr": [0.01, 0.02]}})
    assert stage(folder, "tools.search", str(path), "-S", SPLIT, "--report-only").code == 0
    study = optuna.load_study(study_name="space", storage=f"sqlite:///{folder / '.optuna/search.db'}")
    settings = {"train.validation_images": 100}
    check_params(study, with_settings(base_params(), settings))  # as it was started: goes on
    check_code(study)
    set_params(folder, train__epochs=7, train__cutout=4, train__max_lr=0.02)
    with pytest.raises(cifar.study.UserError, match=r"^params.yaml changed since study 'space' began \(train.epochs, "
                       r"train.max_lr, train.cutout\): undo the change to continue it, or name a new study "
                       r"\(--study\)$"):
        check_params(study, with_settings(base_params(), settings))
    # what a trial trained: its own values aside
    with pytest.raises(cifar.study.UserError, match=r"\(train.epochs, train.cutout\)"):
        check_params(study, with_settings(base_params(), settings), ["train.max_lr"])
    set_params(folder, train__epochs=3, train__cutout=0)
    check_params(study, with_settings(base_params(), settings), ["train.max_lr"])
    monkeypatch.setattr(cifar.study, "train_code", lambda: "edited")
    with pytest.raises(cifar.study.UserError, match="the train stage's code changed since study 'space' began"):
        check_code(study)


def test_the_final_model_is_scored_once_with_every_tta_mode_on_validation_and_evaluate_tta_changes_nothing(
        data_repo, tmp_path, stage, monkeypatch):
    """The TTA is chosen after training: the train stage scores its final model on the held-out images once
    with each mode, whatever evaluate.tta says; the per-epoch curves stay without TTA."""
    from cifar import fit

    repo = copy_repo(data_repo.repo, tmp_path / "repo")
    calls, score = [], fit.score
    monkeypatch.setattr(fit, "score", lambda model, images, labels, *rest: calls.append((len(labels), rest[-1]))
                        or score(model, images, labels, *rest))
    found = []
    for tta in ["flip", "none"]:
        set_params(repo, train__validation_images=100, evaluate__tta=tta)
        calls.clear()
        ran = stage(repo, "train")
        assert ran.code == 0 and calls == [(100, mode) for mode in TTA_MODES], (ran.output, calls)
        found.append(read_json(repo, "metrics/train/metrics.json")["validation"])
        assert not list((repo / "metrics/train/plots").rglob("acc_with_tta*"))  # no curve of it
    first, second = found
    assert set(first["acc_with_tta"]) == set(TTA_MODES) and all(0 < v <= 1 for v in first["acc_with_tta"].values())
    assert first["acc_with_tta"]["none"] == first["acc"]  # without TTA: the last epoch's own score
    assert first == second  # evaluate.tta is no input of training


@pytest.mark.parametrize("space_file", ["search.yaml", "search-full.yaml"])
def test_the_shipped_space_is_valid_and_starts_from_the_study_s_recipe(monkeypatch, space_file):
    from dvcrepo import REPO

    from cifar.params import load_yaml
    from cifar.space import parse_space, refusal
    from cifar.study import base_params

    monkeypatch.chdir(REPO)
    base = base_params()
    space = parse_space(load_yaml(space_file), base, space_file)
    (first,) = space.first  # the TTA is no key of it: every trial is scored with each mode
    assert set(first) == set(space.keys)  # the baseline trial sets every searched key
    assert all(first[key] == base[key.split(".")[0]][key.split(".")[1]] for key in first)  # params.yaml's values
    assert refusal(base, first) is None


@pytest.mark.parametrize("signum, to_group, said", [
    (signal.SIGINT, True, "Ctrl-C (SIGINT)"),  # a terminal's Ctrl-C: the worker's process group
    (signal.SIGINT, False, "Ctrl-C (SIGINT)"),  # kill -INT PID: the worker alone, which forwards it
    (signal.SIGTERM, False, "SIGTERM"),  # a scheduler's stop
])
def test_a_stop_ends_the_search_and_its_trial_in_one_line_and_writes_the_report(data_repo, tmp_path, signum,
                                                                                   to_group, said):
    repo = copy_repo(data_repo.repo, tmp_path / "repo")
    space_file = write_space(tmp_path / "stop.yaml", {"space": {"train.max_lr": [0.01, 0.02]}})
    worker = start(repo, *search(repo, space_file))
    wait_until(lambda: [t for t in trials_so_far(repo, "stop") if t.intermediate_values], 300,
               "the trial's first epoch", [worker])
    (os.killpg if to_group else os.kill)(worker.pid, signum)
    _, out, err = finish(worker, 120, f"the worker's exit after {said}")
    assert worker.returncode == 1 and err.strip().splitlines()[-1].startswith(f"error: search stopped by {said};"), err
    assert "Traceback" not in err and not trial_processes(repo)
    assert (repo / "reports/stop/trials.md").is_file() and not experiment_refs(repo)
    # the trial was stopped, not left to train to its end: failed, and its train stage says why
    [trial] = trials_so_far(repo, "stop")
    assert trial.state == optuna.trial.TrialState.FAIL, (trial.state, err)
    log = repo / f"reports/stop/logs/stop-t{trial.number}.log"
    assert "training stopped by SIGINT" in log.read_text(), log.read_text()
    if signum == signal.SIGTERM:  # at the next start, the stopped trial runs again with the same params
        code, rerun, err = finish(start(repo, *search(repo, space_file, trials=1)), 300, "the search started again")
        assert code == 0, (rerun, err)
        stopped, retry = trials_so_far(repo, "stop")
        assert retry.state.name == "COMPLETE" and retry.params == stopped.params, rerun
        assert retry.system_attrs["failed_trial"] == stopped.number and stopped.user_attrs["stopped"] == "SIGTERM"
