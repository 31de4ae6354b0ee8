"""models/model.pt as models/model.onnx, checked against PyTorch.

The ONNX graph takes raw RGB pixel values 0-255 as float32, [N, 3, 32, 32] (N free): the training set's
normalization is its first two operations, the very ones the PyTorch side computes (augment.Normalizer), so a
user feeds decoded pixels and nothing else. The class names, the mean and std, the input's description and the
opset are in the file's metadata_props.

The check runs the exported file in onnxruntime and model.pt in PyTorch, both on the CPU in fp32, on the whole
test set: the largest absolute logit difference and the fraction of images whose top-1 class agrees must meet
export.max_logit_diff and export.min_agreement, or the stage fails and writes nothing."""
import json

import torch
from pydantic import model_validator
from torch import nn

from .augment import Normalizer
from .params import Section, integer, number
from .runtime import CLASSES_KEY, OnnxModel, TorchModel
from .workspace import UserError, atomic_path, write_json

INPUT = "images"
INPUT_DESCRIPTION = "float32 [N, 3, 32, 32]: RGB pixel values 0-255, unnormalized"
OLDEST_OPSET = 18  # torch.onnx builds the graph in opset 18 (torchlib's), then converts it to the one asked for


def newest_opset():
    """The newest opset the exporter writes: it converts with onnx's version converter, which knows the opsets up to
    the installed onnx's (a newer one fails inside torch.onnx.export, which then writes opset 18 all the same)."""
    import onnx  # slow to import: only the export stage needs it

    return onnx.defs.onnx_opset_version()


class ExportParams(Section):
    """The `export` section: the ONNX opset and the check's tolerances."""
    section = "export"
    opset: integer(OLDEST_OPSET)
    max_logit_diff: number(ge=0)
    min_agreement: number(ge=0, le=1)

    @model_validator(mode="after")
    def _writable_opset(self):
        if self.opset > (newest := newest_opset()):
            raise ValueError(f"export.opset = {self.opset} must be an opset the installed exporter writes: "
                             f"{OLDEST_OPSET} to {newest}")
        return self


class Normalized(nn.Module):
    """The model behind its normalization: raw 0-255 pixels in, as the ONNX file takes them."""

    def __init__(self, model, mean, std):
        super().__init__()
        self.model = model
        normalizer = Normalizer(mean, std, torch.device("cpu"))  # its scale and shift: both sides compute the same
        self.register_buffer("scale", normalizer.scale)
        self.register_buffer("shift", normalizer.shift)

    def forward(self, images):
        return self.model(images * self.scale + self.shift)


def to_onnx(model, checkpoint, opset, path):
    """Write the model with its normalization to `path` as ONNX (dynamic batch dimension, class names and
    normalization in metadata_props); returns the opset the file declares."""
    import onnx

    stats = checkpoint["stats"]
    wrapped = Normalized(model.to("cpu", memory_format=torch.contiguous_format), stats["mean"], stats["std"]).eval()
    example = torch.zeros(2, 3, 32, 32)
    try:
        program = torch.onnx.export(wrapped, (example,), input_names=[INPUT], output_names=["logits"],
                                    dynamic_shapes={"images": {0: torch.export.Dim("batch")}}, opset_version=opset,
                                    dynamo=True, verbose=False)
    except Exception as e:  # the exporter raises many types for an opset it cannot write
        raise UserError(f"export.opset = {opset}: torch.onnx.export failed ({type(e).__name__}: {e})".splitlines()[0])
    proto = program.model_proto
    written = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if written != opset:  # the exporter logs a failed conversion and keeps its own opset
        raise UserError(f"export.opset = {opset}: torch.onnx.export wrote opset {written} instead")
    metadata = {CLASSES_KEY: json.dumps(checkpoint["classes"]), "mean": json.dumps(stats["mean"]),
                "std": json.dumps(stats["std"]), "input": INPUT_DESCRIPTION, "opset": str(written)}
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(path))
    return written


def compare(reference, exported, images, labels):
    """The exported model against the reference on the same images: largest absolute logit difference, the
    fraction of identical top-1 predictions, and the exported model's accuracy."""
    expected, found = reference.logits(images), exported.logits(images)
    return {"max_logit_diff": (expected - found).abs().max().item(),
            "agreement": (expected.argmax(1) == found.argmax(1)).double().mean().item(),
            "onnx_accuracy": (found.argmax(1) == labels).double().mean().item(), "images": len(labels)}


def export(model_path, onnx_path, metrics_path, params, images, labels):
    """Export model_path to onnx_path, check it on the test images and write the check's metrics. A failed
    check is an error, and then neither file exists (an older one is removed first: it would describe
    another model)."""
    for path in (onnx_path, metrics_path):
        path.unlink(missing_ok=True)
    reference = TorchModel(model_path, torch.device("cpu"), precision="fp32")
    with atomic_path(onnx_path) as tmp:
        opset = to_onnx(reference.model, reference.checkpoint, params["opset"], tmp)
        result = compare(reference, OnnxModel(tmp), images, labels)
        if result["max_logit_diff"] > params["max_logit_diff"] or result["agreement"] < params["min_agreement"]:
            raise UserError(f"{onnx_path}: the ONNX model disagrees with PyTorch on the test set: largest logit "
                            f"difference {result['max_logit_diff']:.3g} (export.max_logit_diff = "
                            f"{params['max_logit_diff']}), top-1 agreement {result['agreement']:.4f} "
                            f"(export.min_agreement = {params['min_agreement']}); nothing written")
    metrics = {"opset": opset, **result, "max_logit_diff_allowed": params["max_logit_diff"],
               "min_agreement_allowed": params["min_agreement"]}
    write_json(metrics_path, metrics)
    return metrics
