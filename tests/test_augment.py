"""Batched augmentation: reflect padding, per-image random crops and flips, normalization."""
import torch
import torch.nn.functional as F

from cifar.augment import Normalizer, cutout, random_crop_flip, reflect_pad


def test_reflect_pad_matches_torch_reflect_padding():
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    padded = reflect_pad(images, 4)
    assert padded.dtype == torch.uint8 and padded.shape == (4, 3, 40, 40)
    assert torch.equal(padded, F.pad(images.float(), (4, 4, 4, 4), mode="reflect").to(torch.uint8))


def crops_of(padded_image, size):
    """Every crop of one padded image, with and without a horizontal flip: {(top, left, flipped): crop}."""
    h, w = padded_image.shape[1:]
    crops = {}
    for top in range(h - size + 1):
        for left in range(w - size + 1):
            crop = padded_image[:, top:top + size, left:left + size]
            crops[(top, left, False)], crops[(top, left, True)] = crop, crop.flip(2)
    return crops


def identify(image, padded_image, size=32):
    matches = [key for key, crop in crops_of(padded_image, size).items() if torch.equal(crop, image)]
    assert len(matches) == 1, f"output matches {len(matches)} crops of its padded image"
    return matches[0]


def test_every_output_is_one_crop_of_its_own_image_possibly_flipped():
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)  # random pixels: every crop is unique
    padded = reflect_pad(images, 4)
    out = random_crop_flip(padded, 32, torch.Generator().manual_seed(0))
    assert out.shape == (64, 3, 32, 32) and out.dtype == torch.uint8
    choices = [identify(out[i], padded[i]) for i in range(len(out))]
    tops, lefts, flips = zip(*choices)
    assert set(tops) <= set(range(9)) and set(lefts) <= set(range(9))
    # per-image randomness: the 64 images got many different offsets, and some but not all were flipped
    assert len(set(zip(tops, lefts))) > 30
    assert 10 < sum(flips) < 54


def test_flip_rate_is_one_half_and_offsets_are_uniform():
    padded = torch.arange(40, dtype=torch.uint8).repeat(20000, 1, 40, 1)  # pixel value = its column
    out = random_crop_flip(padded, 32, torch.Generator().manual_seed(1))
    first, last = out[:, 0, 0, 0].long(), out[:, 0, 0, -1].long()
    flipped = first > last
    assert abs(flipped.float().mean().item() - 0.5) < 0.02
    left = torch.where(flipped, last, first)
    counts = torch.bincount(left, minlength=9)
    assert len(counts) == 9 and (counts - 20000 / 9).abs().max() < 300


def test_same_generator_seed_gives_the_same_batch():
    padded = reflect_pad(torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8), 4)
    a = random_crop_flip(padded, 32, torch.Generator().manual_seed(5))
    b = random_crop_flip(padded, 32, torch.Generator().manual_seed(5))
    c = random_crop_flip(padded, 32, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_normalizer_standardizes_each_channel_and_uses_channels_last():
    mean, std = [0.2, 0.5, 0.8], [0.1, 0.2, 0.3]
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    x = Normalizer(mean, std, "cpu")(images)
    expected = (images.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(x, expected, atol=1e-5)
    assert x.is_contiguous(memory_format=torch.channels_last)


def test_offsets_cover_every_row_and_column_of_the_padding():
    """Rows too (the flip test reads only columns): a pixel's value is its row in one channel, its column in
    the other, so each crop's corner is read back."""
    rows, cols = torch.arange(40).view(40, 1).expand(40, 40), torch.arange(40).view(1, 40).expand(40, 40)
    padded = torch.stack([rows, cols]).to(torch.uint8).repeat(2000, 1, 1, 1)
    out = random_crop_flip(padded, 32, torch.Generator().manual_seed(2))
    top, left = out[:, 0, 0, :].min(1).values, out[:, 1, 0, :].min(1).values
    assert set(top.tolist()) == set(left.tolist()) == set(range(9))  # [0, 8]: 40 - 32 + 1 positions


def test_reflect_pad_is_torchs_reflection_on_any_shape():
    images = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)
    assert torch.equal(reflect_pad(images, 2), F.pad(images.float(), (2, 2, 2, 2), mode="reflect").to(torch.uint8))


def test_augmentation_makes_every_tensor_on_its_inputs_device():
    """On PyTorch's meta device (shapes without data), standing in for a GPU: an index or offset made on the
    CPU by default would not mix with the images."""
    meta, generator = torch.device("meta"), torch.Generator()
    images = torch.zeros(4, 3, 32, 32, dtype=torch.uint8, device=meta)
    padded = reflect_pad(images, 4)
    crops = random_crop_flip(padded, 32, generator)
    flipped = random_crop_flip(padded, 32, generator, flip=torch.ones(4, dtype=torch.bool, device=meta))
    normalize = Normalizer([0.5] * 3, [0.25] * 3, meta)
    x = normalize(crops)
    cut = cutout(x, 8, generator)
    for out, shape in [(padded, (4, 3, 40, 40)), (crops, (4, 3, 32, 32)), (flipped, (4, 3, 32, 32)),
                       (x, (4, 3, 32, 32)), (cut, (4, 3, 32, 32))]:
        assert out.device == meta and out.shape == shape
    assert normalize.scale.device == normalize.shift.device == meta and x.dtype == torch.float32
