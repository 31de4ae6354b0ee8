"""Several processes (DistributedDataParallel, gloo on the CPU): the shards, the crops, the launcher's command
line, one step on 2 processes with half the batch each against 1 process with the whole batch, and the EMA's
BatchNorm pass shared out over 2 processes against 1 process."""
import sys

import pytest
import torch
import torch.distributed as dist
from deadlines import spawn
from dvcrepo import call, copy_repo, dvc, read_json, run, set_params, stages_run
from recipes import changed, recipe, system
from test_pipeline import OUTPUTS
from torch import nn

from cifar.augment import random_crop_flip, reflect_pad
from cifar.distributed import Context, GroupStop, check, check_nodes_agree, differences, node_rank, shard, torchrun_args
from cifar.model import ResNet
from cifar.training import Data, ema_batchnorm, make_trainer, train_epoch
from cifar.workspace import UserError

TRAIN = recipe(epochs=1, batch_size=50, precision="fp32", nproc=2)
SYSTEM = system()
CPU = torch.device("cpu")
GPUS = torch.cuda.device_count()
SPAWN_S = 300  # 2 ranks of a tiny model: seconds, unless one waits on a peer that is gone


def test_shards_cover_the_batch_in_order_and_differ_by_at_most_one():
    for n, world in [(50, 2), (51, 2), (7, 3), (400, 8), (1, 2), (3, 4)]:
        parts = [shard(n, rank, world) for rank in range(world)]
        assert [i for part in parts for i in range(n)[part]] == list(range(n))
        sizes = [part.stop - part.start for part in parts]
        assert max(sizes) - min(sizes) <= 1, (n, world, sizes)
    assert shard(51, 0, 2) == slice(0, 25) and shard(51, 1, 2) == slice(25, 51)


def test_a_rank_crops_its_part_exactly_as_one_process_crops_the_whole_batch():
    padded = reflect_pad(torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8), 4)
    whole = random_crop_flip(padded, 32, torch.Generator().manual_seed(3))
    for part in [slice(0, 5), slice(5, 10), slice(3, 4)]:
        mine = random_crop_flip(padded[part], 32, torch.Generator().manual_seed(3), part.start, len(padded))
        assert torch.equal(mine, whole[part])


def test_torchrun_command_lines_for_one_node_and_for_several():
    assert torchrun_args(TRAIN, SYSTEM, 0, "stages.train") == ["--nproc-per-node=2", "--max-restarts=3",
                                                               "--standalone", "-m", "stages.train"]
    nodes, meeting = changed(TRAIN, nproc=8, nnodes=2), changed(SYSTEM, master_addr="10.0.0.1", master_port=29400,
                                                                max_restarts=0)
    assert torchrun_args(nodes, meeting, 1, "stages.train") == [
        "--nproc-per-node=8", "--max-restarts=0", "--nnodes=2", "--rdzv-backend=c10d", "--rdzv-id=cifar10-resnet",
        "--rdzv-endpoint=10.0.0.1:29400", "--rdzv-conf=is_host=0", "-m", "stages.train", "--node-rank=1"]
    assert "--rdzv-conf=is_host=1" in torchrun_args(nodes, meeting, 0, "stages.train")  # node 0 hosts it


def test_node_rank_comes_from_the_command_line_and_must_name_a_node():
    nodes = changed(TRAIN, nnodes=3)
    assert node_rank([], nodes) == 0 and node_rank(["--node-rank", "2"], nodes) == 2
    with pytest.raises(UserError, match=r"--node-rank 3: must be 0 to 2 \(train.nnodes = 3\)"):
        node_rank(["--node-rank", "3"], nodes)


def test_sync_bn_on_several_cpu_processes_is_an_error_before_any_process_starts():
    with pytest.raises(UserError, match="train.sync_bn = True .* needs CUDA GPUs"):
        check(changed(TRAIN, sync_bn=True), CPU)
    check(TRAIN, CPU)
    check(changed(TRAIN, nproc=1, sync_bn=True), CPU)  # one process: SyncBatchNorm is never used


class FrozenStatisticsResNet(ResNet):
    """The project's ResNet with its BatchNorms normalizing by their running statistics in training too:
    every image's gradient then depends on that image alone, so a batch split over ranks must give exactly
    the whole batch's gradient. (With batch statistics, it would only with SyncBatchNorm, which needs CUDA.)"""

    def train(self, mode=True):
        super().train(mode)
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()
        return self


def data(n):
    """n random uint8 images and labels."""
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=generator)
    return images, torch.randint(0, 10, (n,), generator=generator)


def train_steps(n, rank, world_size, device=CPU, model_class=FrozenStatisticsResNet, sync_bn=False, precision="fp32"):
    """An epoch of the training engine over n images (at most one batch: one step): (loss, accuracy, weights,
    gradients) on the host."""
    torch.manual_seed(0)
    recipe, context = changed(TRAIN, sync_bn=sync_bn, precision=precision), Context(device, rank, world_size)
    # 10 steps per epoch for OneCycle: the first step at its initial rate
    trainer = make_trainer(model_class([1, 1, 1, 1], [8, 16, 32, 64]), recipe, context, False, 10 * TRAIN.batch_size)
    images, labels = data(n)
    data_set = Data.on_device((images, labels), (images[:1], labels[:1]), {"mean": [0.5] * 3, "std": [0.25] * 3},
                              device)
    loss, acc = train_epoch(trainer, data_set, recipe, context)
    return (loss.item(), acc.item(), {k: v.cpu().clone() for k, v in trainer.model.state_dict().items()},
            {k: p.grad.cpu().clone() for k, p in trainer.model.named_parameters()})


def rank_main(rank, store, out, cuda):
    if cuda:  # NCCL, a GPU per rank, true fp32
        torch.cuda.set_device(rank)
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.deterministic = True
    torch.set_num_threads(1)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        if cuda:
            results = [train_steps(50, rank, 2, torch.device("cuda", rank), ResNet, sync_bn=True)]
        else:
            results = [train_steps(n, rank, 2) for n in (50, 1)] + [train_steps(50, rank, 2, precision="fp16")]
    finally:
        dist.destroy_process_group()
    if rank == 0:
        torch.save(results, out)


def ema_statistics(n, context, batch_size=20, sync_bn=False):
    """ema_batchnorm over n random images in batches of batch_size, on this context's share: (the EMA's
    BatchNorm buffers, the images each forward pass took)."""
    torch.manual_seed(0)
    recipe = changed(TRAIN, batch_size=batch_size, ema_decay=0.6, sync_bn=sync_bn)
    trainer = make_trainer(ResNet([1, 1, 1, 1], [8, 16, 32, 64]), recipe, context, False, n)
    images, labels = data(n)
    data_set = Data.on_device((images, labels), (images[:1], labels[:1]), {"mean": [0.5] * 3, "std": [0.25] * 3},
                              context.device)
    seen = []
    trainer.ema.module.register_forward_hook(lambda module, args, output: seen.append(len(args[0])))
    ema_batchnorm(trainer, data_set, recipe, context)
    buffers = {k: v.cpu().clone() for k, v in trainer.ema.module.state_dict().items()
               if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    return buffers, seen


def ema_rank_main(rank, store, folder, cuda=False):
    torch.set_num_threads(1)
    if cuda:  # both ranks on one GPU, through gloo (NCCL wants a GPU each), in true fp32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        found = ema_statistics(130, Context(torch.device("cuda", 0) if cuda else CPU, rank, 2), sync_bn=cuda)
    finally:
        dist.destroy_process_group()
    torch.save(found, f"{folder}/ema{rank}.pt")


def test_the_ema_s_batchnorm_pass_is_shared_out_and_gives_one_process_s_statistics(tmp_path):
    """130 images in 7 batches (the last of 10): rank 0 takes 3 batches, rank 1 the other 4, and the combined
    statistics are those one process computes over all 7 (update_bn's average of the batches' own)."""
    spawn(ema_rank_main, (str(tmp_path / "store"), str(tmp_path)), 2, SPAWN_S, "the EMA's BatchNorm pass")
    ranks = [torch.load(tmp_path / f"ema{rank}.pt") for rank in range(2)]
    one, seen = ema_statistics(130, Context(CPU))
    assert seen == [20] * 6 + [10]
    assert [r[1] for r in ranks] == [[20] * 3, [20] * 3 + [10]]  # each rank its share, once
    for buffers, _ in ranks:
        assert_close(buffers, one, atol=1e-5)
        assert all(torch.equal(buffers[k], one[k]) for k in one if k.endswith("num_batches_tracked"))
    assert one["stem.1.num_batches_tracked"] == 7


@pytest.mark.skipif(GPUS < 1, reason="needs a CUDA GPU (SyncBatchNorm)")
def test_with_sync_bn_each_rank_takes_its_slice_of_every_batch_and_the_statistics_are_one_process_s(tmp_path,
                                                                                                      monkeypatch):
    for module in [torch.backends.cudnn, torch.backends.cuda.matmul]:  # true fp32, as in the ranks
        monkeypatch.setattr(module, "allow_tf32", False)
    spawn(ema_rank_main, (str(tmp_path / "store"), str(tmp_path), True), 2, SPAWN_S, "the EMA's BatchNorm pass")
    ranks = [torch.load(tmp_path / f"ema{rank}.pt") for rank in range(2)]
    one, _ = ema_statistics(130, Context(torch.device("cuda", 0)))
    assert [r[1] for r in ranks] == [[10] * 6 + [5]] * 2  # half of every batch each
    for buffers, _ in ranks:
        assert_close(buffers, one, atol=1e-5)


def test_differences_name_the_parts_and_files_two_fingerprints_differ_in():
    a = {"params": "p", "device": "cpu", "data": {"data/stats.json": "s", "data/b": "b"},
         "code": {"cifar/fit.py": "f"}}
    b = {**a, "params": "q", "data": {"data/stats.json": "t", "data/b": "b"},
         "code": {"cifar/fit.py": "f", "new.py": "n"}}
    assert differences(a, b) == ["data/stats.json", "new.py", "params"]
    assert differences(a, dict(a)) == []
    versions = {"torch": "2.14.1", "cuda": "13.0", "cudnn": 91000}
    assert differences({**a, "versions": versions}, {**a, "versions": {**versions, "torch": "2.13.0"}}) == [
        "torch version"]


def test_nodes_with_other_versions_of_torch_cuda_or_cudnn_are_refused_naming_them():
    """As any other difference of their fingerprints (resume.fingerprint holds the versions): the ranks' stop,
    before any step, names the node and the libraries."""
    versions = {"torch": "2.14.1", "cuda": "13.0", "cudnn": 91000}
    ranks = [{"node": node, "first": True, "fingerprint": {"params": "p", "versions": versions}} for node in (0, 1)]
    check_nodes_agree(ranks, 0)  # the same: they train together
    ranks[1]["fingerprint"] = {"params": "p", "versions": {**versions, "torch": "2.13.0", "cudnn": 90100}}
    with pytest.raises(GroupStop, match=r"^node 1 differs from node 0 in cudnn version, torch version: every node "
                                        r"needs the same checkout, params, data and versions of torch, CUDA and cuDNN "
                                        r"\(docs/distributed.md\)$"):
        check_nodes_agree(ranks, 0)


def spawn_two_ranks(folder, cuda):
    spawn(rank_main, (str(folder / "store"), str(folder / "out.pt"), cuda), 2, SPAWN_S, "one step on 2 processes")
    return torch.load(folder / "out.pt")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """On 2 gloo processes: one step on 50 images (25 each), and one on a single image (rank 0 gets none, as
    in a last batch smaller than the world)."""
    return spawn_two_ranks(tmp_path_factory.mktemp("ddp"), cuda=False)


def assert_close(a, b, atol):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), rtol=0, atol=atol), \
            f"{key}: max difference {(a[key].float() - b[key].float()).abs().max():.3g}"


def test_one_step_on_two_processes_with_half_the_batch_each_equals_one_process_with_the_whole_batch(two_ranks):
    loss, acc, weights, grads = two_ranks[0]
    one_loss, one_acc, one_weights, one_grads = train_steps(50, 0, 1)
    assert loss == pytest.approx(one_loss, rel=1e-6) and acc == pytest.approx(one_acc)
    assert_close(grads, one_grads, atol=1e-7)  # the averaged, clipped gradients of the global batch's mean loss
    assert_close(weights, one_weights, atol=1e-6)
    torch.manual_seed(0)
    initial = FrozenStatisticsResNet([1, 1, 1, 1], [8, 16, 32, 64]).state_dict()
    assert all((weights[k] - initial[k]).abs().max() > 1e-4 for k in grads), "a parameter the step left alone"


@pytest.mark.skipif(GPUS < 2, reason=f"needs 2 CUDA GPUs (NCCL, SyncBatchNorm); this machine has {GPUS}")
def test_with_sync_bn_one_step_of_the_real_model_on_two_gpus_equals_one_gpu_with_the_whole_batch(tmp_path,
                                                                                                   monkeypatch):
    """BatchNorm in training mode, its statistics over both ranks' images (SyncBatchNorm) against one GPU's
    plain BatchNorm over the whole batch."""
    for module, name, value in [(torch.backends.cudnn, "allow_tf32", False), (torch.backends.cuda.matmul, "allow_tf32",
                                 False), (torch.backends.cudnn, "deterministic", True)]:  # true fp32, repeatable
        monkeypatch.setattr(module, name, value)
    loss, acc, weights, grads = spawn_two_ranks(tmp_path, cuda=True)[0]
    one_loss, one_acc, one_weights, one_grads = train_steps(50, 0, 1, torch.device("cuda", 0), ResNet)
    assert loss == pytest.approx(one_loss, rel=1e-5) and acc == pytest.approx(one_acc)
    assert_close(grads, one_grads, atol=1e-6)
    assert_close(weights, one_weights, atol=1e-5)  # running statistics included


def test_fp16_with_loss_scaling_on_two_processes_steps_as_one_process_does(two_ranks):
    """The loss scale multiplies every rank's loss alike, so the all-reduced gradients unscale to the global
    batch's, and clipping and the step see the same values on every rank (fp16 rounding aside)."""
    loss, acc, _, grads = two_ranks[2]
    one_loss, one_acc, _, one_grads = train_steps(50, 0, 1, precision="fp16")
    assert loss == pytest.approx(one_loss, rel=1e-3) and acc == pytest.approx(one_acc)
    assert_close(grads, one_grads, atol=2e-4)  # unscaled and clipped (to 0.1) alike
    assert max(g.abs().max() for g in grads.values()) > 1e-2  # true magnitudes, not scaled by 65536 or left scaled
    fp32_grads = two_ranks[0][3]
    assert any(not torch.equal(grads[k], fp32_grads[k]) for k in grads)  # and it did compute in fp16


def test_a_batch_smaller_than_the_world_leaves_a_rank_without_images_and_still_steps_the_same(two_ranks):
    loss, acc, weights, grads = two_ranks[1]
    one_loss, one_acc, one_weights, one_grads = train_steps(1, 0, 1)
    assert loss == pytest.approx(one_loss, rel=1e-6) and acc == pytest.approx(one_acc)
    assert_close(grads, one_grads, atol=1e-7)
    assert_close(weights, one_weights, atol=1e-6)


@pytest.fixture(scope="module")
def repo(data_repo, tmp_path_factory):
    """A copy of the data repository set to train on 2 processes, committed."""
    repo = copy_repo(data_repo.repo, tmp_path_factory.mktemp("ddp_pipeline") / "repo")
    set_params(repo, train__nproc=2)
    run(repo, "git", "commit", "-qam", "2 processes")
    return repo


def test_repro_on_two_processes_writes_every_output_once_and_learns(repo):
    output = dvc(repo, "repro")
    assert stages_run(output) == {"train", "evaluate", "export", "plot"}
    assert "2 processes" in output and output.count("final test acc") == 1  # rank 1 prints nothing
    for path in OUTPUTS:
        assert (repo / path).is_file() and (repo / path).stat().st_size > 0, path
    train = read_json(repo, "metrics/train/metrics.json")
    test = read_json(repo, "metrics/evaluate/metrics.json")
    assert train["step"] == 3 and read_json(repo, "metrics/train/run.json")["images_per_s"] > 0
    assert test["accuracy"] > 0.5, f"test accuracy {test['accuracy']}: chance is 0.1"
    # the sharded validation measured the model rank 0 saved, which evaluate reads as is
    assert test["accuracy"] == pytest.approx(train["test"]["acc"], abs=1e-6)
    assert test["loss"] == pytest.approx(train["test"]["loss"], rel=1e-4)
    assert run(repo, "git", "status", "--porcelain", "--untracked-files=all").split() == ["M", "dvc.lock"]


@pytest.fixture
def two_process_repo(data_repo, tmp_path):
    """A copy of the data repository set to train on 2 processes; nothing trained."""
    repo = copy_repo(data_repo.repo, tmp_path / "repo")
    set_params(repo, train__nproc=2)
    return repo


def stage_error(repo):
    code, _, err = call(repo, sys.executable, "-m", "stages.train")
    return code, err.strip().splitlines()


def test_sync_bn_on_the_cpu_is_one_line_before_any_rank_starts(two_process_repo):
    set_params(two_process_repo, train__sync_bn=True)
    code, lines = stage_error(two_process_repo)
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: train.sync_bn = True"), lines


@pytest.mark.parametrize("change, line", [
    ("stats", 'error: data/stats.json: not the stats stage\'s {"mean": [3 numbers], "std": [3 numbers > 0]}; rerun it '
              "(dvc repro --force stats)"),
    ("validation", "error: train.validation_images = 600 holds out 60 images of class 0, which has only 60 training "
                   "images; hold out fewer"),
])
def test_bad_input_that_a_rank_would_meet_is_one_line_before_any_rank_starts(two_process_repo, change, line):
    """What a rank reads besides the params (the statistics, the held-out images) is checked by the launcher:
    no rank starts, and torchrun neither prints nor restarts anything."""
    if change == "stats":
        stats = two_process_repo / "data/stats.json"
        stats.unlink()  # DVC may have linked it to its cache
        stats.write_text('{"mean": [0.5, 0.5, 0.5], "std": [0.25, 0, 0.25]}')
    else:
        set_params(two_process_repo, train__validation_images=600)
    code, lines = stage_error(two_process_repo)
    assert code == 1 and lines == [line]
    assert not (two_process_repo / "models/model.pt").exists()


def node_rank_main(rank, port, folder):
    """A rank as torchrun starts it on a node of its own (LOCAL_RANK 0 on both), but with the nodes numbered
    against their ranks, as the c10d rendezvous may: global rank 0 is on node 1, and node 0's rank is 1."""
    import os

    from cifar.distributed import setup, teardown
    from cifar.resume import Progress, load_checkpoint, save_checkpoint
    os.environ.update(LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", RANK=str(rank), WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    node = 1 - rank
    context = setup(CPU, node, {"code": {"cifar/fit.py": "1"}})
    try:
        torch.manual_seed(rank)  # different weights on each rank: the checkpoint must bring the main rank's
        trainer = make_trainer(ResNet([1, 1, 1, 1], [8, 16, 32, 64]), TRAIN, context, False, 500)
        own = folder / f"node{node}" / "checkpoint.pt"  # each node's own disk: only node 0 has a checkpoint
        own.parent.mkdir(exist_ok=True)
        if context.is_main:
            save_checkpoint(own, "run", Progress(3, finished=2, best_acc=0.5), trainer)
        dist.barrier()
        progress = load_checkpoint(own, "run", trainer, context.main_rank)
    finally:
        teardown()
    torch.save({"context": (context.rank, context.main_rank, context.is_main), "finished": progress.finished,
                "weights": trainer.model.state_dict()}, folder / f"rank{rank}.pt")


def test_node_0s_rank_writes_and_sends_its_checkpoint_even_when_it_is_not_rank_0(tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spawn(node_rank_main, (port, tmp_path), 2, SPAWN_S, "the checkpoint sent from node 0's rank")
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    assert [r["context"] for r in ranks] == [(0, 1, False), (1, 1, True)]  # node 0's rank 1 is the main one
    assert not (tmp_path / "node1/checkpoint.pt").exists()
    assert [r["finished"] for r in ranks] == [2, 2]  # rank 0, on node 1 without a file, resumed too
    saved = torch.load(tmp_path / "node0/checkpoint.pt", weights_only=False)["model"]
    for r in ranks:
        assert all(torch.equal(r["weights"][k], saved[k]) for k in saved)  # rank 1's weights, on both
