"""Stage evaluate: the final model (rebuilt from models/model.pt) on the test set, with the test-time
augmentation of `evaluate.tta`.

Writes metrics/evaluate/metrics.json (test accuracy and loss with evaluate.tta, and under `without_tta` the
same without it, which is what the training's validation curves measure), metrics/evaluate/per_class.json
(accuracy per class, a bar plot) and metrics/evaluate/confusion.json (one {actual, predicted} record per test
image, for DVC's confusion template and the plot stage), both with evaluate.tta."""
import torch

from .augment import Normalizer
from .cifar10 import load_split
from .model import load_model
from .params import load_params
from .precision import evaluation_precision
from .training import pick_device, score
from .workspace import BATCHES_DIR, CONFUSION_FILE, MODEL_FILE, PER_CLASS_FILE, TEST_METRICS_FILE, run, write_json

BATCH_SIZE = 1000


def per_class_accuracy(labels, predictions, num_classes):
    hits = torch.bincount(labels[predictions == labels], minlength=num_classes).double()
    return (hits / torch.bincount(labels, minlength=num_classes).clamp(min=1)).tolist()


def main():
    tta = load_params()["evaluate"]["tta"]
    model, checkpoint = load_model(MODEL_FILE)
    stats, classes = checkpoint["stats"], checkpoint["classes"]
    images, labels = load_split(BATCHES_DIR, "test")
    device = pick_device()
    precision = evaluation_precision(checkpoint["precision"], device)
    model = model.to(device, memory_format=torch.channels_last)
    images, labels, normalize = images.to(device), labels.to(device), Normalizer(stats["mean"], stats["std"], device)
    plain = score(model, images, labels, normalize, BATCH_SIZE, precision)
    loss, accuracy, predictions = plain if tta == "none" else score(model, images, labels, normalize, BATCH_SIZE,
                                                                     precision, tta)
    predictions, labels = predictions.cpu(), labels.cpu()
    write_json(TEST_METRICS_FILE, {"accuracy": accuracy.item(), "loss": loss.item(),
                                   "without_tta": {"accuracy": plain[1].item(), "loss": plain[0].item()}})
    write_json(PER_CLASS_FILE, [{"class": name, "accuracy": value}
                                for name, value in zip(classes, per_class_accuracy(labels, predictions, len(classes)))])
    write_json(CONFUSION_FILE, [{"actual": classes[a], "predicted": classes[p]}
                                for a, p in zip(labels.tolist(), predictions.tolist())])
    print(f"test accuracy {accuracy.item():.4f}, loss {loss.item():.4f} on {len(labels)} images"
          + ("" if tta == "none" else f" with {tta} test-time augmentation (without: {plain[1].item():.4f})"))


if __name__ == "__main__":
    run(main)
