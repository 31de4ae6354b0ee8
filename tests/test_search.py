"""tools.search: an Optuna study whose every trial is a DVC experiment (docs/experiments.md). Bad input is one
line before any trial; a tiny search on the synthetic set finishes one trial, prunes a hopeless one, refuses one
over budget, and is resumed after its worker is killed in the middle of a trial, running exactly the trials
asked for. tests/test_search_machines.py runs two workers on a real PostgreSQL."""
import json
import multiprocessing
import os
import signal
import time

import optuna
import psutil
import pytest
import sqlalchemy
import yaml
from dvc.api import DVCFileSystem
from dvcrepo import copy_repo, dvc, experiment_refs, read_json, run, set_params, start

from tools.search import NOT_SEARCHED, open_storage
from tools.sweep import format_value

SPLIT = "train.validation_images=100"  # of the synthetic set's 600 training images
HOPELESS_LR = 1e-7
SPACE = {"space": {"train.max_lr": {"low": HOPELESS_LR, "high": 0.05, "log": True},
                   "model.widths": [[8, 16, 32, 64], [512, 1024, 2048, 4096]]},  # the second: 318M parameters
         "first": [{"train.max_lr": 0.02, "model.widths": [8, 16, 32, 64]},
                   {"train.max_lr": HOPELESS_LR, "model.widths": [8, 16, 32, 64]},
                   {"model.widths": [512, 1024, 2048, 4096]}]}


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
    ("outside model, train, evaluate", {"space": {"system.device": ["cpu"]}}, [SPLIT],
     "system.device cannot be searched: only keys of model, train, evaluate"),
    ("the budget", {"space": {"model.max_params": [10]}}, [SPLIT], NOT_SEARCHED["model.max_params"]),
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


def search(repo, space_file, *args):
    return ["python", "-m", "tools.search", str(space_file), "--trials", "3", "--startup-trials", "1",
            "--heartbeat", "1", "-S", SPLIT, *args]


def experiment_params(repo, ref):
    return yaml.safe_load(DVCFileSystem(str(repo), rev=ref).read_text("params.yaml"))


def test_a_tiny_search_prunes_refuses_and_resumes_after_a_kill_with_exactly_the_trials_asked_for(data_repo,
                                                                                                tmp_path):
    repo = copy_repo(data_repo.repo, tmp_path / "repo")
    space_file = write_space(tmp_path / "tiny.yaml", SPACE)

    # First worker: the three first trials, then SIGKILL to the worker alone in the middle of a sampled trial
    worker = start(repo, *search(repo, space_file))
    deadline = time.monotonic() + 600
    while not (running := [t for t in trials_so_far(repo, "tiny")[3:] if t.intermediate_values]):
        assert worker.poll() is None, worker.communicate()
        assert time.monotonic() < deadline, "no sampled trial reported an epoch in 600 s"
        time.sleep(0.2)
    os.kill(worker.pid, signal.SIGKILL)
    first_output = worker.communicate()[0]
    deadline = time.monotonic() + 10  # its trial notices and stops: no trial trains on for a dead worker
    while trial_processes(repo) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not trial_processes(repo), [p.info["cmdline"] for p in trial_processes(repo)]

    # The same command again: it continues the study, and runs the killed trial again
    rerun = run(repo, *search(repo, space_file), timeout=900)
    assert "trials done (continuing)" in rerun.splitlines()[0], rerun

    trials = load(repo, "tiny").trials
    states = [t.state.name for t in trials]
    counted = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(counted) == 3, states  # exactly the trials asked for
    finished, pruned, refused, killed = trials[0], trials[1], trials[2], trials[running[0].number]
    assert finished.state.name == "COMPLETE" and finished.params == {"train.max_lr": 0.02,
                                                                   "model.widths": "[8,16,32,64]"}
    # the hopeless trial: pruned before its last epoch, and its record says so
    assert pruned.state.name == "PRUNED" and pruned.params["train.max_lr"] == HOPELESS_LR, states
    assert pruned.user_attrs["pruned_after_epoch"] == 2 and set(pruned.intermediate_values) == {1, 2}
    # over budget: refused before training, with the reason
    assert refused.state.name == "FAIL" and "over model.max_params = 5,000,000" in refused.user_attrs["refused"]
    assert not refused.intermediate_values
    # the killed trial failed once its heartbeat was stale, and ran again with the same params
    retry = next(t for t in trials if t.system_attrs.get("failed_trial") == killed.number)
    assert killed.state.name == "FAIL" and retry.params == killed.params, states
    # no checkpoint is left behind: the pruned trials' are deleted, the killed one's its retry used up
    assert not list((repo / ".dvc/tmp/checkpoints").glob("*")), list((repo / ".dvc/tmp/checkpoints").glob("*"))
    assert retry.number in [t.number for t in counted], states

    # every finished trial is one DVC experiment named for it, with exactly its params and its value
    refs = experiment_refs(repo)
    finished_trials = [t for t in trials if t.state.name == "COMPLETE"]
    assert sorted(refs) == sorted(f"tiny-t{t.number}" for t in finished_trials), (refs, states)
    for t in finished_trials:
        params = experiment_params(repo, refs[f"tiny-t{t.number}"])
        assert format_value(params["train"]["max_lr"]) == format_value(t.params["train.max_lr"])
        assert format_value(params["model"]["widths"]) == t.params["model.widths"]
        assert params["train"]["validation_images"] == 100
        metrics = json.loads(DVCFileSystem(str(repo), rev=refs[f"tiny-t{t.number}"]).read_text(
            "metrics/train/metrics.json"))
        assert metrics["validation"]["acc_with_tta"] == t.value and metrics["step"] == 3
        assert "test" not in metrics  # the search never read the test set
    # a line per trial, a table and Optuna's figures
    for line in [f"trial {finished.number} tiny-t{finished.number}: validation accuracy",
                 f"trial {pruned.number} tiny-t{pruned.number}: pruned after epoch 2",
                 f"trial {refused.number} refused before training: 317,821,450 parameters"]:
        assert line in first_output, first_output
    report = repo / "reports/tiny"
    table = (report / "trials.md").read_text()
    assert f"| {pruned.number} | pruned | 1e-07 | [8,16,32,64] | 0.1" in table, table
    assert f"| {killed.number} | fail |" in table and f"run again as trial {retry.number}" in table, table
    trained = 3 + 2 + sum(2 if t.state.name == "PRUNED" else 3 for t in counted[2:])  # finished, pruned, the rest
    assert f"Epochs trained by them: {trained} of {3 * 3}" in table, table
    for figure in ["history.png", "importances.png", "parallel_coordinate.png"]:
        assert (report / figure).read_bytes()[:4] == b"\x89PNG"

    # the best trial as a preset that tools.sweep queues over seeds
    best = load(repo, "tiny").best_trial
    queued = run(repo, "python", "-m", "tools.sweep", "--best-of", "tiny", "--only", "tiny-best", "--seeds", "0", "1",
                 "--dry-run")
    assert f"-S train.max_lr={format_value(best.params['train.max_lr'])}" in queued and "-n tiny-best-s1" in queued
    dvc(repo, "exp", "show")  # DVC reads the trials' experiments as any other


def test_a_study_continues_only_with_the_space_params_and_code_that_started_it(folder, stage, monkeypatch):
    import tools.search

    path = write_space(folder / "space.yaml", {"space": {"train.max_lr": [0.01, 0.02]}})
    started = stage(folder, "tools.search", str(path), "-S", SPLIT, "--report-only")
    assert started.code == 0 and (folder / "reports/space/trials.md").is_file(), started.output
    assert stage(folder, "tools.search", str(path), "-S", SPLIT, "--report-only").code == 0
    for change, settings, what in [("another split", ["-S", "train.validation_images=200"], "params.yaml or -S"),
                                   ("another space", ["-S", SPLIT], "space")]:
        if change == "another space":
            write_space(path, {"space": {"train.max_lr": [0.01, 0.03]}})
        ran = stage(folder, "tools.search", str(path), *settings, "--report-only")
        assert ran.code == 1 and ran.err.count("\n") == 1, ran.output
        assert f"study 'space' was started with another {what}" in ran.err, ran.err
    write_space(path, {"space": {"train.max_lr": [0.01, 0.02]}})
    monkeypatch.setattr(tools.search, "train_code", lambda: "edited")
    ran = stage(folder, "tools.search", str(path), "-S", SPLIT, "--report-only")
    assert ran.code == 1 and "another train stage's code" in ran.err, ran.err


def test_the_final_validation_accuracy_is_also_scored_once_with_evaluate_tta(data_repo, tmp_path, stage, monkeypatch):
    """The search's objective: the train stage scores its final model on the held-out images once more, with
    evaluate.tta; the per-epoch curves stay without it."""
    from cifar import fit

    repo = copy_repo(data_repo.repo, tmp_path / "repo")
    calls, score = [], fit.score
    monkeypatch.setattr(fit, "score", lambda model, images, labels, *rest: calls.append((len(labels), rest[-1]))
                        or score(model, images, labels, *rest))
    for tta in ["flip", "none"]:
        set_params(repo, train__validation_images=100, evaluate__tta=tta)
        calls.clear()
        ran = stage(repo, "train")
        assert ran.code == 0 and calls == [(100, tta)], (ran.output, calls)  # once, on the held-out images
        validation = read_json(repo, "metrics/train/metrics.json")["validation"]
        assert 0 < validation["acc_with_tta"] <= 1
        assert not list((repo / "metrics/train/plots").rglob("acc_with_tta*"))  # no curve of it
    assert validation["acc_with_tta"] == validation["acc"]  # without TTA: the last epoch's own score


def test_the_shipped_space_is_valid_and_starts_from_the_study_s_recipe(monkeypatch):
    from dvcrepo import REPO

    from cifar.params import load_yaml
    from tools.search import base_params, parse_space, refusal

    monkeypatch.chdir(REPO)
    base = base_params()
    space = parse_space(load_yaml("search.yaml"), base, "search.yaml")
    first, with_tta = space.first
    assert set(first) == set(space.keys)  # the baseline trial sets every searched key
    assert all(first[key] == base[key.split(".")[0]][key.split(".")[1]] for key in first)  # params.yaml's values
    assert with_tta == {**first, "evaluate.tta": "flip_translate"}  # then the same training with TTA
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
    deadline = time.monotonic() + 300
    while not [t for t in trials_so_far(repo, "stop") if t.intermediate_values]:
        assert worker.poll() is None and time.monotonic() < deadline, worker.communicate()
        time.sleep(0.2)
    (os.killpg if to_group else os.kill)(worker.pid, signum)
    out, err = worker.communicate(timeout=120)
    assert worker.returncode == 1 and err.strip().splitlines()[-1].startswith(f"error: search stopped by {said};"), err
    assert "Traceback" not in err and not trial_processes(repo)
    assert (repo / "reports/stop/trials.md").is_file() and not experiment_refs(repo)
    # the trial was stopped, not left to train to its end: failed, and its train stage says why
    [trial] = trials_so_far(repo, "stop")
    assert trial.state == optuna.trial.TrialState.FAIL, (trial.state, err)
    log = repo / f"reports/stop/logs/stop-t{trial.number}.log"
    assert "training stopped by SIGINT" in log.read_text(), log.read_text()
