"""Shared fixtures: a small synthetic CIFAR-10 archive in the official layout, served over HTTP on 127.0.0.1,
so the real download, checksum and extraction code runs without the internet; and the DVC repositories that
many tests start from, built once per test run."""
import functools
import hashlib
import http.server
import io
import pickle
import re
import tarfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from dvcrepo import copy_repo, dvc, make_repo, run, training_results

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# One colour per class, far apart: a tiny network tells them apart in a few epochs, and crops and flips
# (the study's augmentation) do not change what identifies a class.
PALETTE = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                    [145, 30, 180], [70, 240, 240], [240, 50, 230], [128, 128, 0], [0, 0, 128]])
TRAIN_PER_BATCH, TEST_IMAGES = 120, 200


def synthetic_images(n, rng):
    """n noisy 32x32 images, classes in turn: uint8 [n, 3072] in CIFAR's row layout (1024 R, 1024 G, 1024 B)."""
    labels = np.arange(n) % len(CLASSES)
    images = PALETTE[labels][:, :, None, None] + rng.normal(0, 40, size=(n, 3, 32, 32))
    return np.clip(images, 0, 255).astype(np.uint8).reshape(n, 3072), labels.tolist()


def build_archive(path, files=None, bytes_keys=False):
    """Write a .tar.gz in the official layout to `path` and return its md5. `files` maps names under
    cifar-10-batches-py/ to pickled objects (default: the full synthetic data set)."""
    if files is None:
        files = synthetic_batches()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, obj in files.items():
            if bytes_keys and isinstance(obj, dict):
                obj = {k.encode(): v for k, v in obj.items()}
            payload = obj if isinstance(obj, bytes) else pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    path.write_bytes(buffer.getvalue())
    return hashlib.md5(buffer.getvalue()).hexdigest()


def synthetic_batches(seed=0):
    rng = np.random.default_rng(seed)
    files = {}
    for i in range(1, 6):
        data, labels = synthetic_images(TRAIN_PER_BATCH, rng)
        files[f"data_batch_{i}"] = {"batch_label": f"training batch {i} of 5", "labels": labels, "data": data,
                                    "filenames": [f"img_{i}_{j}.png" for j in range(len(labels))]}
    data, labels = synthetic_images(TEST_IMAGES, rng)
    files["test_batch"] = {"batch_label": "testing batch 1 of 1", "labels": labels, "data": data,
                           "filenames": [f"test_{j}.png" for j in range(len(labels))]}
    files["batches.meta"] = {"label_names": CLASSES, "num_cases_per_batch": TRAIN_PER_BATCH, "num_vis": 3072}
    return files


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class _QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # a client that hangs up early (a HEAD probe, a failed download) is not the server's error


@pytest.fixture(scope="session")
def archive_dir(tmp_path_factory):
    """A folder holding cifar-10-python.tar.gz (the synthetic set) and its md5."""
    folder = tmp_path_factory.mktemp("mirror")
    md5 = build_archive(folder / "cifar-10-python.tar.gz")
    (folder / "md5.txt").write_text(md5)
    return folder


@pytest.fixture(scope="session")
def server_url(archive_dir):
    """Base URL of an HTTP server on 127.0.0.1 that serves archive_dir."""
    handler = functools.partial(_QuietHandler, directory=str(archive_dir))
    server = _QuietServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


@pytest.fixture(scope="session")
def archive(archive_dir, server_url):
    """(URL, md5) of the synthetic archive on the local HTTP server."""
    return f"{server_url}/cifar-10-python.tar.gz", (archive_dir / "md5.txt").read_text()



@dataclass
class Pipeline:
    """A test repository and what building it printed."""
    repo: Path
    output: str  # of the `dvc repro` that built it
    results: dict = None  # training_results of the baseline
    experiment: str = ""  # the name of the experiment on top, if any
    experiment_output: str = ""  # of its `dvc exp run`
    experiment_results: dict = None  # its training_results


@pytest.fixture(scope="session")
def data_repo(tmp_path_factory, archive):
    """This project in a git repository, on the synthetic archive with the tiny settings, its download and
    stats stages run and committed with their dvc.lock: where the DVC tests start. A test that changes a
    repository works on its own copy (dvcrepo.copy_repo)."""
    repo = make_repo(tmp_path_factory.mktemp("data-repo"), archive)
    output = dvc(repo, "repro", "stats")
    run(repo, "git", "add", "dvc.lock")
    run(repo, "git", "commit", "-qm", "data")
    return Pipeline(repo, output)


@pytest.fixture(scope="session")
def trained_repo(tmp_path_factory, data_repo):
    """data_repo with the rest of the pipeline run and committed (the baseline, HEAD), and one experiment on
    top (model.blocks=[1,1,1,1]), with what each training decided: the reference runs other tests compare
    with. The work tree is back at the baseline."""
    repo = copy_repo(data_repo.repo, tmp_path_factory.mktemp("trained-repo") / "repo")
    output = dvc(repo, "repro")
    baseline = training_results(repo)
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "baseline")
    experiment = dvc(repo, "exp", "run", "-S", "model.blocks=[1,1,1,1]")
    shallow = training_results(repo)
    run(repo, "git", "reset", "-q", "--hard")
    dvc(repo, "checkout", "--force")
    name = re.search(r"Ran experiment\(s\): (\S+)", experiment).group(1)
    return Pipeline(repo, output, baseline, name, experiment, shallow)
