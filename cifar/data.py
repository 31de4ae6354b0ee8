"""CIFAR-10 in its official python layout: fetching the archive, reading the batches, channel statistics.

torchvision.datasets.CIFAR10 checks the official per-file md5s and so rejects mirrors and test archives;
the batches are read here instead, with torchvision's download and checksum utilities, and extracted by
tarfile, every member checked first (torchvision's extract_archive writes wherever a member's name points)."""
import http.client
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.error
import zlib
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np
import torch
from pydantic import ConfigDict

from .params import Section, integer, text
from .workspace import UserError


class DataParams(Section):
    """The `data` section: where the CIFAR-10 archive comes from (download reads it)."""
    section = "data"
    url: text()
    md5: text(r"^[0-9a-fA-F]{32}$", "an md5 checksum of 32 hex digits")


class SplitParams(Section):
    """The one key of the `train` section that decides which images are trained on, as the stats stage reads it
    (training.Recipe checks the whole section, for the train stage)."""
    model_config = ConfigDict(extra="ignore")  # the section's other keys are the train stage's
    section = "train"
    validation_images: integer(0)


ARCHIVE_FOLDER = "cifar-10-batches-py"  # the one folder the official archive holds
SPLITS = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
META_FILE = "batches.meta"
EXPECTED_FILES = [*SPLITS["train"], *SPLITS["test"], META_FILE]
IMAGE_SHAPE = (3, 32, 32)


def _local_path(url):
    """The file a local path or file:// URL names, or None for a remote URL."""
    try:
        parsed = urlparse(url)
    except ValueError as e:  # e.g. an unclosed [IPv6] host
        raise UserError(f"data.url {url!r} is malformed: {e}")
    if parsed.scheme == "file":
        return Path(url2pathname(parsed.path))
    if parsed.scheme in ("", *"abcdefghijklmnopqrstuvwxyz"):  # a plain path (a one-letter scheme is a drive)
        return Path(url).expanduser()
    if parsed.scheme in ("http", "https", "ftp"):
        if not parsed.hostname:
            raise UserError(f"data.url {url!r} is malformed: no host")
        return None
    raise UserError(f"data.url {url!r}: unsupported scheme '{parsed.scheme}'; use http(s)://, file:// or a local path")


def _fetch(url, workdir):
    """Path of the archive `url` names: downloaded into `workdir` (with a progress bar) or a local file as is."""
    from torchvision.datasets.utils import download_url  # torchvision takes 1.5 s to import: only download needs it

    path = _local_path(url)
    if path is not None:
        if not path.is_file():
            raise UserError(f"data.url {url!r}: no such file")
        return path
    try:
        download_url(url, workdir, filename="archive.tar.gz")
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise UserError(f"data.url {url!r} could not be downloaded: {reason}; to use a copy of the archive "
                        "fetched elsewhere, point data.url at its local path (in params.yaml, or "
                        "dvc exp run -S data.url=PATH)")
    return Path(workdir) / "archive.tar.gz"


def download(url, md5, dest_dir):
    """Fetch the archive at `url`, check its md5, extract it and check its layout; only then move
    `cifar-10-batches-py/` into `dest_dir`. On any failure nothing is left in `dest_dir`."""
    from torchvision.datasets.utils import calculate_md5

    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / ARCHIVE_FOLDER
    workdir = Path(tempfile.mkdtemp(prefix=".download-", dir=dest_dir))  # same file system: the move is a rename
    try:
        archive = _fetch(url, workdir)
        actual = calculate_md5(archive)
        if actual != md5.lower():
            raise UserError(f"data.url {url!r}: md5 is {actual}, but data.md5 is {md5}")
        extracted = workdir / "extracted"
        extract(archive, extracted, url)
        check_layout(extracted / ARCHIVE_FOLDER, source=url)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(extracted / ARCHIVE_FOLDER, target)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return target


FILTER_ERROR = getattr(tarfile, "FilterError", ())  # the 'data' filter's error; () where tarfile has no filters


def extract(archive, folder, url):
    """Extract the .tar.gz `archive` into `folder` once every member is checked: a plain file or folder, inside
    `folder`. Else a one-line error names the first other one, and nothing is extracted: data.url may be any
    file whose md5 the user sets, and tarfile alone writes a member named ../x or /x, or one reached through a
    link it extracted, outside the folder (CVE-2007-4559). tarfile's own 'data' filter (Python 3.11.4 and
    newer) checks again as it extracts, and drops permission bits no data file needs."""
    folder = Path(folder).resolve()
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()  # all of them, before anything is written
            for member in members:
                if (refused := refusal(member, folder)) is not None:
                    raise UserError(f"data.url {url!r}: refused the archive's member {member.name!r}: {refused}; "
                                    f"a CIFAR-10 archive holds plain files and folders only")
            tar.extractall(folder, members, **({"filter": "data"} if FILTER_ERROR else {}))
    except FILTER_ERROR as e:  # what the 'data' filter refuses and refusal() does not (none known)
        raise UserError(f"data.url {url!r}: refused the archive's member {e.tarinfo.name!r}: {e}")
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise UserError(f"data.url {url!r}: not a readable .tar.gz archive ({' '.join(str(e).split())})")


def refusal(member, folder):
    """Why the tar `member` must not be extracted into `folder` (absolute), or None."""
    if member.issym() or member.islnk():
        return f"a {'symbolic' if member.issym() else 'hard'} link (to {member.linkname!r})"
    if not (member.isfile() or member.isdir()):
        return "a device file, pipe or other special file"
    if os.path.isabs(member.name):
        return "an absolute path"
    if not Path(os.path.normpath(folder / member.name)).is_relative_to(folder):
        return "it would land outside the folder it is extracted to"
    return None


# The globals a batch's pickle may name: numpy's array reconstruction (numpy.core before numpy 2; _frombuffer in
# protocol 5) and _codecs.encode, which a protocol-2 pickle written by Python 3 spells bytes with
BATCH_GLOBALS = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
                 *((f"numpy.{core}.{module}", name) for core in ("core", "_core")
                   for module, name in [("multiarray", "_reconstruct"), ("numeric", "_frombuffer")])}


class _BatchUnpickler(pickle.Unpickler):
    """Refuses every global but BATCH_GLOBALS: unpickling calls what the file names, and data.url may be any file
    whose md5 the user sets."""

    def __init__(self, file, path):
        super().__init__(file, encoding="latin1")
        self.path = path

    def find_class(self, module, name):
        if (module, name) not in BATCH_GLOBALS:
            raise UserError(f"{self.path}: refused to unpickle {module}.{name}: a CIFAR-10 batch holds only dicts, "
                            "lists, strings, bytes, numbers and numpy arrays")
        return super().find_class(module, name)


def _unpickle(path):
    """A pickled dict; its keys as str whether it was written with str keys or (as some copies are) bytes."""
    with open(path, "rb") as f:
        d = _BatchUnpickler(f, path).load()
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


def read_batch(path):
    """One pickled batch -> (uint8 images [N, 3, 32, 32], int64 labels [N])."""
    try:
        batch = _unpickle(path)
        data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, *IMAGE_SHAPE)
        labels = np.asarray(batch["labels"], dtype=np.int64)
    except FileNotFoundError:
        raise UserError(f"{path}: missing; run the download stage first (dvc repro download)")
    except UserError:
        raise
    except Exception as e:  # unpickling a foreign file can raise nearly anything
        raise UserError(f"{path}: not a CIFAR-10 batch (a pickled dict with 'data' N x 3072 and 'labels'): {e}")
    if len(labels) != len(data) or (len(labels) and not 0 <= labels.min() <= labels.max() < 10):
        raise UserError(f"{path}: {len(data)} images but {len(labels)} labels, or labels outside 0-9")
    return torch.from_numpy(data), torch.from_numpy(labels)


def check_layout(batches_dir, source):
    missing = [name for name in EXPECTED_FILES if not (Path(batches_dir) / name).is_file()]
    if missing:
        raise UserError(f"{source}: archive lacks {ARCHIVE_FOLDER}/{', '.join(missing)} (expected the official "
                        "CIFAR-10 python layout)")
    for split in SPLITS:
        load_split(batches_dir, split)
    read_classes(batches_dir)


def load_split(batches_dir, split):
    """All images and labels of 'train' or 'test' as two tensors (uint8 [N, 3, 32, 32], int64 [N])."""
    images, labels = zip(*(read_batch(Path(batches_dir) / name) for name in SPLITS[split]))
    return torch.cat(images), torch.cat(labels)


SPLIT_SEED = 0  # the held-out images are the same for every train.seed: variants and seeds compare on them


def hold_out(labels, n, num_classes, seed=SPLIT_SEED):
    """(kept, held_out) indices of the training images: n held out, stratified by class (n // C of each, one
    more of the first n % C classes), drawn once by a fixed seed, so the same n always holds out the same
    images; both sorted, in file order."""
    generator = torch.Generator().manual_seed(seed)
    held = []
    for c in range(num_classes):
        members = torch.nonzero(labels == c).flatten()
        quota = n // num_classes + (c < n % num_classes)
        if quota >= len(members):
            raise UserError(f"train.validation_images = {n} holds out {quota} images of class {c}, which has only "
                            f"{len(members)} training images; hold out fewer")
        held.append(members[torch.randperm(len(members), generator=generator)[:quota]])
    held = torch.cat(held).sort().values
    kept = torch.ones(len(labels), dtype=torch.bool)
    kept[held] = False
    return torch.nonzero(kept).flatten(), held


def training_split(batches_dir, validation_images, num_classes):
    """((images, labels) trained on, (images, labels) held out, or None): the training batches, with
    `validation_images` > 0 of them held out by hold_out. What the train stage trains on and the stats stage
    normalizes by: the held-out images shape neither."""
    images, labels = load_split(batches_dir, "train")
    if not validation_images:
        return (images, labels), None
    kept, held = hold_out(labels, validation_images, num_classes)
    return (images[kept], labels[kept]), (images[held], labels[held])


def read_classes(batches_dir):
    path = Path(batches_dir) / META_FILE
    try:
        names = _unpickle(path)["label_names"]
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{path}: not a CIFAR-10 batches.meta with 'label_names': {e}")
    if len(names) != 10:
        raise UserError(f"{path}: expected 10 label_names, found {len(names)}")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def channel_stats(images):
    """Per-channel mean and population std over every pixel of uint8 images [N, 3, H, W], scaled to [0, 1].
    Exact: from a histogram of the 256 byte values per channel, so no float sums drift on 51M pixels."""
    values = torch.arange(256, dtype=torch.float64)
    mean, std = [], []
    for c in range(images.shape[1]):
        counts = torch.bincount(images[:, c].reshape(-1), minlength=256).double()
        n = counts.sum()
        m = (counts * values).sum() / n
        var = (counts * (values - m) ** 2).sum() / n
        mean.append(m.item() / 255)
        std.append(var.sqrt().item() / 255)
    return mean, std
