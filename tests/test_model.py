"""The ResNet family: parameter counts of the study, the budget, and the checkpoint format."""
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from dvcrepo import REPO

from cifar.model import ResNet, build_model, count_parameters, load_model, save_model
from cifar.workspace import UserError


@pytest.mark.parametrize("blocks, widths, expected", [
    ([2, 1, 1, 1], [64, 128, 256, 512], 4_977_226),  # the study's final model
    ([6, 5, 4, 3], [32, 64, 128, 256], 4_865_322),
    ([1, 1, 1, 1], [64, 128, 256, 512], 4_903_242),
])
def test_parameter_counts_match_the_study(blocks, widths, expected):
    assert count_parameters(ResNet(blocks, widths)) == expected


def test_forward_gives_ten_logits_and_halves_the_resolution_per_later_stage():
    model = ResNet([1, 2, 1], [8, 16, 32]).eval()
    assert model(torch.randn(5, 3, 32, 32)).shape == (5, 10)
    assert model.layers(model.stem(torch.randn(1, 3, 32, 32))).shape == (1, 32, 8, 8)
    assert [len(layer) for layer in model.layers] == [1, 2, 1]  # blocks grouped per layer
    assert model.layers[2][0].conv1.stride == (2, 2) and model.layers[1][1].conv1.stride == (1, 1)


def test_the_shortcut_is_the_strided_1x1_convolution_of_the_study():
    """The stride-1 convolution of every second pixel computes what a stride-2 1x1 convolution does, so the
    architecture (and every checkpoint) means what it meant."""
    block = ResNet([1, 1], [8, 16]).layers[1][0].eval()
    x = torch.randn(2, 8, 32, 32)
    conv, bn = block.shortcut
    residual = block.bn2(block.conv2(F.relu(block.bn1(block.conv1(x)))))
    assert torch.allclose(block(x), F.relu(residual + bn(F.conv2d(x, conv.weight, stride=2))), atol=1e-6)


# One training step of a model whose stride-2 shortcut takes 8 channels, on an odd batch, in channels_last, with 2
# threads: where torch 2.14.1's oneDNN weight gradient of a strided 1x1 convolution crashes (docs/troubleshooting.md)
ODD_BATCH_STEP = """
import sys, torch
from cifar.model import ResNet
from cifar.training import prepare_model
torch.set_num_threads(2)
model, step_model = prepare_model(ResNet([1, 1], [8, 16]), torch.device("cpu"), compiled=False)
x = torch.randn(3, 3, 32, 32).contiguous(memory_format=torch.channels_last)
with torch.autocast("cpu", torch.bfloat16, enabled=sys.argv[1] == "bf16"):
    loss = step_model(x).float().sum()
loss.backward()
print("trained")
"""


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_narrow_model_takes_a_step_on_an_odd_batch(precision):
    """As its own process: a crash there fails this test, not the test run."""
    result = subprocess.run([sys.executable, "-c", ODD_BATCH_STEP, precision], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and result.stdout == "trained\n", (result.returncode, result.stderr[-2000:])


def test_a_model_over_the_budget_is_an_error():
    with pytest.raises(UserError, match=r"has 4,977,226 parameters, over model.max_params = 4,000,000"):
        build_model([2, 1, 1, 1], [64, 128, 256, 512], max_params=4_000_000)
    assert count_parameters(build_model([2, 1, 1, 1], [64, 128, 256, 512], max_params=4_977_226)) == 4_977_226


def test_checkpoint_round_trip_rebuilds_the_same_model(tmp_path):
    model = ResNet([1, 1], [8, 16]).eval()
    stats = {"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]}
    save_model(tmp_path / "model.pt", model, stats, ["c"] * 10, "bf16")
    rebuilt, checkpoint = load_model(tmp_path / "model.pt")
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(rebuilt.eval()(x), model(x))
    assert rebuilt.config == model.config and checkpoint["stats"] == stats and checkpoint["classes"] == ["c"] * 10
    assert checkpoint["precision"] == "bf16"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temporary file left


def test_missing_or_foreign_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(UserError, match="no such checkpoint"):
        load_model(tmp_path / "absent.pt")
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(UserError, match="not a readable model checkpoint"):
        load_model(tmp_path / "junk.pt")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="missing classes, config, precision, state_dict, stats"):
        load_model(tmp_path / "other.pt")
    model = ResNet([1, 1], [8, 16])
    save_model(tmp_path / "m.pt", model, {"mean": [0] * 3, "std": [1] * 3}, ["c"] * 10, "fp32")
    checkpoint = torch.load(tmp_path / "m.pt")
    checkpoint["config"]["widths"] = [8, 32]
    torch.save(checkpoint, tmp_path / "m.pt")
    with pytest.raises(UserError, match="weights do not fit the architecture"):
        load_model(tmp_path / "m.pt")
