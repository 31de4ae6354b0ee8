"""The training engine: the OneCycle schedule's shape, and a few epochs that learn, reproducibly."""
import pytest
import torch
from conftest import build_archive, synthetic_batches

from stages.augment import Normalizer, reflect_pad
from stages.cifar10 import channel_stats, download, load_split
from stages.model import ResNet
from stages.training import (
    bf16_supported,
    evaluate,
    make_optimizer,
    make_scheduler,
    prepare_model,
    resolve_precision,
    steps_per_epoch,
    train_epoch,
)

TRAIN = {"epochs": 4, "batch_size": 50, "max_lr": 0.01, "warmup_fraction": 0.3, "weight_decay": 1e-4,
         "grad_clip": 0.1, "seed": 0, "precision": "fp32", "compile": False}


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
    loss, acc, _ = evaluate(model, test_images, test_labels, normalize, 100, "fp32")
    return [(epoch_loss.item(), epoch_acc.item()) for epoch_loss, epoch_acc in history], loss.item(), acc.item()


def test_a_tiny_model_learns_the_synthetic_classes_reproducibly(synthetic):
    history, loss, acc = train_tiny(synthetic, seed=0)
    assert acc > 0.6, f"test accuracy {acc} after {TRAIN['epochs']} epochs (chance is 0.1)"
    assert history[-1][0] < history[0][0]
    assert train_tiny(synthetic, seed=0) == (history, loss, acc)  # same seed on CPU: the same numbers
    assert train_tiny(synthetic, seed=1)[0] != history


def test_bf16_autocasts_the_forward_pass_and_keeps_fp32_weights_and_batchnorm_statistics(synthetic):
    (images, labels), _ = synthetic
    model = ResNet([1, 1], [8, 16]).to(memory_format=torch.channels_last)
    train = {**TRAIN, "precision": "bf16", "epochs": 1}
    optimizer = make_optimizer(model, train)
    scheduler = make_scheduler(optimizer, train, steps_per_epoch=2)
    logits_dtypes = []
    model.head.register_forward_hook(lambda module, inputs, output: logits_dtypes.append(output.dtype))
    train_epoch(model, optimizer, scheduler, reflect_pad(images[:100], 4), labels[:100],
                Normalizer(*channel_stats(images), "cpu"), train, torch.Generator().manual_seed(0))
    assert logits_dtypes == [torch.bfloat16, torch.bfloat16]
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(b.dtype == torch.float32 for name, b in model.named_buffers() if "running" in name)
    assert all(s.dtype == torch.float32 for state in optimizer.state.values() for s in state.values() if s.ndim)


def test_auto_precision_is_bf16_only_where_the_device_supports_it():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == ("bf16" if bf16_supported(cpu) else "fp32")
    assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"


def test_compiled_step_model_shares_the_saved_model_parameters():
    model, step_model = prepare_model(ResNet([1], [8]), torch.device("cpu"), compile=True)
    assert step_model is not model and step_model._orig_mod is model
    assert model.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert prepare_model(ResNet([1], [8]), torch.device("cpu"), compile=False)[1].__class__ is ResNet
