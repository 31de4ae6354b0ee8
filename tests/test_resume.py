"""The resumable checkpoint's fingerprint: what makes a checkpoint belong to a run, and what does not."""
import copy
import importlib
from pathlib import Path

import pytest
import torch
import yaml
from recipes import changed, recipe

from cifar import resume
from cifar.resume import fingerprint

REPO = Path(__file__).resolve().parent.parent
PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())
MODEL, RECIPE = PARAMS["model"], recipe(precision="fp32")
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
    monkeypatch.setattr(resume, "code_of", lambda script: code if script == "stages/train.py" else [])
    return tmp_path


@pytest.mark.parametrize("change", ["a batch", "the test batch", "stats", "code", "device type", "train param",
                                    "model param", "resolved precision"])
def test_the_fingerprint_changes_with_data_stats_code_device_and_recipe(run_folder, change):
    before = fingerprint(MODEL, RECIPE, CPU)
    model, train, device = MODEL, RECIPE, CPU
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
        train = changed(RECIPE, max_lr=0.02)
    elif change == "model param":
        model = {**MODEL, "widths": [32, 64, 128, 256]}
    else:  # `auto` resolved to bf16 on one GPU and fp16 on another (compute capability 7.x)
        before, train = fingerprint(MODEL, changed(RECIPE, precision="bf16"), CPU), changed(RECIPE, precision="fp16")
    assert fingerprint(model, train, device) != before


def test_the_fingerprint_ignores_the_system_section_and_is_stable(run_folder):
    """The system section never reaches it (the train stage passes the model and train sections alone), and
    the GPU's index does not count, only the device type."""
    before = fingerprint(MODEL, RECIPE, CPU)
    assert fingerprint(copy.deepcopy(MODEL), recipe(precision="fp32"), CPU) == before
    assert fingerprint(MODEL, RECIPE, torch.device("cuda", 1)) == fingerprint(MODEL, RECIPE, torch.device("cuda", 0))


def test_the_fingerprint_refuses_an_unresolved_precision(run_folder):
    with pytest.raises(ValueError, match="resolve the recipe's precision"):
        fingerprint(MODEL, changed(RECIPE, precision="auto"), CPU)


def test_the_train_stage_fingerprints_the_precision_its_device_resolves(monkeypatch, tmp_path):
    """A checkpoint written in bf16 under `auto` (a compute-capability-8 GPU) must not resume where `auto`
    means fp16 (7.x): the train stage hands fit() the recipe with its precision resolved, and fit()
    fingerprints that recipe."""
    from stages import train as train_stage

    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    (tmp_path / "data").mkdir()
    (tmp_path / "data/stats.json").write_text('{"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}')
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(train_stage, "read_classes", lambda folder: ["a", "b"])
    handed = []
    monkeypatch.setattr(train_stage, "fit", lambda model_params, recipe, *rest: handed.append(recipe))
    for native in ["bf16", "fp16"]:  # the first native precision of each GPU generation
        monkeypatch.setattr(train_stage, "resolve_precision", lambda asked, device, native=native: native)
        train_stage.main([])
    assert [r.precision for r in handed] == ["bf16", "fp16"]


def test_the_code_is_the_train_stages_modules_whichever_are_loaded():
    """Read from the imports, not from what this process happens to have loaded: a run resumed in another
    process (or in this one, after importing other stages) finds the same code."""
    importlib.import_module("tools.compare")  # loaded here, but not the train stage's code

    code = {path.relative_to(REPO).as_posix() for path in resume.code_of("stages/train.py")}
    assert {"stages/train.py", "cifar/__init__.py", "cifar/training.py", "cifar/fit.py", "cifar/resume.py",
            "cifar/imports.py", "cifar/model.py"} <= code
    assert not code & {"tools/compare.py", "tools/sweep.py", "tools/bench.py", "stages/evaluate.py",
                       "cifar/figures.py"}


def test_the_fingerprint_ignores_the_order_of_the_model_keys_and_needs_a_resolved_precision(run_folder):
    """params.yaml's keys may come in any order (an edit, `dvc exp run -S`): the same values, the same run."""
    reordered = dict(reversed(list(MODEL.items())))
    assert list(reordered) != list(MODEL) and fingerprint(reordered, RECIPE, CPU) == fingerprint(MODEL, RECIPE, CPU)
    with pytest.raises(ValueError, match=r"^fingerprint: resolve the recipe's precision for the device first$"):
        fingerprint(MODEL, recipe(precision="auto"), CPU)
