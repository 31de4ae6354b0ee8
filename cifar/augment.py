"""The study's augmentation, and the fast trainers' cutout and test-time views, as batched tensor
operations on the device (no per-image PIL pipeline).

The data set stays uint8 on the device; it is reflect-padded once, and every batch is cropped, flipped
and normalized there, each image with its own random offsets and flip."""
import torch

from .params import Section, one_of

TTA_MODES = ("none", "flip", "flip_translate")  # tta_views' modes, cheapest first


class EvaluateParams(Section):
    """The `evaluate` section: the test-time augmentation the evaluate stage scores with (tta_views)."""
    section = "evaluate"
    tta: one_of(*TTA_MODES)


def reflect_pad(images, pad):
    """Reflect-pad uint8 images [N, C, H, W] by `pad` pixels per side, by indexing (works for any dtype)."""
    def index(size):
        i = torch.arange(-pad, size + pad, device=images.device).abs()
        return torch.where(i >= size, 2 * (size - 1) - i, i)

    return images[:, :, index(images.shape[2])][:, :, :, index(images.shape[3])]


def _per_image(high, n, part, ndim, device, generator):
    """A random integer in [0, high) per image, shaped [B, 1, ...] (ndim ones) to broadcast: drawn for the
    whole batch of n and this part's kept, so a rank draws exactly what one process would."""
    return torch.randint(0, high, (n,) + (1,) * ndim, device=device, generator=generator)[part]


def random_crop_flip(padded, size, generator, start=0, drawn=None, flip=None):
    """Per image: a random `size` x `size` crop of the padded images [B, C, H, W], then a horizontal flip
    with probability 0.5 (the study's RandomCrop(32, padding=4, reflect) + RandomHorizontalFlip), or, given
    `flip` (bool [B]), where it says.

    With `drawn`, the images are [start, start + B) of a batch of `drawn`: the offsets and flips are drawn
    for the whole batch and this part's are used, so a rank of a distributed run crops its images exactly
    as one process would crop the whole batch."""
    b, c, h, w = padded.shape
    device = padded.device
    n, part = drawn or b, slice(start, start + b)
    top = _per_image(h - size + 1, n, part, 3, device, generator)
    left = _per_image(w - size + 1, n, part, 3, device, generator)
    if flip is None:
        flip = (torch.rand(n, 1, 1, 1, device=device, generator=generator) < 0.5)[part]
    else:
        flip = flip.view(b, 1, 1, 1)
    steps = torch.arange(size, device=device)
    rows = top + steps.view(1, 1, size, 1)
    steps = steps.view(1, 1, 1, size)
    cols = left + torch.where(flip, size - 1 - steps, steps)  # a flip reads the columns backwards
    return padded[torch.arange(b, device=device).view(b, 1, 1, 1), torch.arange(c, device=device).view(1, c, 1, 1),
                  rows, cols]


def cutout(images, size, generator, start=0, drawn=None):
    """Cutout (DeVries and Taylor; Page's ResNet-9): per image, a `size` x `size` square at a random
    position, wholly inside the image, set to zero in every channel. Applied to normalized images, so the
    square takes the training set's mean colour. `start` and `drawn` as in random_crop_flip."""
    b, _, h, w = images.shape
    device = images.device
    n, part = drawn or b, slice(start, start + b)
    top = _per_image(h - size + 1, n, part, 2, device, generator)
    left = _per_image(w - size + 1, n, part, 2, device, generator)
    rows = torch.arange(h, device=device).view(1, h, 1)
    cols = torch.arange(w, device=device).view(1, 1, w)
    square = (rows >= top) & (rows < top + size) & (cols >= left) & (cols < left + size)  # [B, H, W]
    return images.masked_fill(square.unsqueeze(1), 0)


def tta_views(images, tta):
    """The test-time views of uint8 images [B, C, H, W] whose logits are averaged: `none`, the images;
    `flip`, also their mirror images (Page's largest single gain); `flip_translate`, also both shifted by
    one pixel up-left and down-right (reflect-padded), mirrored or not (airbench): 6 views."""
    views = [images]
    if tta in ("flip", "flip_translate"):
        views.append(images.flip(3))
    if tta == "flip_translate":
        h, w = images.shape[2:]
        padded = reflect_pad(images, 1)
        shifted = [padded[:, :, :h, :w], padded[:, :, 2:, 2:]]  # the content moves down-right, and up-left
        views += shifted + [view.flip(3) for view in shifted]
    return views


class Normalizer:
    """uint8 images -> float (x / 255 - mean) / std per channel, in channels_last memory format."""

    def __init__(self, mean, std, device):
        std = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.scale = 1 / (255 * std)
        self.shift = -torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1) / std

    def __call__(self, images):
        x = images.float().mul_(self.scale).add_(self.shift)
        return x.contiguous(memory_format=torch.channels_last)
