"""Temporary git + DVC repositories holding this project, for the tests that run DVC itself."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
TRACKED = ["stages", "dvc.yaml", "params.yaml", ".dvcignore", ".gitignore", ".dvc/config", ".dvc/.gitignore",
           "data/.gitignore", "models/.gitignore", "metrics/.gitignore", "plots/.gitignore", "plots_template"]
TIMING = {"wall_time_s", "images_per_s"}  # measurements of the machine, not results of the training
TINY = {"model__widths": [8, 16, 32, 64], "train__epochs": 3, "train__batch_size": 50}


def env():
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # `python` in dvc.yaml is this one
    git_user = {f"GIT_{role}_{field}": value for role in ["AUTHOR", "COMMITTER"]
                for field, value in [("NAME", "test"), ("EMAIL", "test@example.com")]}
    return {**os.environ, **git_user, "DVC_NO_ANALYTICS": "1", "PATH": path}


def run(repo, *args, timeout=None):
    result = subprocess.run(args, cwd=repo, env=env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr


def dvc(repo, *args, timeout=None):
    return run(repo, sys.executable, "-m", "dvc", *args, timeout=timeout)


def start(repo, *args):
    """A command running in the background in its own process group (to signal it and its children)."""
    return subprocess.Popen(args, cwd=repo, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def stages_run(output):
    return set(re.findall(r"Running stage '(\w+)'", output))


def results(metrics):
    return {k: v for k, v in metrics.items() if k not in TIMING}


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
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "pipeline")
    return repo


def assert_curves_overlaid(repo, *revs):
    """`dvc plots diff` of `revs` draws every revision's loss, accuracy and learning-rate curves in one plot."""
    plots = json.loads(dvc(repo, "plots", "diff", *revs, "--json"))["data"]
    for plot_id in ["loss", "accuracy", "learning_rate"]:
        values = plots[plot_id][0]["content"]["data"]["values"]
        assert {v["rev"] for v in values} == set(revs), plot_id
