"""The study's ResNet family for 32x32 images, and its checkpoint format."""
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import model_validator
from torch import nn

from .params import Section, integer, integers
from .workspace import UserError, atomic_path

NUM_CLASSES = 10


class ModelParams(Section):
    """The `model` section: the ResNet's shape and the study's parameter budget."""
    section = "model"
    blocks: integers(1)
    widths: integers(1)
    max_params: integer(1)

    @model_validator(mode="after")
    def _one_width_per_layer(self):
        if len(self.blocks) != len(self.widths):
            raise ValueError(f"model.blocks {self.blocks} and model.widths {self.widths} must have the same "
                             "length (one entry per layer)")
        return self


class BasicBlock(nn.Module):
    """3x3 conv-BN-ReLU, 3x3 conv-BN, plus the shortcut (identity, or 1x1 conv-BN when the shape changes), ReLU."""

    def __init__(self, in_channels, channels, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.stride = stride
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != channels:
            # stride 1 on every stride-th pixel (forward): a strided 1x1 convolution's function, without its oneDNN
            # weight gradient, which kills the process on an odd batch under 16 input channels (torch 2.14.1 on
            # AVX-512: docs/troubleshooting.md)
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, channels, 1, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x[:, :, ::self.stride, ::self.stride]))


class ResNet(nn.Module):
    """3x3 stem (no max-pool: the input is only 32x32), then one layer per entry of `blocks`/`widths`: that many
    BasicBlocks at that width, the first of every layer after the first with stride 2; global average pool,
    linear head. `layers[i]` is layer i, as kuangliu's layer1..layer4."""

    def __init__(self, blocks, widths, num_classes=NUM_CLASSES):
        super().__init__()
        self.config = {"blocks": list(blocks), "widths": list(widths), "num_classes": num_classes}
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)
        )
        layers, in_channels = [], widths[0]
        for i, (n, channels) in enumerate(zip(blocks, widths)):
            layers.append(self._layer(in_channels, channels, n, stride=1 if i == 0 else 2))
            in_channels = channels
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(in_channels, num_classes)

    @staticmethod
    def _layer(in_channels, channels, n, stride):
        return nn.Sequential(*[BasicBlock(in_channels if j == 0 else channels, channels, stride if j == 0 else 1)
                               for j in range(n)])

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


def build_model(blocks, widths, max_params):
    """The ResNet for `model.*` params; a model over the study's budget is an error before any training."""
    model = ResNet(blocks, widths)
    n = count_parameters(model)
    if n > max_params:
        raise UserError(
            f"model.blocks {list(blocks)} with model.widths {list(widths)} has {n:,} parameters, "
            f"over model.max_params = {max_params:,}"
        )
    return model


def save_model(path, model, stats, classes, precision):
    """Everything evaluate needs to rebuild the model: weights, architecture, normalization, class names
    and the precision it was trained (and validated) in."""
    checkpoint = {
        "config": model.config,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "stats": stats,
        "classes": list(classes),
        "precision": precision,
    }
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)


def load_model(path):
    """Rebuild (model, checkpoint) from a file written by save_model."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint; run the train stage first (dvc repro train)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a damaged or foreign file
        raise UserError(f"{path}: not a readable model checkpoint ({type(e).__name__}: {e})".splitlines()[0])
    keys = checkpoint if isinstance(checkpoint, dict) else {}
    missing = {"config", "state_dict", "stats", "classes", "precision"} - set(keys)
    if missing:
        raise UserError(f"{path}: not a checkpoint of this project (missing {', '.join(sorted(missing))})")
    config = checkpoint["config"]
    model = ResNet(config["blocks"], config["widths"], config["num_classes"])
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as e:
        raise UserError(f"{path}: weights do not fit the architecture {config} ({str(e).splitlines()[0]})")
    return model, checkpoint
