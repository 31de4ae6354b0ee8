"""The export stage: models/model.onnx computes what models/model.pt computes (normalization included, any batch
size), carries the class names, and a file that disagrees with PyTorch beyond the tolerances fails the stage and
leaves nothing behind."""
import json
import shutil

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import yaml
from agreement import real_disagreements
from conftest import CLASSES, TEST_IMAGES
from dvcrepo import REPO, read_json

from cifar import export
from cifar.augment import Normalizer
from cifar.data import load_split
from cifar.model import ResNet, load_model
from cifar.runtime import OnnxModel
from cifar.workspace import UserError

PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())["export"]


def test_the_tiny_pipelines_onnx_file_agrees_with_pytorch_within_the_tolerances(trained_repo):
    metrics = read_json(trained_repo.repo, "metrics/export/metrics.json")
    assert metrics["images"] == TEST_IMAGES and metrics["opset"] == PARAMS["opset"]
    assert 0 <= metrics["max_logit_diff"] <= PARAMS["max_logit_diff"]
    assert metrics["agreement"] >= PARAMS["min_agreement"]
    # its classes are evaluate's, but where evaluate's precision (bf16 on a CPU that computes it natively) and
    # the check's tolerance put two classes too close to tell apart: not a count of flipped ties (agreement.py)
    images, labels = load_split(trained_repo.repo / "data/cifar-10-batches-py", "test")
    found = OnnxModel(trained_repo.repo / "models/model.onnx").logits(images).argmax(1)
    assert metrics["onnx_accuracy"] == (found == labels).double().mean().item()
    assert real_disagreements(trained_repo.repo, found, "fp32", slack=2 * PARAMS["max_logit_diff"]) == []


def test_the_onnx_file_takes_raw_pixels_of_any_batch_size_and_names_its_classes(trained_repo):
    """Checked here independently of the stage's own check: onnxruntime on 7 raw uint8 images as float, against
    PyTorch normalizing them as evaluate does."""
    repo = trained_repo.repo
    proto = onnx.load(repo / "models/model.onnx")
    metadata = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(metadata["classes"]) == CLASSES and metadata["opset"] == str(PARAMS["opset"])
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [PARAMS["opset"]]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a named, free batch dimension
    images, _ = load_split(repo / "data/cifar-10-batches-py", "test")
    model, checkpoint = load_model(repo / "models/model.pt")
    normalize = Normalizer(checkpoint["stats"]["mean"], checkpoint["stats"]["std"], "cpu")
    with torch.no_grad():
        expected = model.eval()(normalize(images[:7])).numpy()
    session = onnxruntime.InferenceSession(str(repo / "models/model.onnx"), providers=["CPUExecutionProvider"])
    (found,) = session.run(None, {"images": images[:7].numpy().astype(np.float32)})
    assert found.shape == (7, 10) and np.abs(found - expected).max() <= PARAMS["max_logit_diff"]


@pytest.fixture
def workdir(trained_repo, tmp_path):
    """The export stage's inputs, and the outputs of an earlier run, in a folder of their own."""
    for path in ["params.yaml", "data/cifar-10-batches-py", "models/model.pt", "models/model.onnx",
                 "metrics/export"]:
        copy = shutil.copytree if (trained_repo.repo / path).is_dir() else shutil.copy
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        copy(trained_repo.repo / path, tmp_path / path)
    return tmp_path


def test_an_export_that_disagrees_with_pytorch_fails_and_leaves_nothing(workdir, stage, monkeypatch):
    """A broken export (the normalization forgotten in the graph) is caught by the check: a one-line error naming
    the tolerance, and neither the ONNX file nor the metrics, nor a temporary file, remains."""
    monkeypatch.setattr(export.Normalized, "forward", lambda self, images: self.model(images / 255))
    ran = stage(workdir, "export")
    assert ran.code == 1 and ran.err.count("\n") == 1, ran.output
    assert ran.err.startswith("error: models/model.onnx: the ONNX model disagrees with PyTorch")
    assert "export.max_logit_diff = 0.001" in ran.err and "export.min_agreement = 0.999" in ran.err
    assert sorted(p.name for p in (workdir / "models").iterdir()) == ["model.pt"]
    assert not (workdir / "metrics/export/metrics.json").exists()
    monkeypatch.undo()  # the same folder with the real export: it passes
    ran = stage(workdir, "export")
    assert ran.code == 0 and "top-1 agreement 1.0000" in ran.out, ran.output
    assert (workdir / "models/model.onnx").is_file() and (workdir / "metrics/export/metrics.json").is_file()


def test_an_export_whose_top_1_classes_disagree_fails_on_agreement_alone(workdir, stage, monkeypatch):
    """Logits within any tolerance (export.max_logit_diff huge) but every class one off: below export.min_agreement
    the stage fails and writes nothing."""
    monkeypatch.setattr(export.Normalized, "forward",
                        lambda self, images: self.model(images * self.scale + self.shift).roll(1, dims=1))
    (workdir / "params.yaml").write_text(yaml.safe_dump({**yaml.safe_load((workdir / "params.yaml").read_text()),
                                                         "export": {**PARAMS, "max_logit_diff": 1e9}}))
    ran = stage(workdir, "export")
    assert ran.code == 1 and ran.err.count("\n") == 1, ran.output
    assert "top-1 agreement 0.0000 (export.min_agreement = 0.999); nothing written" in ran.err, ran.err
    assert sorted(p.name for p in (workdir / "models").iterdir()) == ["model.pt"]
    assert not (workdir / "metrics/export/metrics.json").exists()


def test_an_opset_the_exporter_cannot_write_is_a_one_line_error_before_any_work(workdir, stage, monkeypatch):
    """torch.onnx converts its opset-18 graph with onnx's version converter: past the installed onnx's newest
    opset the conversion failed (a traceback), and the stage wrote an opset-18 file all the same."""
    newest = onnx.defs.onnx_opset_version()
    monkeypatch.setattr(export, "to_onnx", lambda *args: pytest.fail("the export started"))
    before = {path: (workdir / path).read_bytes() for path in ["models/model.onnx", "metrics/export/metrics.json"]}
    for opset in [newest + 1, 99]:
        (workdir / "params.yaml").write_text(yaml.safe_dump({**yaml.safe_load((workdir / "params.yaml").read_text()),
                                                             "export": {**PARAMS, "opset": opset}}))
        ran = stage(workdir, "export")
        assert ran.code == 1 and ran.out == "" and ran.err == (
            f"error: params.yaml: export.opset = {opset} must be an opset the installed exporter writes: 18 to "
            f"{newest}\n"), ran.output
    assert {path: (workdir / path).read_bytes() for path in before} == before  # untouched


def test_the_newest_opset_in_the_range_is_written(workdir, stage):
    newest = onnx.defs.onnx_opset_version()
    (workdir / "params.yaml").write_text(yaml.safe_dump({**yaml.safe_load((workdir / "params.yaml").read_text()),
                                                         "export": {**PARAMS, "opset": newest}}))
    ran = stage(workdir, "export")
    assert ran.code == 0 and f"(opset {newest})" in ran.out, ran.output
    proto = onnx.load(workdir / "models/model.onnx")
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [newest]
    assert read_json(workdir, "metrics/export/metrics.json")["opset"] == newest


def test_an_opset_the_conversion_falls_back_from_is_an_error(tmp_path):
    """to_onnx itself: the exporter's silent fallback to its own opset-18 graph (a logged traceback) is caught."""
    checkpoint = {"stats": {"mean": [0.5] * 3, "std": [0.25] * 3}, "classes": CLASSES}
    with pytest.raises(UserError, match=r"^export.opset = 99: torch.onnx.export wrote opset 18 instead$"):
        export.to_onnx(ResNet([1, 1], [8, 16]).eval(), checkpoint, 99, tmp_path / "model.onnx")
