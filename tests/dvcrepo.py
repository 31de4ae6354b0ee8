"""Temporary git + DVC repositories holding this project, for the tests that run DVC itself."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from deadlines import COMMAND_S, WAIT_S, finish, wait_until

REPO = Path(__file__).resolve().parent.parent
TRACKED = ["stages", "cifar", "tools", "dvc.yaml", "params.yaml", ".dvcignore", ".gitignore", ".dvc/config",
           ".dvc/.gitignore",
           "data/.gitignore", "models/.gitignore", "metrics/.gitignore", "plots/.gitignore", "plots_template"]
CHECKPOINT = "models/checkpoint.pt"
TIMING = {"wall_time_s", "images_per_s"}  # measurements of the machine, not results of the training
TINY = {"model__widths": [8, 16, 32, 64], "train__epochs": 3, "train__batch_size": 50}


def env():
    """The environment of every command the tests run: this Python first on PATH (`python` in dvc.yaml is
    this one), no GPU (the CPU tests rely on the CPU's determinism and its one device; the GPU tests say so
    and run in-process), no analytics, and a git identity for the commits DVC's experiments make."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    git_user = {f"GIT_{role}_{field}": value for role in ["AUTHOR", "COMMITTER"]
                for field, value in [("NAME", "test"), ("EMAIL", "test@example.com")]}
    return {**os.environ, **git_user, "DVC_NO_ANALYTICS": "1", "CUDA_VISIBLE_DEVICES": "", "PATH": path}


def call(repo, *args, timeout=COMMAND_S, **environment):
    """(exit status, stdout, stderr) of a command run in `repo` with env() and `environment`, which must end
    within `timeout` s (deadlines.finish)."""
    process = subprocess.Popen(args, cwd=repo, env={**env(), **environment}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    return finish(process, timeout, " ".join(map(str, args)))


def run(repo, *args, timeout=COMMAND_S):
    code, out, err = call(repo, *args, timeout=timeout)
    assert code == 0, f"{' '.join(map(str, args))} failed:\n{out[-3000:]}\n{err[-3000:]}"
    return out + err


def dvc(repo, *args, timeout=COMMAND_S):
    return run(repo, sys.executable, "-m", "dvc", *args, timeout=timeout)


def start(repo, *args, **environment):
    """A command running in the background in its own process group (to signal it and its children), with
    `environment` added to env(). deadlines.finish waits for it."""
    return subprocess.Popen(args, cwd=repo, env={**env(), **environment}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def stages_run(output):
    return set(re.findall(r"Running stage '(\w+)'", output))


def results(metrics):
    return {k: v for k, v in metrics.items() if k not in TIMING}


CURVES = ["train/loss", "train/acc", "test/loss", "test/acc", "lr"]


def training_results(repo):
    """What a training run decides (no timings): its metrics, every curve, the model, the test evaluation."""
    found = {"metrics": results(read_json(repo, "metrics/train/metrics.json")),
             "curves": {name: (repo / f"metrics/train/plots/metrics/{name}.tsv").read_text() for name in CURVES},
             "model": (repo / "models/model.pt").read_bytes()}
    if (repo / "metrics/evaluate/metrics.json").is_file():
        found["evaluate"] = read_json(repo, "metrics/evaluate/metrics.json")
    return found


def set_params(repo, **changes):
    """section__key=value pairs into params.yaml."""
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for key, value in changes.items():
        section, name = key.split("__")
        params[section][name] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def read_json(repo, path):
    return json.loads((repo / path).read_text())


def make_repo(repo, archive, **params):
    """A git repository in `repo` holding this project's tracked files, pointed at the synthetic `archive`
    (url, md5), with the tiny settings and `params`, committed."""
    for name in TRACKED:
        source, target = REPO / name, repo / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, target)
    url, md5 = archive
    set_params(repo, data__url=url, data__md5=md5, **{**TINY, **params})
    run(repo, "git", "init", "-q")
    # in the repository itself too: one of DVC's git back ends reads no GIT_* identity variables
    run(repo, "git", "config", "user.name", "test")
    run(repo, "git", "config", "user.email", "test@example.com")
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "pipeline")
    return repo


def copy_repo(repo, target):
    """A copy of a test repository (work tree, git, DVC cache) at `target`, to change without touching the
    original: much cheaper than rerunning its stages."""
    shutil.copytree(repo, target, symlinks=True, ignore=shutil.ignore_patterns("dvc_plots"))
    return Path(target)


def assert_curves_overlaid(repo, *revs):
    """`dvc plots diff` of `revs` overlays every revision's curve of each file of the curves folder (dvc.yaml
    declares the folder: one plot per file, each revision drawing the files it has)."""
    plots = json.loads(dvc(repo, "plots", "diff", *revs, "--json"))["data"]
    for name in CURVES:
        values = plots[f"metrics/train/plots/metrics/{name}.tsv"][0]["content"]["data"]["values"]
        assert {v["rev"] for v in values} == set(revs), name


def finished_epochs(repo):
    try:
        return torch.load(repo / CHECKPOINT, weights_only=True)["progress"]["finished"]
    except FileNotFoundError:
        return 0


def wait_for_experiments(repo, names, timeout=WAIT_S):
    """Wait until each name has an experiment ref, reading git's refs only: polling `dvc queue status` makes
    the worker read the broker's control messages, and a message read half-written crashes it (dvc 3.67)."""
    def finished():
        refs = run(repo, "git", "for-each-ref", "--format=%(refname)", "refs/exps").split()
        assert "refs/exps/celery/failed" not in refs, dvc(repo, "queue", "status")
        return set(names) <= {ref.rsplit("/", 1)[1] for ref in refs if not ref.startswith("refs/exps/celery/")}

    wait_until(finished, timeout, f"the queued experiments {', '.join(names)}", interval=0.5)


def wait_for_epoch(repo, *processes, timeout=WAIT_S):
    """The finished epochs repo's checkpoint holds, once it holds one, written by `processes` (started, in the
    background: the test fails at once if one ends first)."""
    return wait_until(lambda: finished_epochs(repo), timeout, f"a checkpoint in {repo} holding a finished epoch",
                      processes, interval=0.02)


def stop_after_first_epoch(repo, process, signum):
    """Send `signum` to the process group of `process` once the checkpoint holds a finished epoch; returns
    (exit status, stderr, the finished epochs the checkpoint held when the signal was sent)."""
    epoch = wait_for_epoch(repo, process)
    os.killpg(process.pid, signum)
    code, _, stderr = finish(process, COMMAND_S, f"the run stopped by {signal.Signals(signum).name}")
    return code, stderr, epoch


def module(repo, name, *args):
    """python -m stages.<name> (or a dotted module: tools.sweep) args in repo, as its own process -> (exit
    status, stdout + stderr)."""
    code, out, err = call(repo, sys.executable, "-m", name if "." in name else f"stages.{name}", *args)
    return code, out + err


def queue_rows(repo):
    """[(experiment name, state)] of the tasks `dvc queue status` lists."""
    table = dvc(repo, "queue", "status", timeout=120).split("\n\n")[0]  # then a blank line and the workers
    return [(parts[1], parts[-1]) for parts in (line.split() for line in table.splitlines()[1:])]


def queue_states(repo):
    """{experiment name: state} from `dvc queue status`."""
    return dict(queue_rows(repo))


def start_workers(repo, log, jobs):
    """`dvc queue start -j jobs`. Its workers keep the command's stdout and stderr open, so they go to a file:
    through a pipe, the command would seem to run as long as the workers."""
    with open(log, "w") as f:
        process = subprocess.Popen([sys.executable, "-m", "dvc", "queue", "start", "-j", str(jobs)], cwd=repo,
                                   env=env(), stdout=f, stderr=subprocess.STDOUT, text=True)
        code, _, _ = finish(process, 120, f"dvc queue start -j {jobs}")
    assert code == 0, log.read_text()
    return log.read_text()


def stop_queue(repo):
    """`dvc queue stop --kill`: the workers run in the background; stop them, and any task they left running.
    Whether it worked is not checked: it runs in a `finally`, after whatever the test found."""
    call(repo, sys.executable, "-m", "dvc", "queue", "stop", "--kill", timeout=120)


def experiment_results(repo, rev):
    """training_results of the experiment at `rev`, read through DVC's file system API from its cached outputs."""
    from dvc.api import DVCFileSystem

    fs = DVCFileSystem(str(repo), rev=rev)
    return {"metrics": results(json.loads(fs.read_text("metrics/train/metrics.json"))),
            "curves": {name: fs.read_text(f"metrics/train/plots/metrics/{name}.tsv") for name in CURVES},
            "model": fs.read_bytes("models/model.pt"),
            "evaluate": json.loads(fs.read_text("metrics/evaluate/metrics.json"))}


def experiment_refs(repo):
    """{experiment name: commit} of the finished experiments."""
    refs = run(repo, "git", "for-each-ref", "--format=%(refname) %(objectname)", "refs/exps").splitlines()
    return {ref.rsplit("/", 1)[1]: sha for ref, sha in map(str.split, refs) if not ref.startswith("refs/exps/celery/")}
