"""Stage evaluate: the final model (models/model.pt, loaded as tools.predict loads it: cifar.runtime.TorchModel)
on the test set, with the test-time augmentation of `evaluate.tta`, on the device `system.device` chooses for
inference (cifar.devices.inference_device: no claim, no wait).

Writes metrics/evaluate/metrics.json (test accuracy and loss with evaluate.tta, and under `without_tta` the
same without it), metrics/evaluate/per_class.json (accuracy per class, a bar plot) and
metrics/evaluate/confusion.json (one {actual, predicted} record per test image, for DVC's confusion template
and the plot stage), both with evaluate.tta."""
from cifar.augment import EvaluateParams
from cifar.data import load_split
from cifar.devices import System, inference_device
from cifar.params import load_params
from cifar.runtime import TorchModel
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
    device = inference_device(params["system"]["device"])
    model = TorchModel(MODEL_FILE, device)  # as tools.predict loads it, so predict's classes are these
    images, labels = load_split(BATCHES_DIR, "test")
    images, labels, classes = images.to(device), labels.to(device), model.classes
    plain = score(model.model, images, labels, model.normalize, BATCH_SIZE, model.precision)
    loss, accuracy, predictions = plain if tta == "none" else score(model.model, images, labels, model.normalize,
                                                                     BATCH_SIZE, model.precision, tta)
    predictions, labels = predictions.cpu(), labels.cpu()
    write_json(TEST_METRICS_FILE, {"accuracy": accuracy.item(), "loss": loss.item(),
                                   "without_tta": {"accuracy": plain[1].item(), "loss": plain[0].item()}})
    write_json(PER_CLASS_FILE, [{"class": name, "accuracy": value}
                                for name, value in zip(classes, per_class_accuracy(labels, predictions, len(classes)))])
    write_json(CONFUSION_FILE, [{"actual": classes[a], "predicted": classes[p]}
                                for a, p in zip(labels.tolist(), predictions.tolist())])
    print(f"test accuracy {accuracy.item():.4f}, loss {loss.item():.4f} on {len(labels)} images on {device}"
          + ("" if tta == "none" else f" with {tta} test-time augmentation (without: {plain[1].item():.4f})"))


if __name__ == "__main__":
    command(main)
