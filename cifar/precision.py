"""Which floating-point precision a device trains in, and the autocast and loss scaling that go with it.

`train.precision: auto` takes the fastest precision the device computes natively (with tensor cores or
oneDNN kernels), never one it only emulates:
  - CUDA, compute capability 8.0 or newer (A100, A10, RTX 30xx/40xx, H100, H200): bf16;
  - CUDA 7.x (V100, T4, RTX 20xx: fp16 tensor cores, no bf16): fp16, with loss scaling;
  - CUDA below 7.0 (P100, K80): fp32;
  - a CPU: bf16 where oneDNN computes it natively (AVX-512-BF16 or AMX), else fp32.
(torch.cuda.is_bf16_supported() is not the test: by default it also says yes where bf16 is emulated, as on a
T4 or V100.) An explicit bf16 or fp16 the device does not compute natively is an error, not a silent
fallback: the precision is part of the recipe, so a run that quietly trained in another one would not be
the run asked for. Weights, gradients, optimizer state and BatchNorm statistics stay fp32 in every mode."""
import torch

from .workspace import UserError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def native_precisions(device):
    """The precisions `device` computes natively, fastest first (fp32 always)."""
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        return ["bf16", "fp16", "fp32"] if major >= 8 else ["fp16", "fp32"] if major >= 7 else ["fp32"]
    found = [p for p, native in [("bf16", torch.ops.mkldnn._is_mkldnn_bf16_supported()),
                                 ("fp16", torch.ops.mkldnn._is_mkldnn_fp16_supported())] if native]
    return [*found, "fp32"]


def resolve_precision(precision, device):
    """train.precision for this device: 'auto' becomes the fastest native one (on a CPU bf16 or fp32, since
    fp16 on a CPU gains little and needs loss scaling); an explicit one must be native."""
    native = native_precisions(device)
    if precision == "auto":
        return next(p for p in native if device.type == "cuda" or p != "fp16")
    if precision not in native:
        what = (f"a GPU of compute capability {'.'.join(map(str, torch.cuda.get_device_capability(device)))}"
                if device.type == "cuda" else "this CPU")
        raise UserError(f"train.precision = {precision!r}: {what} does not compute {precision} natively "
                        f"(native here: {', '.join(native)}); use auto or one of those")
    return precision


def evaluation_precision(trained, device):
    """The precision to score a model trained in `trained` on `device`: the same, so that the test accuracy
    is the final validation accuracy, where the device computes it natively; else fp32."""
    return trained if trained in native_precisions(device) else "fp32"


def autocast(device, precision):
    """Autocast to bf16 or fp16 for the forward pass and the loss; off for fp32."""
    return torch.autocast(device.type, dtype=DTYPES.get(precision, torch.float32), enabled=precision in DTYPES)


def make_scaler(device, precision):
    """fp16's loss scaling (its small range underflows small gradients); for bf16 and fp32 a disabled scaler,
    whose calls pass everything through, so the training step is one code path."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
