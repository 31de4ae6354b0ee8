"""Stage evaluate: the final model (rebuilt from models/model.pt) on the test set, with the test-time
augmentation of `evaluate.tta`, on the device `system.device` chooses (as train's).

Writes metrics/evaluate/metrics.json (test accuracy and loss with evaluate.tta, and under `without_tta` the
same without it), metrics/evaluate/per_class.json (accuracy per class, a bar plot) and
metrics/evaluate/confusion.json (one {actual, predicted} record per test image, for DVC's confusion template
and the plot stage), both with evaluate.tta."""
import torch

from cifar.augment import EvaluateParams, Normalizer
from cifar.data import load_split
from cifar.devices import System, choose_device
from cifar.model import load_model
from cifar.params import load_params
from cifar.precision import evaluation_precision
from cifar.training import per_class_accuracy, score
from cifar.workspace import (
    BATCHES_DIR,
    CONFUSION_FILE,
    MODEL_FILE,
    PER_CLASS_FILE,
    TEST_METRICS_FILE,
    command,
    write_json,
)

BATCH_SIZE = 1000


def main():
    params = load_params(EvaluateParams, System)
    tta = params["evaluate"]["tta"]
    model, checkpoint = load_model(MODEL_FILE)
    stats, classes = checkpoint["stats"], checkpoint["classes"]
    images, labels = load_split(BATCHES_DIR, "test")
    device, claim = choose_device(params["system"]["device"])
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
    print(f"test accuracy {accuracy.item():.4f}, loss {loss.item():.4f} on {len(labels)} images on {device}"
          + ("" if tta == "none" else f" with {tta} test-time augmentation (without: {plain[1].item():.4f})"))
    if claim:
        claim.release()


if __name__ == "__main__":
    command(main)
