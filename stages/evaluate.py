"""Stage evaluate: the final model (rebuilt from models/model.pt alone) on the test set.

Writes metrics/evaluate/metrics.json (test accuracy and loss), metrics/evaluate/per_class.json (accuracy per
class, a bar plot) and metrics/evaluate/confusion.json (one {actual, predicted} record per test image, for
DVC's confusion template and the plot stage)."""
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
    load_params()  # checked like every stage's, though evaluate reads no key: model.pt says it all
    model, checkpoint = load_model(MODEL_FILE)
    stats, classes = checkpoint["stats"], checkpoint["classes"]
    images, labels = load_split(BATCHES_DIR, "test")
    device = pick_device()
    precision = evaluation_precision(checkpoint["precision"], device)
    model = model.to(device, memory_format=torch.channels_last)
    loss, accuracy, predictions = score(model, images.to(device), labels.to(device),
                                        Normalizer(stats["mean"], stats["std"], device), BATCH_SIZE, precision)
    predictions = predictions.cpu()
    write_json(TEST_METRICS_FILE, {"accuracy": accuracy.item(), "loss": loss.item()})
    write_json(PER_CLASS_FILE, [{"class": name, "accuracy": value}
                                for name, value in zip(classes, per_class_accuracy(labels, predictions, len(classes)))])
    write_json(CONFUSION_FILE, [{"actual": classes[a], "predicted": classes[p]}
                                for a, p in zip(labels.tolist(), predictions.tolist())])
    print(f"test accuracy {accuracy.item():.4f}, loss {loss.item():.4f} on {len(labels)} images")


if __name__ == "__main__":
    run(main)
