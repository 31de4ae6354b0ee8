"""The training engine: the OneCycle schedule's shape, and a few epochs that learn, reproducibly."""
import pytest
import torch
from conftest import build_archive, synthetic_batches

from stages.augment import Normalizer, reflect_pad
from stages.cifar10 import channel_stats, download, load_split
from stages.model import ResNet
from stages.training import evaluate, make_optimizer, make_scheduler, steps_per_epoch, train_epoch

TRAIN = {"epochs": 4, "batch_size": 50, "max_lr": 0.01, "warmup_fraction": 0.3, "weight_decay": 1e-4,
         "grad_clip": 0.1, "seed": 0}


def test_one_cycle_warms_up_to_max_lr_at_30_percent_then_anneals_to_near_zero():
    train = {**TRAIN, "epochs": 10}
    optimizer = make_optimizer(torch.nn.Linear(2, 2), train)
    scheduler = make_scheduler(optimizer, train, steps_per_epoch=100)
    lrs = []
    for _ in range(1000):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    peak = max(range(len(lrs)), key=lrs.__getitem__)
    assert peak == pytest.approx(300, abs=1)
    assert lrs[peak] == pytest.approx(0.01)
    assert lrs[0] == pytest.approx(0.01 / 25)  # OneCycle's default start: max_lr / 25
    assert lrs[-1] < 1e-6
    assert all(a <= b for a, b in zip(lrs[:peak], lrs[1:peak + 1]))  # rises, then falls
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1:]))


def test_steps_per_epoch_keeps_the_last_smaller_batch():
    assert steps_per_epoch(50000, 400) == 125 and steps_per_epoch(1001, 100) == 11


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synthetic")
    md5 = build_archive(folder / "a.tar.gz", synthetic_batches())
    batches = download(str(folder / "a.tar.gz"), md5, folder / "data")
    return load_split(batches, "train"), load_split(batches, "test")


def train_tiny(synthetic, seed):
    (train_images, train_labels), (test_images, test_labels) = synthetic
    torch.manual_seed(seed)
    model = ResNet([1, 1, 1, 1], [8, 16, 32, 64]).to(memory_format=torch.channels_last)
    train = {**TRAIN, "seed": seed}
    optimizer = make_optimizer(model, train)
    scheduler = make_scheduler(optimizer, train, steps_per_epoch(len(train_labels), train["batch_size"]))
    normalize = Normalizer(*channel_stats(train_images), "cpu")
    generator = torch.Generator().manual_seed(seed)
    padded = reflect_pad(train_images, 4)
    history = [train_epoch(model, optimizer, scheduler, padded, train_labels, normalize, train, generator)
               for _ in range(train["epochs"])]
    loss, acc, _ = evaluate(model, test_images, test_labels, normalize, 100)
    return [(l.item(), a.item()) for l, a in history], loss.item(), acc.item()


def test_a_tiny_model_learns_the_synthetic_classes_reproducibly(synthetic):
    history, loss, acc = train_tiny(synthetic, seed=0)
    assert acc > 0.6, f"test accuracy {acc} after {TRAIN['epochs']} epochs (chance is 0.1)"
    assert history[-1][0] < history[0][0]
    assert train_tiny(synthetic, seed=0) == (history, loss, acc)  # same seed on CPU: the same numbers
    assert train_tiny(synthetic, seed=1)[0] != history
