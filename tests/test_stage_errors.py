"""Stage entry points on bad input: one line on stderr naming the problem, exit status 1, no output."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def workdir(tmp_path, archive):
    shutil.copytree(REPO / "stages", tmp_path / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["url"], params["data"]["md5"] = archive
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path


def set_param(workdir, section, key, value):
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    params[section][key] = value
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))


def run_stage(workdir, stage):
    result = subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=workdir, capture_output=True, text=True,
                            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    return result.returncode, result.stderr.strip()


def files_under(folder):
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*") if p.is_file()) if folder.exists() else []


def assert_one_line_error(code, stderr, *phrases):
    """Exit status 1 and the error as the last line of stderr (a download's progress bar may precede it)."""
    error = stderr.splitlines()[-1]
    assert code == 1 and error.startswith("error: ") and "Traceback" not in stderr, stderr
    for phrase in phrases:
        assert phrase in error, stderr


def test_download_with_a_wrong_checksum(workdir):
    set_param(workdir, "data", "md5", "f" * 32)
    assert_one_line_error(*run_stage(workdir, "download"), "data.md5 is " + "f" * 32)
    assert files_under(workdir / "data") == []


def test_train_over_the_budget_fails_before_any_work(workdir):
    set_param(workdir, "model", "max_params", 1000)
    assert_one_line_error(*run_stage(workdir, "train"), "over model.max_params = 1,000")
    assert files_under(workdir / "models") == [] and files_under(workdir / "metrics") == []


def test_an_invalid_param_fails_every_stage(workdir):
    set_param(workdir, "train", "epochs", 0)
    for stage in ["download", "stats", "train", "evaluate", "plot"]:
        assert_one_line_error(*run_stage(workdir, stage), "train.epochs = 0", "integer >= 1")


def test_evaluate_without_a_checkpoint(workdir):
    assert_one_line_error(*run_stage(workdir, "evaluate"), "models/model.pt: no such checkpoint")
