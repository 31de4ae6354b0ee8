"""The resumable checkpoint: its fingerprint (what makes a checkpoint belong to a run, and what does not), the
versions of torch that wrote it, where it lives (in a queued run, outside DVC's temporary copy), and the RNG
state of the one GPU a run uses."""
import copy
import importlib
from pathlib import Path

import pytest
import torch
import yaml
from recipes import changed, recipe

from cifar import resume
from cifar.distributed import Context
from cifar.model import ResNet
from cifar.resume import Progress, checkpoint_path, fingerprint, load_checkpoint, save_checkpoint
from cifar.training import make_trainer

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
    monkeypatch.setattr(resume, "ROOT", tmp_path)
    return tmp_path


@pytest.mark.parametrize("change", ["a batch", "the test batch", "stats", "code", "device type", "train param",
                                    "model param", "resolved precision", "torch", "cuda", "cudnn"])
def test_the_fingerprint_changes_with_data_stats_code_device_recipe_and_versions(run_folder, change, monkeypatch):
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
    elif change == "resolved precision":  # `auto` resolved to bf16 on one GPU and fp16 on another (capability 7.x)
        before, train = fingerprint(MODEL, changed(RECIPE, precision="bf16"), CPU), changed(RECIPE, precision="fp16")
    else:  # another version of one library whose kernels compute the run (a node installed apart)
        this = resume.versions()
        monkeypatch.setattr(resume, "versions", lambda: {**this, change: "another"})
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
    monkeypatch.setattr(train_stage, "split_data", lambda recipe, num_classes: None)
    handed = []
    monkeypatch.setattr(train_stage, "fit", lambda model_params, recipe, *rest, split: handed.append(recipe))
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


def test_the_fingerprint_names_each_data_and_code_file_by_its_path_in_the_repository(run_folder):
    found = fingerprint(MODEL, RECIPE, CPU)
    assert set(found) == {"params", "device", "data", "code", "versions"} and found["device"] == "cpu"
    assert found["versions"] == resume.versions() == {"torch": torch.__version__, "cuda": torch.version.cuda,
                                                      "cudnn": torch.backends.cudnn.version()}
    assert set(found["data"]) == {"data/cifar-10-batches-py/data_batch_1", "data/cifar-10-batches-py/test_batch",
                                  "data/stats.json"}
    assert set(found["code"]) == {"train.py", "training.py"}


def tiny_trainer(device=CPU):
    torch.manual_seed(0)
    return make_trainer(ResNet([1, 1, 1, 1], [8, 16, 32, 64]), RECIPE, Context(device), False, 100)


def test_a_checkpoint_written_by_other_versions_of_torch_starts_afresh_naming_them(tmp_path, capsys):
    """Its fingerprint holds the versions too, and differs: the message says which versions, not 'other
    params, data or code'."""
    path, run = tmp_path / "checkpoint.pt", {"params": "p", "versions": resume.versions()}
    save_checkpoint(path, run, Progress(3, finished=1), tiny_trainer())
    assert load_checkpoint(path, run, tiny_trainer()).finished == 1  # the same versions: it resumes
    state = torch.load(path, weights_only=True)
    state["versions"] = {"torch": "2.3.1+cu121", "cuda": "12.1", "cudnn": 8902}
    state["fingerprint"] = {**run, "versions": state["versions"]}
    torch.save(state, path)
    capsys.readouterr()
    assert load_checkpoint(path, run, tiny_trainer()) is None
    this = resume.versions()
    assert capsys.readouterr().out == (
        f"{path}: written by torch 2.3.1+cu121 (CUDA 12.1, cuDNN 8902), but this is torch {torch.__version__} "
        f"(CUDA {this['cuda']}, cuDNN {this['cudnn']}); starting afresh\n")


def test_a_queued_run_keeps_its_checkpoint_in_the_original_repository_named_by_its_fingerprint(tmp_path, monkeypatch):
    """DVC sets DVC_ROOT to the original repository for a run in its queue's temporary copy (and to the
    workspace itself for `dvc repro`)."""
    workspace, copy = tmp_path / "repo", tmp_path / "repo/.dvc/tmp/exps/tmp1234"
    copy.mkdir(parents=True)
    run, other = {"params": "a", "code": {"x.py": "1"}}, {"params": "b", "code": {"x.py": "1"}}
    monkeypatch.chdir(workspace)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    assert checkpoint_path(run) == resume.CHECKPOINT_FILE  # python -m stages.train
    monkeypatch.setenv("DVC_ROOT", str(workspace))
    assert checkpoint_path(run) == resume.CHECKPOINT_FILE  # dvc repro, dvc exp run
    monkeypatch.chdir(copy)
    queued = checkpoint_path(run)
    assert queued.parent == workspace / ".dvc/tmp/checkpoints" and queued.suffix == ".pt"
    assert checkpoint_path(dict(reversed(list(run.items())))) == queued != checkpoint_path(other)
    assert Progress(3, finished=1).stop_message(queued) == (
        f"after epoch 1/3; {queued} holds it: queue the same experiment again to resume")
    assert Progress(3, finished=1).stop_message(resume.CHECKPOINT_FILE) == (
        "after epoch 1/3; models/checkpoint.pt holds it: rerun to resume")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_the_checkpoint_holds_and_restores_the_rng_of_the_run_s_gpu_alone(tmp_path):
    """Not every visible GPU's: restoring all of them failed (IndexError) where fewer were visible than when
    the checkpoint was saved, and a rank uses its own GPU only."""
    gpu = torch.device("cuda", torch.cuda.device_count() - 1)
    torch.cuda.set_device(gpu)
    trainer = tiny_trainer(gpu)
    torch.cuda.manual_seed(7)
    saved = torch.cuda.get_rng_state(gpu)
    save_checkpoint(tmp_path / "checkpoint.pt", "run", Progress(3, finished=1), trainer)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert torch.equal(state["rng"]["cuda"], saved)  # one state, not a list of every GPU's
    torch.cuda.manual_seed(8)
    assert load_checkpoint(tmp_path / "checkpoint.pt", "run", tiny_trainer(gpu)).finished == 1
    assert torch.equal(torch.cuda.get_rng_state(gpu), saved)
