"""The resumable checkpoint's fingerprint: what makes a checkpoint belong to a run, and what does not."""
import copy
import importlib
from pathlib import Path

import pytest
import torch
import yaml

from stages import resume
from stages.resume import fingerprint

REPO = Path(__file__).resolve().parent.parent
PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())
CPU = torch.device("cpu")


@pytest.fixture
def run_folder(tmp_path, monkeypatch):
    """A folder holding what the fingerprint reads: two batch files, data/stats.json, and (standing in for
    the train stage's modules) two code files."""
    batches = tmp_path / "data/cifar-10-batches-py"
    batches.mkdir(parents=True)
    (batches / "data_batch_1").write_bytes(b"batch one")
    (batches / "test_batch").write_bytes(b"test batch")
    (tmp_path / "data/stats.json").write_text('{"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}')
    code = [tmp_path / "train.py", tmp_path / "training.py"]
    for path in code:
        path.write_text(f"# {path.name}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(resume, "code_of", lambda module: code if module == "train" else [])
    return tmp_path


def with_value(section, key, value):
    params = copy.deepcopy(PARAMS)
    params[section][key] = value
    return params


@pytest.mark.parametrize("change", ["a batch", "the test batch", "stats", "code", "device type", "train param",
                                    "model param"])
def test_the_fingerprint_changes_with_data_stats_code_device_and_recipe(run_folder, change):
    before = fingerprint(PARAMS, CPU)
    params, device = PARAMS, CPU
    if change == "a batch":
        (run_folder / "data/cifar-10-batches-py/data_batch_1").write_bytes(b"batch 1")
    elif change == "the test batch":
        (run_folder / "data/cifar-10-batches-py/test_batch").write_bytes(b"test batch!")
    elif change == "stats":
        (run_folder / "data/stats.json").write_text('{"mean": [0.5, 0.5, 0.4], "std": [0.25, 0.25, 0.25]}')
    elif change == "code":
        (run_folder / "training.py").write_text("# training.py, edited\n")
    elif change == "device type":
        device = torch.device("cuda")  # the RNG states a checkpoint holds are the device's
    elif change == "train param":
        params = with_value("train", "max_lr", 0.02)
    else:
        params = with_value("model", "widths", [32, 64, 128, 256])
    assert fingerprint(params, device) != before


def test_the_fingerprint_ignores_the_system_section_and_is_stable(run_folder):
    before = fingerprint(PARAMS, CPU)
    assert fingerprint(copy.deepcopy(PARAMS), CPU) == before
    for key, value in [("master_port", 29999), ("master_addr", "10.0.0.1"), ("compile", True)]:
        assert fingerprint(with_value("system", key, value), CPU) == before, key
    assert fingerprint(PARAMS, torch.device("cuda", 1)) == fingerprint(PARAMS, torch.device("cuda", 0))


def test_the_code_is_the_train_stages_modules_whichever_are_loaded():
    """Read from the imports, not from what this process happens to have loaded: a run resumed in another
    process (or in this one, after importing other stages) finds the same code."""
    importlib.import_module("stages.compare")  # loaded here, but not the train stage's code

    names = {path.name for path in resume.code_of("train")}
    assert {"__init__.py", "train.py", "training.py", "resume.py", "imports.py", "model.py"} <= names
    assert not names & {"compare.py", "sweep.py", "bench.py", "evaluate.py", "plot.py"}
    assert all(path.parent == REPO / "stages" for path in resume.code_of("train"))
