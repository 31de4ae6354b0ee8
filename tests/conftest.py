"""Shared fixtures: a small synthetic CIFAR-10 archive in the official layout, served over HTTP on 127.0.0.1,
so the real download, checksum and extraction code runs without the internet; and the DVC repositories that
many tests start from, built once per test run."""
import functools
import hashlib
import http.server
import importlib
import inspect
import io
import pickle
import signal
import tarfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from dvcrepo import (
    copy_repo,
    dvc,
    experiment_refs,
    experiment_results,
    make_repo,
    module,
    queue_states,
    run,
    start_workers,
    stop_queue,
    training_results,
    wait_for_experiments,
)

# A suite started in the background by a shell without job control (`python -m pytest &`) inherits SIGINT
# ignored, and so would every command it starts: the tests that press Ctrl-C (signal a process group with
# SIGINT, as a terminal does) need it handled, as in a terminal. A handled signal is reset to the default
# in each command the suite starts, so Python's own Ctrl-C handling returns there too.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

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
class Ran:
    """What a stage's entry point did: its exit status and output."""
    code: int
    out: str
    err: str

    @property
    def output(self):
        return self.out + self.err


@pytest.fixture
def stage(monkeypatch, capsys):
    """`python -m stages.<name> args` in a folder, run in this process through the same entry point
    (workspace.command around the stage's main): what the subprocess would run, without starting Python and
    torch again. Returns a Ran. Each kind of stage runs as its own process too, elsewhere in the tests."""
    from cifar.workspace import command

    def call(folder, name, *args):
        main = importlib.import_module(name if "." in name else f"stages.{name}").main
        monkeypatch.chdir(folder)
        capsys.readouterr()
        try:
            command(main, *([list(args)] if inspect.signature(main).parameters else []))  # never pytest's argv
            code = 0
        except SystemExit as e:
            code = e.code
        captured = capsys.readouterr()
        return Ran(code, captured.out, captured.err)
    return call


@dataclass
class Pipeline:
    """A test repository and what building it printed and trained."""
    repo: Path
    output: str  # of the `dvc repro` that built it
    results: dict = None  # training_results of the run, if it trained


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
    """data_repo with the rest of the pipeline run by `dvc repro` and committed (the baseline, HEAD), and what
    that training decided: the reference the queued, resumed and restarted runs of the same params must match."""
    repo = copy_repo(data_repo.repo, tmp_path_factory.mktemp("trained-repo") / "repo")
    output = dvc(repo, "repro")
    results = training_results(repo)
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "baseline")
    return Pipeline(repo, output, results)


# Two variants of trained_repo's baseline (its params.yaml, widths [8, 16, 32, 64], 3 epochs, seed 0, is the
# study the sweep varies): one changes the weight decay alone (1e-4 -> 5e-4), the other the blocks alone
SWEPT = ["wd-5e-4", "blocks-1111"]
SWEEP = ["--only", *SWEPT]


@dataclass
class Swept:
    """A copy of trained_repo in which `python -m tools.sweep` queued two tiny variants and `dvc queue start
    -j 2` ran them, both at once."""
    repo: Path
    code: int  # the sweep's exit status
    output: str  # and output
    queued: dict  # {name: state} after queueing
    finished: dict  # and after the run
    started: str  # what `dvc queue start` said
    results: dict  # {name: training_results} of each experiment


@pytest.fixture(scope="session")
def swept(trained_repo, tmp_path_factory):
    repo = copy_repo(trained_repo.repo, tmp_path_factory.mktemp("swept") / "repo")
    code, output = module(repo, "tools.sweep", *SWEEP)
    queued = queue_states(repo)
    try:
        started = start_workers(repo, repo.parent / "queue-start.log", jobs=2)
        wait_for_experiments(repo, SWEPT)
    finally:
        stop_queue(repo)
    refs = experiment_refs(repo)
    return Swept(repo, code, output, queued, queue_states(repo), started,
                 {name: experiment_results(repo, refs[name]) for name in SWEPT})
