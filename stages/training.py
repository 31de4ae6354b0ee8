"""The training engine: optimizer, schedule, one epoch of training, evaluation. Used by the train stage
and the benchmark alike, so what is measured is what trains."""
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .augment import random_crop_flip
from .distributed import all_sum, broadcast_buffers, shard

CROP_SIZE = 32


def pick_device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def bf16_supported(device):
    """Whether the device computes bf16 natively (on a CPU: oneDNN's AVX-512/AMX kernels; elsewhere it is
    emulated, many times slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


def resolve_precision(precision, device):
    """train.precision 'auto' -> 'bf16' where the device supports it, else 'fp32'; 'bf16'/'fp32' as asked."""
    if precision == "auto":
        return "bf16" if bf16_supported(device) else "fp32"
    return precision


def autocast(device, precision):
    """bf16 autocast for the forward pass and loss; the weights, their gradients, the optimizer state and
    the BatchNorm statistics stay fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def prepare_model(model, device, compile, wrap=None):
    """The model on the device in channels_last (the fast layout for convolutions, in oneDNN and cuDNN),
    and the module to call in the steps: wrap(model) if given (DistributedDataParallel), torch.compile'd
    when asked, sharing the same parameters."""
    model = model.to(device, memory_format=torch.channels_last)
    step_model = wrap(model) if wrap else model
    return model, torch.compile(step_model) if compile else step_model


def make_optimizer(model, train):
    """Adam with L2 weight decay, as in the study; CUDA's fused kernel updates all parameters at once."""
    fused = next(model.parameters()).device.type == "cuda"
    return torch.optim.Adam(model.parameters(), lr=train["max_lr"], weight_decay=train["weight_decay"], fused=fused)


def make_scheduler(optimizer, train, steps_per_epoch):
    """OneCycle, stepped every batch: warm up to train.max_lr over train.warmup_fraction of the steps,
    then cosine-anneal towards zero."""
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=train["max_lr"], total_steps=train["epochs"] * steps_per_epoch,
        pct_start=train["warmup_fraction"],
    )


def steps_per_epoch(num_images, batch_size):
    return -(-num_images // batch_size)  # the last, smaller batch is kept


def train_epoch(model, optimizer, scheduler, padded_images, labels, normalize, train, generator, desc="train",
                rank=0, world_size=1):
    """One pass over the padded uint8 training set (on the training device) in a fresh random order, in
    train["precision"] ('bf16' or 'fp32', resolved). Returns (mean loss, accuracy) as device tensors:
    nothing is read back to the host per step, so a GPU never waits for the Python loop.

    On several ranks (`model` in DistributedDataParallel), every rank draws the same order and crops from
    the same seeded generator, and takes its own slice of each global batch of train["batch_size"]. Its
    loss is its images' summed loss * world_size / global batch, so that DDP's average of the ranks'
    gradients is the gradient of the global batch's mean loss: one step means the same at any process
    count. The sums of loss and hits are all-reduced once, at the end of the epoch."""
    model.train()
    device = padded_images.device
    order = torch.randperm(len(labels), device=device, generator=generator)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    for batch in tqdm(order.split(train["batch_size"]), desc=desc, leave=False, unit="batch", disable=rank != 0):
        part = shard(len(batch), rank, world_size)
        x = normalize(random_crop_flip(padded_images[batch[part]], CROP_SIZE, generator, part.start, len(batch)))
        y = labels[batch[part]]
        with autocast(device, train["precision"]):
            logits = model(x)
            summed = F.cross_entropy(logits, y, reduction="sum")
        optimizer.zero_grad(set_to_none=True)
        (summed * (world_size / len(batch))).backward()
        if train["grad_clip"]:  # after backward's all-reduce: the same averaged gradients on every rank
            nn.utils.clip_grad_value_(model.parameters(), train["grad_clip"])
        optimizer.step()
        scheduler.step()
        loss_sum += summed.detach()
        correct += (logits.argmax(1) == y).sum()
    if world_size > 1:
        loss_sum, correct = all_sum(loss_sum, correct)
    return loss_sum / len(labels), correct / len(labels)


def validate(model, images, labels, normalize, batch_size, precision, rank=0, world_size=1):
    """(mean loss, accuracy) of the model on the whole set. On several ranks, every rank takes rank 0's
    buffers (the model rank 0 saves), evaluates its own shard of the set, and the sums are all-reduced."""
    if world_size == 1:
        return evaluate(model, images, labels, normalize, batch_size, precision)[:2]
    broadcast_buffers(model)
    part = shard(len(labels), rank, world_size)
    n = part.stop - part.start
    loss, accuracy, _ = evaluate(model, images[part], labels[part], normalize, batch_size, precision)
    loss_sum, correct = all_sum(loss * n, accuracy * n)
    return loss_sum / len(labels), correct / len(labels)


@torch.no_grad()
def evaluate(model, images, labels, normalize, batch_size, precision):
    """(mean loss, accuracy, predictions) of the model in eval mode on uint8 images [N, 3, 32, 32]."""
    model.eval()
    loss_sum = torch.zeros((), device=images.device)
    predictions = []
    for x, y in zip(images.split(batch_size), labels.split(batch_size)):
        with autocast(images.device, precision):
            logits = model(normalize(x))
            loss_sum += F.cross_entropy(logits, y, reduction="sum")
        predictions.append(logits.argmax(1))
    predictions = torch.cat(predictions)
    return loss_sum / len(labels), (predictions == labels).float().mean(), predictions
