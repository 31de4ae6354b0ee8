"""Whether two numeric paths through the trained model classify the test images alike, judged by what makes a
real disagreement rather than by a count of flipped near ties (which depends on the CPU's kernels).

The evaluate stage scores model.pt in the precision it trained in where the device computes it natively (bf16 on
a CPU with AVX-512-BF16 or AMX, fp32 elsewhere); onnxruntime computes in fp32. Two paths in the same precision
compute the same logits, so they must give the same classes (ties broken alike). Two paths in different
precisions may order two classes otherwise only where the classes' fp32 logits are closer than the lower
precision's rounding can move them: any image beyond that margin is a real disagreement."""
from pathlib import Path

import torch
from dvcrepo import read_json
from torch import nn

from cifar.data import load_split
from cifar.precision import DTYPES
from cifar.runtime import TorchModel

CPU = torch.device("cpu")


def rounding_margin(model, logits, precision):
    """[N]: how far computing `model` in `precision` may move the difference between two of an image's logits
    (`logits`: its fp32 ones). None in fp32. Else, to first order: each layer that computes in the precision
    (the convolutions and the linear head) rounds its output with a relative error of up to eps / 2, which moves
    each logit by up to that much of the image's largest logit, and a difference of two by twice it."""
    if precision not in DTYPES:
        return torch.zeros(len(logits))
    layers = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
    return layers * torch.finfo(DTYPES[precision]).eps * logits.abs().amax(1)


def evaluated(repo):
    """(the test images, the class indices the evaluate stage predicted for them, model.pt as evaluate ran it
    in PyTorch: cifar.runtime.TorchModel on the CPU, in the precision evaluate chose)."""
    repo = Path(repo)
    images, _ = load_split(repo / "data/cifar-10-batches-py", "test")
    model = TorchModel(repo / "models/model.pt", CPU)
    predicted = [model.classes.index(r["predicted"]) for r in read_json(repo, "metrics/evaluate/confusion.json")]
    return images, torch.tensor(predicted), model


def real_disagreements(repo, found, precision, slack=0.0):
    """The test images (indices) that a path computing in `precision` classifies as `found` (class indices)
    where the evaluate stage chose a class that the difference of precisions cannot explain: model.pt's fp32
    logits set the two classes further apart than both precisions' rounding plus `slack` (a difference of
    runtimes: onnxruntime against PyTorch, bounded by the export check)."""
    images, expected, model = evaluated(repo)
    logits = TorchModel(Path(repo) / "models/model.pt", CPU, precision="fp32").logits(images)
    margin = (rounding_margin(model.model, logits, model.precision) + rounding_margin(model.model, logits, precision)
              + slack)
    apart = (logits.gather(1, expected[:, None]) - logits.gather(1, found[:, None])).squeeze(1).abs()
    return torch.nonzero((expected != found) & (apart > margin)).flatten().tolist()
