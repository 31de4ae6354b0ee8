"""The training engine: the OneCycle schedule's shape, and a few epochs that learn, reproducibly."""

import pytest
import torch
from conftest import build_archive, synthetic_batches
from recipes import changed, recipe

from cifar.data import channel_stats, download, load_split
from cifar.distributed import Context
from cifar.model import ResNet
from cifar.training import (
    Data,
    make_optimizer,
    make_scheduler,
    make_trainer,
    prepare_model,
    score,
    steps_per_epoch,
    train_epoch,
)

TRAIN = recipe(epochs=4, batch_size=50, precision="fp32")
CPU = Context(torch.device("cpu"))


def test_one_cycle_warms_up_to_max_lr_at_30_percent_then_anneals_to_near_zero():
    train = changed(TRAIN, epochs=10)
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


def train_tiny(synthetic, seed, epochs=TRAIN.epochs):
    train, test = synthetic
    torch.manual_seed(seed)
    recipe = changed(TRAIN, seed=seed, epochs=epochs)
    stats = dict(zip(["mean", "std"], channel_stats(train[0])))
    data = Data.on_device(train, test, stats, CPU.device)
    trainer = make_trainer(ResNet([1, 1, 1, 1], [8, 16, 32, 64]), recipe, CPU, False, len(data.labels))
    history = [train_epoch(trainer, data, recipe, CPU) for _ in range(recipe.epochs)]
    loss, acc, _ = score(trainer.model, data.monitor_images, data.monitor_labels, data.normalize, 100, "fp32")
    return [(epoch_loss.item(), epoch_acc.item()) for epoch_loss, epoch_acc in history], loss.item(), acc.item()


def test_a_tiny_model_learns_the_synthetic_classes_reproducibly(synthetic):
    history, loss, acc = train_tiny(synthetic, seed=0)
    assert acc > 0.6, f"test accuracy {acc} after {TRAIN.epochs} epochs (chance is 0.1)"
    assert history[-1][0] < history[0][0]
    assert train_tiny(synthetic, seed=0) == (history, loss, acc)  # same seed on CPU: the same numbers
    assert train_tiny(synthetic, seed=1, epochs=1)[0][0] != train_tiny(synthetic, seed=0, epochs=1)[0][0]


def test_bf16_autocasts_the_forward_pass_and_keeps_fp32_weights_and_batchnorm_statistics(synthetic):
    train, test = synthetic
    recipe = changed(TRAIN, precision="bf16", epochs=1)
    data = Data.on_device((train[0][:100], train[1][:100]), test, {"mean": [0.5] * 3, "std": [0.25] * 3}, "cpu")
    trainer = make_trainer(ResNet([1, 1], [8, 16]), recipe, CPU, False, len(data.labels))
    logits_dtypes = []
    trainer.model.head.register_forward_hook(lambda module, inputs, output: logits_dtypes.append(output.dtype))
    train_epoch(trainer, data, recipe, CPU)
    assert logits_dtypes == [torch.bfloat16, torch.bfloat16]
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    assert all(b.dtype == torch.float32 for name, b in trainer.model.named_buffers() if "running" in name)
    assert all(s.dtype == torch.float32 for state in trainer.optimizer.state.values() for s in state.values()
               if s.ndim)


def one_step(recipe, seed=0):
    """One training step of a tiny model on 20 random images: the trainer, after it."""
    torch.manual_seed(seed)
    images = torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (20,))
    data = Data.on_device((images, labels), (images, labels), {"mean": [0.5] * 3, "std": [0.25] * 3}, "cpu")
    trainer = make_trainer(ResNet([1], [8]), recipe, CPU, False, len(labels))
    train_epoch(trainer, data, recipe, CPU)
    return trainer


def test_gradients_are_clipped_by_value_before_the_step():
    recipe = changed(TRAIN, batch_size=20, epochs=1, grad_clip=1e-3)
    bound = torch.tensor(1e-3).item()  # 1e-3 as the fp32 gradients hold it
    clipped = [p.grad for p in one_step(recipe).model.parameters()]
    assert max(g.abs().max().item() for g in clipped) <= bound
    assert sum((g.abs() == bound).sum().item() for g in clipped) > 0  # clipping did bite
    free = [p.grad for p in one_step(changed(recipe, grad_clip=False)).model.parameters()]
    assert max(g.abs().max().item() for g in free) > 1e-3  # without clipping, some elements are larger


def test_adam_gets_the_recipes_weight_decay_and_applies_it():
    recipe = changed(TRAIN, weight_decay=0.25)
    model = torch.nn.Linear(4, 1, bias=False)
    optimizer = make_optimizer(model, recipe)
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.param_groups[0]["weight_decay"] == 0.25
    assert optimizer.param_groups[0]["lr"] == recipe.max_lr
    # with a zero loss gradient only the L2 penalty moves the weights: toward zero, by lr per element (Adam's
    # first step has size lr whatever the gradient's scale)
    torch.nn.init.constant_(model.weight, 1.0)
    model.weight.grad = torch.zeros_like(model.weight)
    optimizer.step()
    assert torch.allclose(model.weight, torch.full_like(model.weight, 1.0 - recipe.max_lr))
    still = torch.nn.Linear(4, 1, bias=False)
    torch.nn.init.constant_(still.weight, 1.0)
    no_decay = make_optimizer(still, changed(recipe, weight_decay=0.0))
    still.weight.grad = torch.zeros_like(still.weight)
    no_decay.step()
    assert torch.equal(still.weight, torch.ones_like(still.weight))


def test_compiled_step_model_shares_the_saved_model_parameters():
    model, step_model = prepare_model(ResNet([1], [8]), torch.device("cpu"), compiled=True)
    assert step_model is not model and step_model._orig_mod is model
    assert model.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert prepare_model(ResNet([1], [8]), torch.device("cpu"), compiled=False)[1].__class__ is ResNet
