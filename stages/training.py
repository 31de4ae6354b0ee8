"""The training engine: optimizer, schedule, one epoch of training, evaluation. Used by the train stage
and the benchmark alike, so what is measured is what trains."""
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .augment import random_crop_flip

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


def prepare_model(model, device, compile):
    """The model on the device in channels_last (the fast layout for convolutions, in oneDNN and cuDNN),
    and the module to call in the steps: torch.compile'd when asked, sharing the same parameters."""
    model = model.to(device, memory_format=torch.channels_last)
    return model, torch.compile(model) if compile else model


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


def train_epoch(model, optimizer, scheduler, padded_images, labels, normalize, train, generator, desc="train"):
    """One pass over the padded uint8 training set (on the training device) in a fresh random order, in
    train["precision"] ('bf16' or 'fp32', resolved). Returns (mean loss, accuracy) as device tensors:
    nothing is read back to the host per step, so a GPU never waits for the Python loop."""
    model.train()
    device = padded_images.device
    order = torch.randperm(len(labels), device=device, generator=generator)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    for batch in tqdm(order.split(train["batch_size"]), desc=desc, leave=False, unit="batch"):
        x = normalize(random_crop_flip(padded_images[batch], CROP_SIZE, generator))
        y = labels[batch]
        with autocast(device, train["precision"]):
            logits = model(x)
            loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if train["grad_clip"]:
            nn.utils.clip_grad_value_(model.parameters(), train["grad_clip"])
        optimizer.step()
        scheduler.step()
        loss_sum += loss.detach() * len(batch)
        correct += (logits.argmax(1) == y).sum()
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
