"""Stage export: models/model.pt as models/model.onnx (normalization in the graph, class names in its metadata),
checked against PyTorch on the whole test set; the check's numbers to metrics/export/metrics.json
(cifar/export.py)."""
from cifar.data import load_split
from cifar.export import ExportParams, export
from cifar.params import load_params
from cifar.workspace import BATCHES_DIR, EXPORT_METRICS_FILE, MODEL_FILE, ONNX_FILE, command


def main():
    params = load_params(ExportParams)["export"]
    images, labels = load_split(BATCHES_DIR, "test")
    metrics = export(MODEL_FILE, ONNX_FILE, EXPORT_METRICS_FILE, params, images, labels)
    print(f"wrote {ONNX_FILE} (opset {metrics['opset']}); against PyTorch on {metrics['images']} test images: largest "
          f"logit difference {metrics['max_logit_diff']:.3g}, top-1 agreement {metrics['agreement']:.4f}")


if __name__ == "__main__":
    command(main)
