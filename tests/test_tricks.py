"""The fast CIFAR-10 trainers' tricks, each tested for what it does: SGD with Nesterov momentum, Muon, label
smoothing, the EMA of the weights, cutout, alternating flips and test-time augmentation."""
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import synthetic_images
from recipes import changed, recipe
from torch import nn

from cifar.augment import cutout, random_crop_flip, reflect_pad, tta_views
from cifar.distributed import Context
from cifar.model import ResNet
from cifar.muon import orthogonalize
from cifar.training import (
    Data,
    ema_batchnorm,
    epoch_flips,
    make_optimizer,
    make_scheduler,
    make_trainer,
    monitor_scores,
    score,
    train_epoch,
)

RECIPE = recipe(epochs=3, batch_size=20, precision="fp32")
CPU = Context(torch.device("cpu"))
STATS = {"mean": [0.5] * 3, "std": [0.25] * 3}


def random_data(n=60, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (n,), generator=generator)
    return Data.on_device((images, labels), (images[:20], labels[:20]), STATS, CPU.device)


def tiny_trainer(recipe, data):
    torch.manual_seed(0)
    return make_trainer(ResNet([1], [8]), recipe, CPU, False, len(data.labels))


# SGD with Nesterov momentum

def test_sgd_uses_nesterov_momentum_as_asked_and_the_schedule_leaves_it_alone():
    recipe = changed(RECIPE, optimizer="sgd", momentum=0.9, nesterov=True, weight_decay=0.0, max_lr=0.1)
    model = nn.Linear(1, 1, bias=False)
    nn.init.constant_(model.weight, 1.0)
    optimizer = make_optimizer(model, recipe)
    assert isinstance(optimizer, torch.optim.SGD)
    group = optimizer.param_groups[0]
    assert group["nesterov"] is True and group["momentum"] == 0.9 and group["dampening"] == 0
    # Nesterov's update, by hand: v = mu v + g; w -= lr (g + mu v), with a gradient of 1 at each step
    lr, mu, w, v = 0.1, 0.9, 1.0, 0.0
    for _ in range(3):
        model.weight.grad = torch.ones_like(model.weight)
        optimizer.step()
        v = mu * v + 1.0
        w -= lr * (1.0 + mu * v)
        assert model.weight.item() == pytest.approx(w, rel=1e-6)
    classic = make_optimizer(nn.Linear(1, 1), changed(recipe, nesterov=False))
    assert classic.param_groups[0]["nesterov"] is False
    # OneCycle cycles Adam's beta1 (the study's recipe), but SGD keeps train.momentum throughout
    scheduler = make_scheduler(optimizer, changed(recipe, epochs=1), steps_per_epoch=10)
    for _ in range(10):
        optimizer.step()
        scheduler.step()
        assert optimizer.param_groups[0]["momentum"] == 0.9
    adam = make_optimizer(nn.Linear(1, 1), RECIPE)
    make_scheduler(adam, RECIPE, steps_per_epoch=10)
    assert adam.param_groups[0]["betas"][0] == pytest.approx(0.95)  # OneCycle's start: max momentum


def test_sgd_weight_decay_is_l2_on_the_weights():
    recipe = changed(RECIPE, optimizer="sgd", momentum=0.9, nesterov=True, weight_decay=0.5, max_lr=0.1)
    model = nn.Linear(1, 1, bias=False)
    nn.init.constant_(model.weight, 2.0)
    optimizer = make_optimizer(model, recipe)
    model.weight.grad = torch.zeros_like(model.weight)
    optimizer.step()  # g = 0 + 0.5 * 2 = 1; v = 1; w = 2 - 0.1 * (1 + 0.9) = 1.81
    assert model.weight.item() == pytest.approx(1.81)


# Muon for the convolution filters

def skewed(rows, cols, seed=0):
    """A random rows x cols matrix whose singular values spread from 0.01 to 1 (a gradient's skewed spectrum)."""
    generator = torch.Generator().manual_seed(seed)
    rank = min(rows, cols)
    u, _ = torch.linalg.qr(torch.randn(rows, rank, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, rank, generator=generator, dtype=torch.float64))
    return (u @ torch.diag(torch.logspace(-2, 0, rank, dtype=torch.float64)) @ v.T).float()


@pytest.mark.parametrize("rows, cols", [(16, 72), (72, 16)])
def test_orthogonalize_brings_every_singular_value_near_1(rows, cols):
    singular = torch.linalg.svdvals(orthogonalize(skewed(rows, cols)))
    # the quintic iteration's band (Keller Jordan: about Uniform(0.5, 1.5)); the input spanned a factor of 100
    assert singular.min() > 0.5 and singular.max() < 1.5, singular


def test_muon_steps_each_conv_filter_by_its_orthogonalized_gradient_as_a_matrix():
    """The update of a conv filter, read as out x (in * kh * kw), has singular values near 1 at the filter's
    learning rate; the BatchNorm and head parameters take plain SGD steps, Nesterov's, with weight decay."""
    model = ResNet([1], [16])
    recipe = changed(RECIPE, optimizer="muon", muon_lr=0.05, muon_momentum=0.0, max_lr=0.1, momentum=0.9,
                     nesterov=True, weight_decay=0.0)
    optimizer = make_optimizer(model, recipe)
    filters = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]
    muon, sgd = optimizer.param_groups
    assert [id(p) for p in muon["params"]] == [id(p) for p in filters] and muon["lr"] == 0.05
    assert {id(p) for p in sgd["params"]} == {id(p) for p in model.parameters()} - {id(p) for p in filters}
    assert sgd["nesterov"] and sgd["momentum"] == 0.9 and sgd["lr"] == 0.1
    conv = model.layers[0][0].conv2.weight  # 16 x 16 x 3 x 3: a 16 x 144 matrix
    with torch.no_grad():
        for p in filters:  # at the norm Muon keeps (sqrt(out)), so the step alone moves the filter
            p.mul_(len(p) ** 0.5 / p.norm())
    before, others = conv.detach().clone(), [p.detach().clone() for p in sgd["params"]]
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    conv.grad = skewed(16, 144).view_as(conv)
    optimizer.step()
    singular = torch.linalg.svdvals(((before - conv.detach()) / 0.05).reshape(16, -1))
    assert singular.min() > 0.5 and singular.max() < 1.5, singular
    # the head and BatchNorm: Nesterov SGD's first step, lr * (g + mu * g) = 0.1 * 1.9 for a gradient of ones
    for p, old in zip(sgd["params"], others):
        assert torch.allclose(old - p.detach(), torch.full_like(p, 0.19))


def test_muon_keeps_each_filter_at_norm_sqrt_out_and_its_momentum_in_the_state_dict():
    """Each step starts from the filter brought back to norm sqrt(out channels); the Nesterov momentum buffers
    are the optimizer's state, so a checkpointed run resumes them: two steps equal one step, a save and load
    into a fresh optimizer, and one more."""
    def run(split):
        torch.manual_seed(0)
        model = ResNet([1], [8])
        recipe = changed(RECIPE, optimizer="muon", muon_lr=0.05, muon_momentum=0.6)
        optimizer = make_optimizer(model, recipe)
        for step in range(2):
            if split and step == 1:
                state = optimizer.state_dict()
                optimizer = make_optimizer(model, recipe)
                optimizer.load_state_dict(state)
            torch.manual_seed(step)
            for p in model.parameters():
                p.grad = torch.randn_like(p)
            optimizer.step()
        return model, optimizer
    model, optimizer = run(split=False)
    resumed, _ = run(split=True)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), resumed.parameters()))
    muon = optimizer.param_groups[0]
    assert all("muon_buffer" in optimizer.state[p] for p in muon["params"])
    for p in muon["params"]:  # one step (lr 0.05, singular values near 1) from norm sqrt(out): close to it
        assert p.norm().item() == pytest.approx(len(p) ** 0.5, rel=0.1)


# BatchNorm's learning rate scaled (airbench's bias_scaler)

def test_batchnorms_parameters_learn_at_bn_lr_scale_times_the_rate_with_the_decay_divided_throughout():
    model = ResNet([1], [8])
    norms = {id(p) for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()}
    # the study's: one group, every parameter, so the default trains as before
    plain = make_optimizer(model, RECIPE)
    assert [len(group["params"]) for group in plain.param_groups] == [len(list(model.parameters()))]
    recipe = changed(RECIPE, optimizer="sgd", weight_decay=5e-4, bn_lr_scale=4.0)
    optimizer = make_optimizer(model, recipe)
    others, bn = optimizer.param_groups
    assert {id(p) for p in bn["params"]} == norms and len(norms) == 2 * 3  # the stem's, the block's two
    assert not {id(p) for p in others["params"]} & norms
    assert len(others["params"]) + len(bn["params"]) == len(list(model.parameters()))
    scheduler = make_scheduler(optimizer, recipe, steps_per_epoch=10)
    peaks = []
    for _ in range(recipe.epochs * 10):  # warm-up and annealing alike: the ratio holds at every step
        assert bn["lr"] == pytest.approx(4 * others["lr"], rel=1e-12)
        assert bn["lr"] * bn["weight_decay"] == pytest.approx(others["lr"] * others["weight_decay"], rel=1e-12)
        peaks.append(bn["lr"])
        optimizer.step()
        scheduler.step()
    assert max(peaks) == pytest.approx(4 * recipe.max_lr)
    assert bn["weight_decay"] == pytest.approx(5e-4 / 4) and others["weight_decay"] == pytest.approx(5e-4)


def test_a_scaled_batchnorm_rate_moves_batchnorms_parameters_that_much_further_in_one_step():
    steps = {}
    for scale in [1.0, 8.0]:
        torch.manual_seed(0)
        model = ResNet([1], [8])
        recipe = changed(RECIPE, optimizer="sgd", momentum=0.0, nesterov=False, weight_decay=0.0, bn_lr_scale=scale)
        optimizer = make_optimizer(model, recipe)
        before = [p.detach().clone() for p in model.parameters()]
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        optimizer.step()
        steps[scale] = {name: (before[i] - p).abs().max().item()
                        for i, (name, p) in enumerate(model.named_parameters())}
    norms = {"stem.1.weight", "stem.1.bias", "layers.0.0.bn1.weight", "layers.0.0.bn1.bias", "layers.0.0.bn2.weight",
             "layers.0.0.bn2.bias"}
    assert norms < set(steps[1.0])
    for name, step in steps[1.0].items():
        assert step > 0 and steps[8.0][name] == pytest.approx(8 * step if name in norms else step, rel=1e-6), name


# Label smoothing

def test_the_training_loss_is_label_smoothings_formula():
    data = random_data(20)
    recipe = changed(RECIPE, epochs=1, label_smoothing=0.2, grad_clip=False)
    trainer = tiny_trainer(recipe, data)
    seen = []
    trainer.model.register_forward_hook(lambda module, inputs, output: seen.append(output.detach()))
    loss, _ = train_epoch(trainer, data, recipe, CPU)
    (logits,) = seen
    labels = data.labels[torch.randperm(20, generator=torch.Generator().manual_seed(0))]  # the epoch's order
    log_p = F.log_softmax(logits, 1)
    # (1 - e) * cross-entropy with the label + e * the mean over the 10 classes of -log p
    expected = (0.8 * -log_p.gather(1, labels[:, None]).squeeze(1) + 0.2 * -log_p.mean(1)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    plain = F.cross_entropy(logits, labels)
    assert abs(loss.item() - plain.item()) > 1e-3  # it did smooth


# The EMA of the weights

def test_the_ema_is_the_hand_computed_average_of_every_step_and_is_the_run_s_model():
    data = random_data(60)
    decay = 0.6
    recipe = changed(RECIPE, epochs=1, ema_decay=decay)
    trainer = tiny_trainer(recipe, data)
    states = []  # the weights after every step
    trainer.optimizer.register_step_post_hook(
        lambda *_: states.append({k: v.detach().clone() for k, v in trainer.model.named_parameters()}))
    train_epoch(trainer, data, recipe, CPU)
    assert len(states) == 3
    expected = states[0]
    for state in states[1:]:
        expected = {k: decay * expected[k] + (1 - decay) * state[k] for k in expected}
    averaged = dict(trainer.ema.module.named_parameters())
    for k in expected:
        assert torch.allclose(averaged[k], expected[k], atol=1e-6), k
    assert any(not torch.allclose(averaged[k], states[-1][k]) for k in expected)  # not just the last weights
    assert trainer.result is trainer.ema.module and replace(trainer, ema=None).result is trainer.model


def test_the_ema_s_batchnorm_statistics_are_recomputed_for_its_own_weights():
    """After ema_batchnorm, the stem's BatchNorm holds the mean and variance of the EMA stem convolution's
    outputs over every training image, uncropped (3 equal batches: the cumulative average is the mean)."""
    data = random_data(60)
    recipe = changed(RECIPE, epochs=1, ema_decay=0.6)
    trainer = tiny_trainer(recipe, data)
    train_epoch(trainer, data, recipe, CPU)
    ema_batchnorm(trainer, data, recipe)
    conv, bn = trainer.ema.module.stem[0], trainer.ema.module.stem[1]
    with torch.no_grad():
        out = conv(data.normalize(data.padded[:, :, 4:-4, 4:-4]))
    assert torch.allclose(bn.running_mean, out.mean((0, 2, 3)), atol=1e-5)
    per_batch_var = torch.stack([o.var((0, 2, 3)) for o in out.split(20)]).mean(0)  # unbiased, per batch
    assert torch.allclose(bn.running_var, per_batch_var, atol=1e-4)
    model_bn = trainer.model.stem[1]
    assert not torch.allclose(bn.running_mean, model_bn.running_mean)  # not the trained model's statistics


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "muon"])
def test_after_a_short_run_the_ema_scores_at_least_as_well_as_the_last_weights(optimizer):
    """600 synthetic images, widths 8..64, batch 64, 3 epochs (30 steps), EMA decay 0.9, lr 0.01, scored on 200
    held-out images. With the BatchNorm statistics averaged along with the weights, the EMA scored 53.5 %
    (SGD) and 60 % (Adam) against the last weights' 71 % and 82.5 %; recomputed, it is no worse than the last
    weights, within 2 points (6 of the 200 images)."""
    rng = np.random.default_rng(0)
    images, labels = synthetic_images(800, rng)
    images = torch.from_numpy(images).view(-1, 3, 32, 32)
    labels = torch.tensor(labels)
    data = Data.on_device((images[:600], labels[:600]), (images[600:], labels[600:]), STATS, CPU.device)
    recipe = changed(RECIPE, epochs=3, batch_size=64, max_lr=0.01, ema_decay=0.9, optimizer=optimizer,
                     nesterov=False, weight_decay=0.0)
    torch.manual_seed(0)
    trainer = make_trainer(ResNet([2, 1, 1, 1], [8, 16, 32, 64]), recipe, CPU, False, 600)
    for _ in range(recipe.epochs):
        train_epoch(trainer, data, recipe, CPU)
        ema_batchnorm(trainer, data, recipe)
    last = score(trainer.model, data.monitor_images, data.monitor_labels, data.normalize, 100, "fp32")[1].item()
    ema = monitor_scores(trainer, data, recipe, CPU)[1].item()
    assert ema >= last - 0.02, f"{optimizer}: EMA {ema:.3f} against the last weights' {last:.3f}"
    assert last > 0.3  # it learned: chance is 0.1


def test_monitor_scores_the_ema_when_it_is_on():
    data = random_data(60)
    recipe = changed(RECIPE, epochs=1, ema_decay=0.9)
    trainer = tiny_trainer(recipe, data)
    train_epoch(trainer, data, recipe, CPU)
    loss, _ = monitor_scores(trainer, data, recipe, CPU)
    ema_loss = score(trainer.ema.module, data.monitor_images, data.monitor_labels, data.normalize, 20, "fp32")[0]
    raw_loss = score(trainer.model, data.monitor_images, data.monitor_labels, data.normalize, 20, "fp32")[0]
    assert loss.item() == ema_loss.item() != raw_loss.item()


# Cutout

def test_cutout_zeroes_exactly_one_square_per_image_at_random_positions():
    images = torch.ones(200, 3, 32, 32)
    out = cutout(images, 8, torch.Generator().manual_seed(0))
    corners = []
    for image in out:
        zero = image == 0
        assert torch.equal(zero[0], zero[1]) and torch.equal(zero[0], zero[2])  # every channel alike
        rows, cols = zero[0].nonzero(as_tuple=True)
        assert len(rows) == 64  # one whole 8 x 8 square, inside the image
        top, left = rows.min().item(), cols.min().item()
        assert rows.max() - top == 7 and cols.max() - left == 7
        corners.append((top, left))
        assert (image[:, ~zero[0]] == 1).all()  # and nothing else changed
    assert len(set(corners)) > 100  # spread over all of [0, 24] on both axes
    assert {t for t, _ in corners} >= {0, 24} and {c for _, c in corners} >= {0, 24}
    assert torch.equal(images, torch.ones(200, 3, 32, 32))  # the input itself is left alone


def test_a_rank_cuts_its_part_as_one_process_cuts_the_whole_batch():
    images = torch.rand(10, 3, 32, 32)
    whole = cutout(images, 6, torch.Generator().manual_seed(3))
    part = cutout(images[4:7], 6, torch.Generator().manual_seed(3), 4, 10)
    assert torch.equal(part, whole[4:7])


def test_training_with_cutout_cuts_every_batch():
    data = random_data(20)
    recipe = changed(RECIPE, epochs=1, cutout=10)
    trainer = tiny_trainer(recipe, data)
    seen = []
    trainer.model.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].detach()))
    train_epoch(trainer, data, recipe, CPU)
    (x,) = seen
    assert [(image == 0).all(0).sum().item() for image in x] == [100] * 20  # a 10 x 10 square of zeros each


# Alternating flips

def test_alternating_flip_gives_each_image_the_opposite_flip_in_consecutive_epochs():
    data = random_data(60)
    recipe = changed(RECIPE, flip="alternating")
    trainer = tiny_trainer(recipe, data)
    flips = []
    for _ in range(3):
        train_epoch(trainer, data, recipe, CPU)
        flips.append(trainer.flips.clone())
    assert 10 < flips[0].sum() < 50  # random in the first epoch
    assert torch.equal(flips[1], ~flips[0]) and torch.equal(flips[2], flips[0])
    assert epoch_flips(tiny_trainer(RECIPE, data), RECIPE, 60, CPU.device) is None  # random: drawn per batch


def test_a_given_flip_mirrors_exactly_those_images():
    padded = reflect_pad(torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8), 4)
    flip = torch.tensor([True, False] * 4)
    unflipped = random_crop_flip(padded, 32, torch.Generator().manual_seed(2), flip=torch.zeros(8, dtype=torch.bool))
    flipped = random_crop_flip(padded, 32, torch.Generator().manual_seed(2), flip=flip)
    for i in range(8):  # the same crops (the same offsets drawn), mirrored where asked
        assert torch.equal(flipped[i], unflipped[i].flip(2) if flip[i] else unflipped[i])


# Test-time augmentation

def test_tta_views_are_the_image_its_mirror_and_one_pixel_shifts():
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    assert [v.data_ptr() for v in tta_views(images, "none")] == [images.data_ptr()]
    plain, mirror = tta_views(images, "flip")
    assert torch.equal(plain, images) and torch.equal(mirror, images.flip(3))
    views = tta_views(images, "flip_translate")
    assert len(views) == 6
    down_right, up_left = views[2], views[3]
    assert torch.equal(down_right[:, :, 1:, 1:], images[:, :, :-1, :-1])  # content moved one pixel down-right
    assert torch.equal(up_left[:, :, :-1, :-1], images[:, :, 1:, 1:])  # and up-left
    assert torch.equal(views[4], down_right.flip(3)) and torch.equal(views[5], up_left.flip(3))


class Linear(nn.Module):
    """A linear model of the flattened image: its logits are easy to average by hand."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 32 * 32, 10)

    def forward(self, x):
        return self.fc(x.flatten(1))


@pytest.mark.parametrize("tta", ["flip", "flip_translate"])
def test_tta_logits_are_the_mean_of_the_views_logits(tta):
    torch.manual_seed(0)
    model, data = Linear(), random_data(20)
    images, labels = data.monitor_images, data.monitor_labels
    loss, accuracy, predictions = score(model, images, labels, data.normalize, 7, "fp32", tta)
    with torch.no_grad():
        logits = torch.stack([model(data.normalize(v)) for v in tta_views(images, tta)]).mean(0)
    assert loss.item() == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)
    assert torch.equal(predictions, logits.argmax(1))
    assert loss.item() != pytest.approx(score(model, images, labels, data.normalize, 7, "fp32")[0].item(), rel=1e-4)


class Symmetric(nn.Module):
    """A model blind to horizontal flips: f(x) = g(x) + g(mirror of x)."""

    def __init__(self):
        super().__init__()
        self.g = Linear()

    def forward(self, x):
        return self.g(x) + self.g(x.flip(3))


def test_a_flip_symmetric_model_gains_nothing_from_flip_tta():
    torch.manual_seed(0)
    model, data = Symmetric(), random_data(20)
    plain = score(model, data.monitor_images, data.monitor_labels, data.normalize, 20, "fp32")
    flipped = score(model, data.monitor_images, data.monitor_labels, data.normalize, 20, "fp32", "flip")
    assert flipped[0].item() == pytest.approx(plain[0].item(), rel=1e-6)
    assert torch.equal(flipped[2], plain[2]) and flipped[1] == plain[1]
