"""Precision per device: what `auto` picks on each GPU generation and on CPUs (the hardware's answers
monkeypatched), errors for a precision the device does not compute natively, and fp16's loss scaling
through a training step, clipping, the checkpoint and a resumed run, all on the CPU."""
import warnings

import pytest
import torch
from recipes import changed, recipe

from cifar.distributed import Context
from cifar.model import ResNet
from cifar.precision import autocast, evaluation_precision, native_precisions, resolve_precision
from cifar.resume import Progress, load_checkpoint, save_checkpoint
from cifar.training import Data, make_trainer, train_epoch
from cifar.workspace import UserError

CPU, GPU = torch.device("cpu"), torch.device("cuda")
RECIPE = recipe(epochs=2, batch_size=20, precision="fp16")


@pytest.fixture
def hardware(monkeypatch):
    """Set what the hardware says: hardware(capability=(7, 5)) for the GPU, cpu_bf16=..., cpu_fp16=..."""
    def set(capability=(8, 0), cpu_bf16=False, cpu_fp16=False):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # emulation counts: not the test
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: cpu_bf16)
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_fp16_supported", lambda: cpu_fp16)
    return set


@pytest.mark.parametrize("capability, gpu, expected", [
    ((9, 0), "H100/H200", "bf16"), ((8, 9), "L4, RTX 40xx", "bf16"), ((8, 0), "A100", "bf16"),
    ((7, 5), "T4, RTX 20xx", "fp16"), ((7, 0), "V100", "fp16"),
    ((6, 0), "P100", "fp32"), ((3, 7), "K80", "fp32"),
])
def test_auto_picks_the_fastest_native_precision_of_each_gpu_generation(hardware, capability, gpu, expected):
    hardware(capability=capability)
    assert resolve_precision("auto", GPU) == expected, gpu


@pytest.mark.parametrize("bf16, fp16, expected", [(True, True, "bf16"), (True, False, "bf16"),
                                                  (False, True, "fp32"), (False, False, "fp32")])
def test_auto_on_a_cpu_is_bf16_where_onednn_computes_it_natively_else_fp32(hardware, bf16, fp16, expected):
    hardware(cpu_bf16=bf16, cpu_fp16=fp16)
    assert resolve_precision("auto", CPU) == expected


def test_an_explicit_precision_the_device_does_not_compute_natively_is_a_one_line_error(hardware):
    hardware(capability=(7, 5))
    with pytest.raises(UserError, match=r"^train.precision = 'bf16': a GPU of compute capability 7.5 does not "
                                        r"compute bf16 natively \(native here: fp16, fp32\); use auto or one of"):
        resolve_precision("bf16", GPU)
    assert resolve_precision("fp16", GPU) == "fp16" and resolve_precision("fp32", GPU) == "fp32"
    with pytest.raises(UserError, match=r"^train.precision = 'fp16': this CPU does not compute fp16 natively"):
        resolve_precision("fp16", CPU)
    hardware(capability=(6, 0), cpu_fp16=True)
    assert native_precisions(GPU) == ["fp32"] and resolve_precision("fp16", CPU) == "fp16"
    with pytest.raises(UserError, match="'fp16': a GPU of compute capability 6.0"):
        resolve_precision("fp16", GPU)


def test_evaluation_uses_the_trained_precision_where_native_else_fp32(hardware):
    hardware(capability=(7, 5), cpu_bf16=True)
    assert evaluation_precision("fp16", GPU) == "fp16" and evaluation_precision("bf16", GPU) == "fp32"
    assert evaluation_precision("bf16", CPU) == "bf16" and evaluation_precision("fp16", CPU) == "fp32"
    assert evaluation_precision("fp32", GPU) == "fp32"


def test_each_gpu_is_asked_its_own_capability(monkeypatch, hardware):
    """On a machine of mixed GPUs, the one asked about, not the current one."""
    hardware(cpu_bf16=True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: {1: (7, 5)}.get(
        getattr(device, "index", device), (9, 0)))
    second = torch.device("cuda", 1)
    assert native_precisions(second) == ["fp16", "fp32"] and native_precisions(GPU) == ["bf16", "fp16", "fp32"]
    with pytest.raises(UserError, match=r"^train.precision = 'bf16': a GPU of compute capability 7.5 does not"):
        resolve_precision("bf16", second)


def test_autocast_is_off_for_fp32_and_casts_to_bf16_for_bf16():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an autocast to fp32 would be switched off by torch with a warning
        with autocast(CPU, "fp32"):
            assert not torch.is_autocast_enabled("cpu")
        with autocast(CPU, "bf16"):
            assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def tiny_data(seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (40,), generator=generator)
    return Data.on_device((images, labels), (images[:20], labels[:20]), {"mean": [0.5] * 3, "std": [0.25] * 3}, CPU)


def tiny_trainer(recipe, data):
    torch.manual_seed(0)
    return make_trainer(ResNet([1], [8]), recipe, Context(CPU), False, len(data.labels))


def test_fp16_autocasts_scales_the_loss_and_clips_the_unscaled_gradients():
    recipe = changed(RECIPE, epochs=1, grad_clip=1e-3)
    data = tiny_data()
    trainer = tiny_trainer(recipe, data)
    dtypes = []
    trainer.model.head.register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    train_epoch(trainer, data, recipe, Context(CPU))
    assert dtypes == [torch.float16, torch.float16]
    assert trainer.scaler.is_enabled() and trainer.scaler.get_scale() == 65536.0  # no overflow: the scale holds
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    # clipped after unscaling: the bound itself appears; clipped while scaled, they would be bound / 65536
    bound = torch.tensor(1e-3).item()
    grads = [p.grad for p in trainer.model.parameters()]
    assert max(g.abs().max().item() for g in grads) <= bound
    assert sum((g.abs() == bound).sum().item() for g in grads) > 0
    assert not tiny_trainer(changed(recipe, precision="fp32"), data).scaler.is_enabled()


def test_a_resumed_fp16_run_continues_exactly_with_its_loss_scale(tmp_path):
    data = tiny_data()
    first = tiny_trainer(RECIPE, data)
    train_epoch(first, data, RECIPE, Context(CPU))
    first.scaler.update(new_scale=1024.0)  # a scale of its own, which the checkpoint must carry
    save_checkpoint(tmp_path / "checkpoint.pt", "run", Progress(2, finished=1), first)
    train_epoch(first, data, RECIPE, Context(CPU))  # the uninterrupted run's second epoch

    resumed = tiny_trainer(RECIPE, data)
    torch.manual_seed(123)  # whatever the process did meanwhile: the checkpoint restores the RNG states
    progress = load_checkpoint(tmp_path / "checkpoint.pt", "run", resumed)
    assert progress.finished == 1 and resumed.scaler.get_scale() == 1024.0
    train_epoch(resumed, data, RECIPE, Context(CPU))
    for (name, a), b in zip(resumed.model.state_dict().items(), first.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert resumed.scaler.state_dict() == first.scaler.state_dict()
