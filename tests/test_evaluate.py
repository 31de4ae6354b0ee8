"""The evaluate stage's figures against the library's scoring of the saved model: with test-time
augmentation, the reported accuracy and loss are score(..., tta=evaluate.tta)'s, and the per-class accuracy
and the confusion records come from the same TTA predictions; without_tta from the plain ones. The model it
scores is tools.predict's."""
import pytest
import torch
from dvcrepo import copy_repo, read_json, set_params

from cifar.augment import Normalizer
from cifar.data import load_split
from cifar.model import load_model
from cifar.precision import evaluation_precision
from cifar.runtime import TorchModel
from cifar.training import per_class_accuracy, score
from stages import evaluate


@pytest.mark.parametrize("tta", ["flip", "flip_translate"])  # each mode its own: not any TTA, nor a fixed one
def test_the_reported_figures_are_those_of_the_configured_tta(trained_repo, tmp_path, stage, tta):
    repo = copy_repo(trained_repo.repo, tmp_path / "repo")
    set_params(repo, evaluate__tta=tta, system__device="cpu")
    ran = stage(repo, "evaluate")
    assert ran.code == 0, ran.output
    # the saved model scored here as the stage scores it, in the precision it trained in
    model, checkpoint = load_model(repo / "models/model.pt")
    images, labels = load_split(repo / "data/cifar-10-batches-py", "test")
    normalize = Normalizer(checkpoint["stats"]["mean"], checkpoint["stats"]["std"], torch.device("cpu"))
    model = model.to(memory_format=torch.channels_last)
    precision = evaluation_precision(checkpoint["precision"], torch.device("cpu"))
    loss, accuracy, predictions = score(model, images, labels, normalize, 1000, precision, tta)
    plain_loss, plain_accuracy, plain_predictions = score(model, images, labels, normalize, 1000, precision)
    assert loss != plain_loss  # else this test could not tell them apart
    if tta == "flip_translate":  # 6 views: its predictions differ from the plain ones on a few images
        assert not torch.equal(predictions, plain_predictions)

    metrics = read_json(repo, "metrics/evaluate/metrics.json")
    assert metrics == {"accuracy": pytest.approx(accuracy.item(), abs=1e-7), "loss": pytest.approx(loss.item(), 1e-6),
                       "without_tta": {"accuracy": pytest.approx(plain_accuracy.item(), abs=1e-7),
                                       "loss": pytest.approx(plain_loss.item(), rel=1e-6)}}
    classes = checkpoint["classes"]
    per_class = read_json(repo, "metrics/evaluate/per_class.json")
    assert per_class == [{"class": name, "accuracy": pytest.approx(value)} for name, value in
                         zip(classes, per_class_accuracy(labels, predictions, len(classes)))]
    confusion = read_json(repo, "metrics/evaluate/confusion.json")
    assert confusion == [{"actual": classes[a], "predicted": classes[p]}
                         for a, p in zip(labels.tolist(), predictions.tolist())]


def test_evaluate_scores_the_model_predict_runs(trained_repo, tmp_path, stage, monkeypatch):
    """evaluate loads models/model.pt as cifar.runtime.TorchModel, as tools.predict does: the classes of that
    model's logits (predict's, on the test images) are evaluate's confusion records, image by image."""
    repo = copy_repo(trained_repo.repo, tmp_path / "repo")
    made = []

    class Recorded(TorchModel):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(evaluate, "TorchModel", Recorded)
    ran = stage(repo, "evaluate")
    assert ran.code == 0, ran.output
    assert len(made) == 1 and made[0].device == torch.device("cpu")
    images, _ = load_split(repo / "data/cifar-10-batches-py", "test")
    predicted = [made[0].classes[i] for i in made[0].logits(images).argmax(1).tolist()]
    assert predicted == [r["predicted"] for r in read_json(repo, "metrics/evaluate/confusion.json")]
