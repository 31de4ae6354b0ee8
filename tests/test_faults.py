"""Faults at any scale, on 2 gloo processes on the CPU: a rank killed mid-epoch is restarted by torchrun
(system.max_restarts) and the run resumes from the last finished epoch to the uninterrupted result, bit for
bit; bad input stops the run before any rank starts; ranks end with their killed launcher; two nodes meet on
127.0.0.1, each with its own checkout (no shared file system), nodes that differ stop before any step, and a
stopped 2-node run resumes on both from the checkpoint node 0's rank 0 holds."""
import json
import os
import signal
import socket
import sys
import time

import psutil
import pytest
from deadlines import finish_all, kill_tree
from dvcrepo import (
    CHECKPOINT,
    copy_repo,
    dvc,
    finished_epochs,
    set_params,
    start,
    training_results,
    wait_for_epoch,
)

EPOCHS = 3  # the test repositories' train.epochs
TIMEOUT = 1200  # seconds: generous, for a loaded machine


@pytest.fixture(scope="module")
def two_processes(data_repo, tmp_path_factory):
    """The uninterrupted reference: one node, 2 processes, `python -m stages.train`; its training results."""
    repo = copy_repo(data_repo.repo, tmp_path_factory.mktemp("two_processes") / "repo")
    set_params(repo, train__nproc=2)
    code, output = finish(start(repo, sys.executable, "-m", "stages.train"))
    assert code == 0, output
    return training_results(repo)


def rank_process(launcher, rank=None):
    """The process of global rank `rank` (by default: any rank) among the launcher's children (torchrun's
    workers)."""
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if "LOCAL_RANK" in child.environ() and rank in (None, int(child.environ()["RANK"])):
                return child
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    raise AssertionError(f"no rank {rank} under process {launcher.pid}")


def finish(*processes, what="the train stage"):
    """[(exit status, stdout + stderr)] of processes start() began (the nodes of one run), or of the one: they must
    end within TIMEOUT s, else they are killed with their ranks and the test fails saying what it waited for."""
    ran = [(code, out + err) for code, out, err in finish_all(processes, TIMEOUT, what)]
    return ran if len(processes) > 1 else ran[0]


def test_a_rank_killed_mid_epoch_is_restarted_and_the_run_resumes_bit_for_bit(data_repo, two_processes, tmp_path):
    repo = copy_repo(data_repo.repo, tmp_path / "repo")
    set_params(repo, train__nproc=2, system__max_restarts=1)
    launcher = start(repo, sys.executable, "-m", "stages.train")
    epoch = wait_for_epoch(repo, launcher, timeout=TIMEOUT)
    rank_process(launcher, 1).kill()  # SIGKILL: no handler runs, the rank just vanishes mid-epoch
    code, output = finish(launcher)
    assert code == 0, output
    assert output.count("torchrun restarted the ranks after a failure (restart 1 of at most 1)") == 1, output
    resumed = [line for line in output.splitlines() if line.startswith("resuming from models/checkpoint.pt")]
    assert len(resumed) == 1 and int(resumed[0].split("after epoch ")[1].split("/")[0]) >= epoch, output
    assert training_results(repo) == two_processes
    assert not (repo / CHECKPOINT).exists()


def test_bad_input_stops_the_run_in_one_line_before_any_rank_starts(data_repo, tmp_path):
    """A bad batch file: the launcher reads every batch before it starts torchrun, so the run ends at once,
    in one line, though system.max_restarts allows 3 restarts (a rank that found it would be restarted)."""
    repo = copy_repo(data_repo.repo, tmp_path / "repo")
    set_params(repo, train__nproc=2, system__max_restarts=3)
    batch = repo / "data/cifar-10-batches-py/data_batch_3"
    batch.unlink()  # DVC may have linked it to its cache
    batch.write_bytes(b"not a pickle")
    code, output = finish(start(repo, sys.executable, "-m", "stages.train"))
    lines = output.strip().splitlines()
    assert code == 1 and len(lines) == 1, output
    assert lines[0].startswith("error: data/cifar-10-batches-py/data_batch_3: not a CIFAR-10 batch"), output


def alive(process):
    try:
        return process.status() != psutil.STATUS_ZOMBIE  # a zombie has ended: only its exit status is left
    except psutil.NoSuchProcess:
        return False


def test_ranks_end_within_seconds_when_their_launcher_is_killed_and_the_next_repro_resumes(data_repo, two_processes,
                                                                                           tmp_path):
    """SIGKILL of the launcher alone (torchrun starts each rank in a session of its own): its ranks end too,
    at once, not after training on (a tiny epoch takes seconds: the checkpoint must still hold the epoch of
    the kill), and `dvc repro` resumes from the checkpoint to the uninterrupted result."""
    repo = copy_repo(data_repo.repo, tmp_path / "repo")
    set_params(repo, train__nproc=2)
    launcher = start(repo, sys.executable, "-m", "stages.train")
    epoch = wait_for_epoch(repo, launcher, timeout=TIMEOUT)
    ranks = [rank_process(launcher, rank) for rank in range(2)]
    os.kill(launcher.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    try:
        while any(alive(rank) for rank in ranks) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(alive(rank) for rank in ranks), "a rank outlived its launcher by 10 s"
    finally:
        for rank in ranks:
            if alive(rank):
                rank.kill()
        finish(launcher, what="the killed launcher")
    assert finished_epochs(repo) == epoch < EPOCHS and not (repo / "models/model.pt").exists()
    output = dvc(repo, "repro", "train")
    assert f"resuming from models/checkpoint.pt after epoch {epoch}/{EPOCHS}" in output, output
    assert training_results(repo) == two_processes


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_node_repos(data_repo, folder):
    """Node 0's and node 1's checkouts (copies: they share no files), 1 process each, meeting on 127.0.0.1."""
    nodes = [copy_repo(data_repo.repo, folder / f"node{k}") for k in range(2)]
    port = free_port()
    for repo in nodes:
        set_params(repo, train__nproc=1, train__nnodes=2, system__master_addr="127.0.0.1", system__master_port=port)
    return nodes


def start_nodes(nodes):
    """Node 0 through DVC, node 1 by hand, as docs/distributed.md says. Two nodes on one machine share its
    cores: a thread each, as one node's 2 processes have (and the same thread count gives the same sums)."""
    one_core = {"OMP_NUM_THREADS": "1"}
    return (start(nodes[0], sys.executable, "-m", "dvc", "repro", "train", **one_core),
            start(nodes[1], sys.executable, "-m", "stages.train", "--node-rank", "1", **one_core))


@pytest.fixture(scope="module")
def two_nodes(data_repo, tmp_path_factory):
    nodes = two_node_repos(data_repo, tmp_path_factory.mktemp("two_nodes"))
    ran = finish(*start_nodes(nodes), what="the two nodes' train stages")
    return nodes, ran


def test_two_nodes_on_loopback_train_the_model_of_one_node_with_two_processes(two_nodes, two_processes):
    (node0, node1), ran = two_nodes
    for code, output in ran:
        assert code == 0, output
    assert "Running stage 'train'" in ran[0][1] and "2 processes" in ran[0][1]
    # the same ranks, shards and gradients as one node's 2 processes: the same model, bit for bit
    assert training_results(node0) == two_processes
    assert not (node1 / "models/model.pt").exists()  # only the main rank, on node 0, writes


def test_a_stopped_two_node_run_resumes_on_both_nodes(data_repo, two_nodes, tmp_path):
    """Both nodes killed after an epoch, then started again: node 1 has no checkpoint of its own, so its rank
    resumes from the state node 0's main rank sends it over the process group."""
    nodes = two_node_repos(data_repo, tmp_path)
    processes = start_nodes(nodes)
    wait_for_epoch(nodes[0], *processes, timeout=TIMEOUT)
    for process in processes:
        kill_tree(process)  # a lost node: its launcher and its ranks
    finish(*processes, what="the killed nodes")
    epoch = finished_epochs(nodes[0])
    assert 1 <= epoch < EPOCHS and not (nodes[1] / CHECKPOINT).exists(), epoch
    ran = finish(*start_nodes(nodes), what="the two nodes' train stages")
    for code, output in ran:
        assert code == 0, output
    assert f"resuming from models/checkpoint.pt after epoch {epoch}/{EPOCHS}" in ran[0][1], ran[0][1]
    assert training_results(nodes[0]) == training_results(two_nodes[0][0])


def test_a_rank_killed_on_node_1_restarts_both_nodes_and_the_run_resumes_bit_for_bit(data_repo, two_processes,
                                                                                      tmp_path):
    """The c10d rendezvous gathers both nodes' agents into a new round: node 0's rank restarts too, and both
    resume from the state node 0's rank sends."""
    nodes = two_node_repos(data_repo, tmp_path)
    processes = start_nodes(nodes)
    wait_for_epoch(nodes[0], *processes, timeout=TIMEOUT)
    rank_process(processes[1]).kill()  # node 1's only rank, whichever global rank it drew
    ran = finish(*processes, what="the two nodes' train stages")
    for code, output in ran:
        assert code == 0, output
    assert "torchrun restarted the ranks after a failure" in ran[0][1], ran[0][1]
    assert "resuming from models/checkpoint.pt after epoch " in ran[0][1], ran[0][1]
    assert training_results(nodes[0]) == two_processes


def test_nodes_that_differ_stop_before_any_step_in_one_line_naming_the_node_and_what_differs(data_repo, tmp_path):
    """Node 1's data/stats.json edited (a stale or other copy of the data): the ranks compare their fingerprints
    when the group forms, and both nodes end with the same line, at once, though restarts are allowed."""
    nodes = two_node_repos(data_repo, tmp_path)
    for repo in nodes:
        set_params(repo, system__max_restarts=3)
    stats = nodes[1] / "data/stats.json"
    edited = json.loads(stats.read_text())
    edited["mean"][0] += 0.01
    stats.unlink()  # DVC may have linked it to its cache
    stats.write_text(json.dumps(edited))
    ran = finish(*start_nodes(nodes), what="the two nodes' train stages")
    line = ("error: node 1 differs from node 0 in data/stats.json: every node needs the same checkout, params, "
            "data and versions of torch, CUDA and cuDNN (docs/distributed.md)")
    for code, output in ran:
        assert code != 0 and output.splitlines().count(line) == 1, output
        assert "torchrun restarted" not in output and "epoch 1/" not in output, output
    assert ran[1][0] == 1 and ran[1][1].strip().splitlines()[-1] == line  # node 1's own stage: its last line
    assert not (nodes[0] / CHECKPOINT).exists() and not (nodes[0] / "models/model.pt").exists()
