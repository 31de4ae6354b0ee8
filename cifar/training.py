"""The training engine: the data set on the device, the model with its optimizer and schedule, one epoch of
training, the per-epoch scores and scoring. Used by the train stage and the benchmark alike, so what is measured is
what trains."""
from dataclasses import dataclass
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import AfterValidator, Field, model_validator
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, update_bn
from tqdm import tqdm

from .augment import Normalizer, cutout, random_crop_flip, reflect_pad, tta_views
from .distributed import Context, all_sum, broadcast_buffers, shard, wrap
from .muon import Muon
from .params import FLAG, Section, integer, number, one_of
from .precision import autocast, make_scaler

CROP_SIZE = 32
PAD = 4  # the study's reflect-pad 4, then random 32x32 crops


def _off(flag):
    if flag:
        raise ValueError("true is no clipping threshold")
    return flag


class Recipe(Section):
    """The `train` section: everything that decides what training computes. Each key is a dependency of the
    train stage (dvc.yaml) and part of the resumable checkpoint's fingerprint. nproc and nnodes belong here
    because every rank's BatchNorm normalizes with its own share of the batch, so the process count changes
    the result (unless sync_bn). params.yaml holds the values, and its comments say what each key does."""
    section = "train"
    epochs: integer(1)
    batch_size: integer(1)
    max_lr: number(gt=0)
    warmup_fraction: number(gt=0, lt=1)
    weight_decay: number(ge=0)
    grad_clip: Annotated[Annotated[float, Field(gt=0, allow_inf_nan=False)] | Annotated[bool, AfterValidator(_off)],
                         Field(description="a number > 0, or false to switch clipping off")]
    seed: integer(0)
    validation_images: integer(0)  # held out of training, stratified; > 0: the per-epoch curves measure them
    precision: one_of("auto", "bf16", "fp16", "fp32")  # the train stage resolves auto for its device
    nproc: integer(1)
    nnodes: integer(1)
    sync_bn: FLAG
    # The fast trainers' tricks (docs/experiments.md)
    optimizer: one_of("adam", "sgd", "muon")
    momentum: number(ge=0, lt=1)
    nesterov: FLAG
    label_smoothing: number(ge=0, lt=1)
    ema_decay: number(ge=0, lt=1)
    cutout: integer(0)
    flip: one_of("random", "alternating")
    bn_lr_scale: number(gt=0)
    muon_lr: number(gt=0)
    muon_momentum: number(ge=0, lt=1)

    @model_validator(mode="after")
    def _consistent(self):
        if self.cutout >= CROP_SIZE:
            raise ValueError(f"train.cutout = {self.cutout} must be smaller than the {CROP_SIZE}-pixel image "
                             "(0 switches cutout off)")
        if self.optimizer in ("sgd", "muon") and self.nesterov and self.momentum == 0:
            raise ValueError("train.nesterov = true needs train.momentum > 0 (Nesterov momentum is a kind of "
                             "momentum); set train.nesterov: false for plain SGD")
        if self.batch_size < self.world_size:
            raise ValueError(f"train.batch_size = {self.batch_size} is smaller than train.nproc * train.nnodes = "
                             f"{self.world_size}: every process needs at least one image of each batch")
        return self

    @classmethod
    def from_params(cls, params):
        return cls(**params["train"])

    @property
    def world_size(self):
        return self.nproc * self.nnodes


@dataclass
class Data:
    """The data set on the training device, as uint8: the training images reflect-padded once (the padding
    never changes; every batch is cropped from it), and the images every epoch is scored on as they are:
    the test set (`monitor_split` "test"), or images held out of the training set ("validation")."""
    padded: torch.Tensor
    labels: torch.Tensor
    monitor_images: torch.Tensor
    monitor_labels: torch.Tensor
    normalize: Normalizer
    monitor_split: str = "test"  # what the per-epoch curves measure, and so their names: test/acc, ...

    @classmethod
    def on_device(cls, train, monitor, stats, device, monitor_split="test"):
        """From (images, labels) of each split (uint8 [N, 3, 32, 32], int64 [N]) and {mean, std}."""
        (images, labels), (monitor_images, monitor_labels) = train, monitor
        return cls(reflect_pad(images.to(device), PAD), labels.to(device), monitor_images.to(device),
                   monitor_labels.to(device), Normalizer(stats["mean"], stats["std"], device), monitor_split)


@dataclass
class Trainer:
    """The model and everything that updates it. `model` is the module that is saved; `step_model` is what
    the training steps call (DistributedDataParallel around it on several ranks, torch.compile'd when asked),
    sharing its parameters; `eval_model` what the per-epoch scoring calls (DDP's forward is for training steps only)."""
    model: nn.Module
    step_model: nn.Module
    eval_model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler  # fp16's loss scaling; disabled (passing through) in bf16 and fp32
    generator: torch.Generator  # the order and the augmentation: seeded, saved in the checkpoint
    ema: AveragedModel | None = None  # train.ema_decay > 0: the moving average of the weights
    flips: torch.Tensor | None = None  # train.flip alternating: each image's flip in the last epoch (None before)

    @property
    def result(self):
        """The model the run produces, which every epoch scores and the stage saves: the EMA when on."""
        return self.ema.module if self.ema is not None else self.model


def make_trainer(model, recipe, context, compiled, num_images):
    """The model on the context's device in channels_last (the fast layout for convolutions, in oneDNN and
    cuDNN), wrapped for several ranks and compiled if asked, with Adam and OneCycle for `num_images` per epoch,
    in recipe.precision (resolved)."""
    model, step_model = prepare_model(model, context.device, compiled, context, recipe.sync_bn)
    optimizer = make_optimizer(model, recipe)
    scheduler = make_scheduler(optimizer, recipe, steps_per_epoch(num_images, recipe.batch_size))
    scaler = make_scaler(context.device, recipe.precision)
    generator = torch.Generator(context.device).manual_seed(recipe.seed)
    eval_model = step_model if context.world_size == 1 else model
    # EMA (airbench, Page's ResNet-9): score and keep an average of the recent weights, smoother than the
    # last step's. Its weights only: averaged BatchNorm statistics would not fit averaged weights while the
    # weights move fast (near chance in short runs), so ema_batchnorm recomputes them for its weights.
    ema = None if not recipe.ema_decay else AveragedModel(
        model, multi_avg_fn=get_ema_multi_avg_fn(recipe.ema_decay), use_buffers=False)
    return Trainer(model, step_model, eval_model, optimizer, scheduler, scaler, generator, ema)


def prepare_model(model, device, compiled, context=None, sync_bn=False):
    """(model on the device in channels_last, the module the steps call: DDP around it on several ranks,
    torch.compile'd when asked)."""
    model = model.to(device, memory_format=torch.channels_last)
    step_model = wrap(model, context or Context(device), sync_bn)
    return model, torch.compile(step_model) if compiled else step_model


def make_optimizer(model, recipe):
    """Adam with L2 weight decay, as in the study, or (train.optimizer: sgd) SGD with momentum, Nesterov's by
    default, as the fastest CIFAR-10 trainers use, with the same L2 weight decay, or (muon) Muon for the
    convolution filters and that SGD for the rest (cifar.muon); CUDA's fused kernels update all parameters at
    once (not Muon's). The parameter groups are param_groups(model, recipe)."""
    groups, fused = param_groups(model, recipe), next(model.parameters()).device.type == "cuda"
    if recipe.optimizer == "muon":
        return Muon(groups, lr=recipe.max_lr, momentum=recipe.momentum, nesterov=recipe.nesterov,
                    weight_decay=recipe.weight_decay,
                    ns_dtype=torch.bfloat16 if recipe.precision == "bf16" else torch.float32)
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=recipe.max_lr, momentum=recipe.momentum, nesterov=recipe.nesterov,
                               weight_decay=recipe.weight_decay, fused=fused)
    return torch.optim.Adam(groups, lr=recipe.max_lr, weight_decay=recipe.weight_decay, fused=fused)


def param_groups(model, recipe):
    """All parameters in one group (the study's), or with train.bn_lr_scale != 1 BatchNorm's weights and biases
    in a second one, at max_lr * bn_lr_scale and weight_decay / bn_lr_scale. With Muon, the convolution filters
    come first, in a group of their own at muon_lr (muon_groups). The fast trainers' scaled BatchNorm
    learning rate (airbench's bias_scaler, 64 for its BatchNorm biases with SGD: 18 -> 13.5 epochs to 94 % in
    its ablation): BatchNorm's few parameters move faster, while SGD's decay per step (lr * wd) stays that of
    every other parameter."""
    groups, rest = muon_groups(model, recipe)
    if recipe.bn_lr_scale == 1:
        return groups + [{"params": rest}]
    norms = {id(p) for m in model.modules() if isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm))
             for p in m.parameters()}
    return groups + [{"params": [p for p in rest if id(p) not in norms]},
                     {"params": [p for p in rest if id(p) in norms], "lr": recipe.max_lr * recipe.bn_lr_scale,
                      "weight_decay": recipe.weight_decay / recipe.bn_lr_scale}]


def muon_groups(model, recipe):
    """([Muon's group], the other parameters) with train.optimizer muon, else ([], every parameter). Muon takes
    every convolution's filter, each followed by a BatchNorm in this ResNet (cifar.muon needs that); the linear
    head stays with SGD, as in airbench (Muon is made for the hidden layers' matrices; its author keeps the
    output layer on a standard optimizer)."""
    if recipe.optimizer != "muon":
        return [], list(model.parameters())
    filters = {id(m.weight) for m in model.modules() if isinstance(m, nn.Conv2d)}
    return ([{"params": [p for p in model.parameters() if id(p) in filters], "lr": recipe.muon_lr,
              "momentum": recipe.muon_momentum, "orthogonalize": True}],
            [p for p in model.parameters() if id(p) not in filters])


def make_scheduler(optimizer, recipe, steps_per_epoch):
    """OneCycle, stepped every batch: warm up to each group's peak (max_lr, BatchNorm's times bn_lr_scale) over
    warmup_fraction of the steps, then cosine-anneal towards zero. With Adam it also cycles beta1 between 0.95
    and 0.85 (OneCycleLR's default, the study's recipe); SGD keeps train.momentum as set."""
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[group["lr"] for group in optimizer.param_groups],
        total_steps=recipe.epochs * steps_per_epoch, pct_start=recipe.warmup_fraction,
        cycle_momentum=recipe.optimizer == "adam",
    )


def epoch_flips(trainer, recipe, num_images, device):
    """train.flip alternating (airbench): every image's flip for this epoch, the opposite of its last one
    (drawn at random, p = 0.5, in the first epoch), so that over any two epochs each image is seen both
    ways; None for the study's random flips, which random_crop_flip draws per batch."""
    if recipe.flip != "alternating":
        return None
    if trainer.flips is None:
        trainer.flips = torch.rand(num_images, device=device, generator=trainer.generator) < 0.5
    else:
        trainer.flips = ~trainer.flips
    return trainer.flips


def steps_per_epoch(num_images, batch_size):
    return -(-num_images // batch_size)  # the last, smaller batch is kept


def train_epoch(trainer, data, recipe, context, desc="train"):
    """One pass over the padded uint8 training set (on the training device) in a fresh random order, in
    recipe.precision ('bf16', 'fp16' or 'fp32', resolved). Returns (mean loss, accuracy) as device tensors:
    nothing is read back to the host per step, so a GPU never waits for the Python loop.

    On several ranks (`step_model` in DistributedDataParallel), every rank draws the same order and crops from
    the same seeded generator, and takes its own slice of each global batch of recipe.batch_size. Its
    loss is its images' summed loss * world_size / global batch, so that DDP's average of the ranks'
    gradients is the gradient of the global batch's mean loss: one step means the same at any process
    count. The sums of loss and hits are all-reduced once, at the end of the epoch."""
    model, optimizer, scaler, generator = trainer.step_model, trainer.optimizer, trainer.scaler, trainer.generator
    model.train()
    device, labels = data.padded.device, data.labels
    flips = epoch_flips(trainer, recipe, len(labels), device)
    order = torch.randperm(len(labels), device=device, generator=generator)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    for batch in tqdm(order.split(recipe.batch_size), desc=desc, leave=False, unit="batch", position=1,
                      disable=not context.is_main):
        part = shard(len(batch), context.rank, context.world_size)
        mine = batch[part]
        x = data.normalize(random_crop_flip(data.padded[mine], CROP_SIZE, generator, part.start, len(batch),
                                            None if flips is None else flips[mine]))
        if recipe.cutout:
            x = cutout(x, recipe.cutout, generator, part.start, len(batch))
        y = labels[mine]
        with autocast(device, recipe.precision):
            logits = model(x)
            # label smoothing (Page's ResNet-9, airbench): the target is 1 - e on the label and e spread over
            # all classes, so the logits stop growing once they separate the classes
            summed = F.cross_entropy(logits, y, reduction="sum", label_smoothing=recipe.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(summed * (context.world_size / len(batch))).backward()
        if recipe.grad_clip:  # after backward's all-reduce: the same averaged gradients on every rank
            scaler.unscale_(optimizer)  # clip the true gradients, not fp16's scaled ones
            nn.utils.clip_grad_value_(trainer.model.parameters(), recipe.grad_clip)
        scaler.step(optimizer)  # fp16: skipped when a gradient overflowed, and the scale shrinks
        scaler.update()
        trainer.scheduler.step()
        if trainer.ema is not None:
            trainer.ema.update_parameters(trainer.model)
        loss_sum += summed.detach()
        correct += (logits.argmax(1) == y).sum()
    if context.world_size > 1:
        loss_sum, correct = all_sum(loss_sum, correct)
    return loss_sum / len(labels), correct / len(labels)


def ema_batchnorm(trainer, data, recipe, context=None):
    """Recompute the EMA model's BatchNorm statistics for its own weights (torch's update_bn: one forward pass
    in train mode over the training images, uncropped and unflipped, in batches of train.batch_size; each
    statistic the average of its batches'): done after every epoch, before the EMA is scored and saved. It
    costs about a third of an epoch's compute (a forward pass, no backward), shared out on several ranks: each
    takes its share of the batches, and combine_batchnorm gives every rank the average over all of them. With
    SyncBatchNorm each rank takes its slice of every batch instead: SyncBatchNorm combines a batch's
    statistics over the ranks itself."""
    images = data.padded[:, :, PAD:-PAD, PAD:-PAD]
    batches = images.split(recipe.batch_size)
    model, context = trainer.ema.module, context or Context(images.device)
    synced = any(isinstance(module, nn.SyncBatchNorm) for module in model.modules())
    if synced:
        batches = [batch[shard(len(batch), context.rank, context.world_size)] for batch in batches]
    else:
        batches = batches[shard(len(batches), context.rank, context.world_size)]
    with autocast(images.device, recipe.precision):
        update_bn((data.normalize(x) for x in batches), model)
    if context.world_size > 1 and not synced:
        combine_batchnorm(model)


def combine_batchnorm(model):
    """Each BatchNorm's statistics averaged over every rank's batches: a rank's averages times its count of
    batches, summed over the ranks in one all-reduce, over the total count."""
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    weighted = [t for m in norms for n in [m.num_batches_tracked.double()]
                for t in (m.running_mean.double() * n, m.running_var.double() * n, n.view(1))]
    (total,) = all_sum(torch.cat(weighted))
    sums = iter(total.split([len(t) for t in weighted]))
    for m in norms:
        mean, var, count = next(sums), next(sums), next(sums)
        m.running_mean.copy_(mean / count)
        m.running_var.copy_(var / count)
        m.num_batches_tracked.copy_(count.squeeze())


def monitor_scores(trainer, data, recipe, context):
    """(mean loss, accuracy) of the run's model (trainer.result) on the images every epoch is scored on
    (data.monitor_*), without test-time augmentation (cheap, and the curves stay comparable across
    evaluate.tta). On several ranks, every rank
    takes rank 0's buffers (the model the main rank saves), scores its own shard of the set, and the sums are
    all-reduced."""
    images, labels = data.monitor_images, data.monitor_labels
    model = trainer.result if trainer.ema is not None else trainer.eval_model
    if context.world_size == 1:
        return score(model, images, labels, data.normalize, recipe.batch_size, recipe.precision)[:2]
    broadcast_buffers(model)
    part = shard(len(labels), context.rank, context.world_size)
    n = part.stop - part.start
    loss, accuracy, _ = score(model, images[part], labels[part], data.normalize, recipe.batch_size,
                              recipe.precision)
    loss_sum, correct = all_sum(loss * n, accuracy * n)
    return loss_sum / len(labels), correct / len(labels)


@torch.no_grad()
def score(model, images, labels, normalize, batch_size, precision, tta="none"):
    """(mean loss, accuracy, predictions) of the model in eval mode on uint8 images [N, 3, 32, 32], each
    image's logits the mean over its test-time views (augment.tta_views; tta none: the image alone)."""
    model.eval()
    loss_sum = torch.zeros((), device=images.device)
    predictions = []
    for x, y in zip(images.split(batch_size), labels.split(batch_size)):
        with autocast(images.device, precision):
            logits = torch.stack([model(normalize(view)).float() for view in tta_views(x, tta)]).mean(0)
            loss_sum += F.cross_entropy(logits, y, reduction="sum")
        predictions.append(logits.argmax(1))
    predictions = torch.cat(predictions)
    return loss_sum / len(labels), (predictions == labels).float().mean(), predictions


def per_class_accuracy(labels, predictions, num_classes):
    hits = torch.bincount(labels[predictions == labels], minlength=num_classes).double()
    return (hits / torch.bincount(labels, minlength=num_classes).clamp(min=1)).tolist()
