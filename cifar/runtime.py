"""The trained model as a function of images: uint8 RGB [N, 3, 32, 32] in, fp32 logits [N, classes] out, from
models/model.pt through PyTorch or from models/model.onnx through onnxruntime. What tools.predict runs, what
the evaluate stage scores, and the two sides the export stage's check compares. Each side normalizes as the
model file says: model.pt holds the training set's mean and std, model.onnx has them in its graph."""
import json
from pathlib import Path

import torch

from .augment import Normalizer
from .model import load_model
from .precision import autocast, evaluation_precision
from .workspace import UserError

BATCH_SIZE = 500
CLASSES_KEY = "classes"  # the ONNX file's metadata_props entry holding the class names (a JSON list)


class TorchModel:
    """model.pt in PyTorch on `device`, in evaluation_precision for the device (or `precision`). The evaluate
    stage scores its model, normalize and precision, so tools.predict's classes are evaluate's."""

    def __init__(self, path, device, precision=None):
        model, checkpoint = load_model(path)
        self.model, self.checkpoint, self.classes, self.device = model, checkpoint, checkpoint["classes"], device
        self.precision = precision or evaluation_precision(checkpoint["precision"], device)
        self.normalize = Normalizer(checkpoint["stats"]["mean"], checkpoint["stats"]["std"], device)
        self.model.to(device, memory_format=torch.channels_last).eval()

    @torch.no_grad()
    def logits(self, images):
        out = []
        for batch in images.split(BATCH_SIZE):
            with autocast(self.device, self.precision):
                out.append(self.model(self.normalize(batch.to(self.device))).float().cpu())
        return torch.cat(out)


class OnnxModel:
    """model.onnx in onnxruntime: on the CPU, or on the GPU where `device` is one and onnxruntime has CUDA."""

    def __init__(self, path, device=torch.device("cpu")):
        import onnxruntime  # slow to import: only an ONNX file needs it

        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: no such ONNX model; run the export stage first (dvc repro export)")
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
        try:
            self.session = onnxruntime.InferenceSession(str(path), providers=providers)
            self.classes = json.loads(self.session.get_modelmeta().custom_metadata_map[CLASSES_KEY])
        except Exception as e:  # onnxruntime raises its own exception types for a damaged or foreign file
            raise UserError(f"{path}: not an ONNX model of this project ({type(e).__name__}: {e})".splitlines()[0])
        self.input = self.session.get_inputs()[0].name

    def logits(self, images):
        # the graph's input is raw 0-255 RGB as float32 (cifar/export.py)
        return torch.cat([torch.from_numpy(self.session.run(None, {self.input: batch.float().numpy()})[0])
                          for batch in images.cpu().split(BATCH_SIZE)])


def open_model(path, device):
    """TorchModel or OnnxModel, by the file's suffix."""
    path = Path(path)
    if path.suffix == ".pt":
        return TorchModel(path, device)
    if path.suffix == ".onnx":
        return OnnxModel(path, device)
    raise UserError(f"{path}: unknown model file type; use a .pt (dvc repro train) or .onnx (dvc repro export) file")
