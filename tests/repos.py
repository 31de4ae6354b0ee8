"""Temporary git + DVC repositories holding this project's tracked files, for the end-to-end tests: the real
dvc.yaml run by DVC itself on the synthetic archive served from 127.0.0.1, with a tiny model."""
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
           "data/.gitignore", "models/.gitignore", "metrics/.gitignore", "plots/.gitignore"]
TIMING = {"wall_time_s", "images_per_s"}  # measurements of the machine, not results of the training
TINY = {"model__widths": [8, 16, 32, 64], "train__epochs": 3, "train__batch_size": 50}
ENV = {"DVC_NO_ANALYTICS": "1", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
       "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com", "GIT_COMMITTER_NAME": "test",
       "GIT_COMMITTER_EMAIL": "test@example.com"}


def run(repo, *args):
    result = subprocess.run(args, cwd=repo, env={**os.environ, **ENV}, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr


def dvc(repo, *args):
    return run(repo, sys.executable, "-m", "dvc", *args)


def start(repo, *args):
    """A command running in the background in its own process group (to signal it and its children)."""
    return subprocess.Popen(args, cwd=repo, env={**os.environ, **ENV}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def stages_run(output):
    return set(re.findall(r"Running stage '(\w+)'", output))


def set_params(repo, **changes):
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for key, value in changes.items():
        section, name = key.split("__")
        params[section][name] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def read_json(repo, path):
    return json.loads((repo / path).read_text())


def results(metrics):
    return {k: v for k, v in metrics.items() if k not in TIMING}


def make_repo(repo, archive, **params):
    """A git repository at `repo` with this project's tracked files committed, pointed at the synthetic
    archive, with the TINY settings updated by `params` (section__key=value)."""
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
