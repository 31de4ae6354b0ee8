"""Classifying the user's own images with the trained model (tools.predict): PNG or JPEG files of any size and
mode, each turned into what the model was trained on, a 32x32 RGB image, then scored in batches."""
from pathlib import Path

import torch
from PIL import Image, ImageOps
from tqdm import tqdm

from .runtime import BATCH_SIZE
from .workspace import UserError

SUFFIXES = {".png", ".jpg", ".jpeg"}
SIZE = (32, 32)


def find_images(paths):
    """The image files `paths` name: a file as given, a folder's PNG and JPEG files (at any depth, sorted). A
    missing path or a folder without images is an error."""
    found = []
    for path in map(Path, paths):
        if path.is_dir():
            images = sorted(p for p in path.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file())
            if not images:
                raise UserError(f"{path}: no PNG or JPEG images in this folder")
            found += images
        elif path.exists():
            found.append(path)
        else:
            raise UserError(f"{path}: no such file or folder")
    return found


def read_image(path):
    """uint8 [3, 32, 32]: the image in RGB (alpha and palettes dropped, EXIF rotation applied), resized with
    Pillow's antialiasing filter (a downscale averages every source pixel; a 32x32 image stays as it is)."""
    try:
        with Image.open(path) as image:
            if image.format not in ("PNG", "JPEG"):
                raise UserError(f"{path}: a {image.format} image; PNG or JPEG expected")
            image = ImageOps.exif_transpose(image).convert("RGB").resize(SIZE, Image.Resampling.LANCZOS)
    except (OSError, ValueError, Image.DecompressionBombError) as e:  # unreadable, truncated, not an image
        raise UserError(f"{path}: not a readable PNG or JPEG image ({' '.join(str(e).split())})")
    return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(*SIZE, 3).permute(2, 0, 1)


def classify(files, model, top, on_error):
    """Yield (file, [(class, probability)] of the `top` most probable classes) per readable file, in order,
    `model` (cifar.runtime) scoring BATCH_SIZE images at once, equally probable classes in the model's order
    (the first is the evaluate stage's class); each unreadable file goes to on_error(UserError) and is skipped.
    A progress bar on stderr when there is more than one batch."""
    top = min(top, len(model.classes))
    with tqdm(total=len(files), unit="image", disable=len(files) <= BATCH_SIZE, leave=False) as progress:
        for start in range(0, len(files), BATCH_SIZE):
            readable, images = [], []
            for path in files[start:start + BATCH_SIZE]:
                try:
                    images.append(read_image(path))
                    readable.append(path)
                except UserError as e:
                    on_error(e)
            if images:
                logits = model.logits(torch.stack(images))
                # ties (bf16 rounds nearby logits to one value) in the classes' order, as the evaluate stage's
                # argmax breaks them: topk would order them as it pleases
                indices = logits.sort(dim=1, descending=True, stable=True).indices[:, :top]
                values = logits.softmax(1).gather(1, indices)
                for path, p, i in zip(readable, values.tolist(), indices.tolist()):
                    yield path, [(model.classes[c], v) for c, v in zip(i, p)]
            progress.update(len(files[start:start + BATCH_SIZE]))
