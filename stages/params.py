"""params.yaml: loading, validation of every key before a stage does any work, and the typed views the
training code takes (Recipe: what a run computes; System: where and how it runs)."""
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from .workspace import UserError

PARAMS_FILE = Path("params.yaml")


class _Loader(yaml.SafeLoader):
    """YAML 1.2 floats: `dvc exp run -S train.weight_decay=1e-5` writes 1e-05, which PyYAML's
    YAML 1.1 rules would read as a string."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(\d+\.\d*|\.\d+|\d+)([eE][-+]?\d+)?$|^[-+]?\.(inf|Inf|INF)$|^\.(nan|NaN|NAN)$"),
    list("-+0123456789."),
)


# Each check takes the value and returns an error text (what is allowed) or None.
def _int(minimum):
    def check(v):
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            return f"must be an integer >= {minimum}"
    return check


def _number(*, above=None, at_least=None, below=None):
    def check(v):
        ok = not isinstance(v, bool) and isinstance(v, (int, float)) and v == v
        ok = ok and (above is None or v > above) and (at_least is None or v >= at_least)
        ok = ok and (below is None or v < below)
        if not ok:
            bounds = [f"> {above}" if above is not None else None, f">= {at_least}" if at_least is not None else None,
                      f"< {below}" if below is not None else None]
            return "must be a number " + " and ".join(b for b in bounds if b)
    return check


def _int_list(minimum):
    def check(v):
        if not isinstance(v, list) or not v or any(isinstance(x, bool) or not isinstance(x, int) or x < minimum
                                                   for x in v):
            return f"must be a non-empty list of integers >= {minimum}"
    return check


def _text(v):
    if not isinstance(v, str) or not v.strip():
        return "must be a non-empty string"


def _md5(v):
    if not isinstance(v, str) or not re.fullmatch(r"[0-9a-fA-F]{32}", v):
        return "must be an md5 checksum of 32 hex digits"


def _one_of(*choices):
    def check(v):
        if v not in choices:
            return "must be one of " + ", ".join(choices)
    return check


def _bool(v):
    if not isinstance(v, bool):
        return "must be true or false"


def _port(v):
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 65535:
        return "must be a TCP port, an integer from 1 to 65535"


def _device(v):
    if not isinstance(v, str) or not re.fullmatch(r"auto|cpu|cuda|cuda:\d+", v):
        return "must be auto, cpu, cuda or cuda:K (K: a GPU index)"


def _positive_or_off(v):
    if v is False or v is None:
        return None
    if _number(above=0)(v):
        return "must be a number > 0, or false to switch clipping off"


SCHEMA = {
    "data": {"url": _text, "md5": _md5},
    "model": {"blocks": _int_list(1), "widths": _int_list(1), "max_params": _int(1)},
    "train": {
        "epochs": _int(1),
        "batch_size": _int(1),
        "max_lr": _number(above=0),
        "warmup_fraction": _number(above=0, below=1),
        "weight_decay": _number(at_least=0),
        "grad_clip": _positive_or_off,
        "seed": _int(0),
        "precision": _one_of("auto", "bf16", "fp16", "fp32"),
        "nproc": _int(1),
        "nnodes": _int(1),
        "sync_bn": _bool,
        "optimizer": _one_of("adam", "sgd"),
        "momentum": _number(at_least=0, below=1),
        "nesterov": _bool,
        "label_smoothing": _number(at_least=0, below=1),
        "ema_decay": _number(at_least=0, below=1),
        "cutout": _int(0),
        "flip": _one_of("random", "alternating"),
    },
    "evaluate": {
        "tta": _one_of("none", "flip", "flip_translate"),
    },
    "system": {
        "device": _device,
        "compile": _bool,
        "master_addr": _text,
        "master_port": _port,
    },
}


@dataclass(frozen=True)
class Recipe:
    """The `train` section: everything that decides what training computes. Each key is a dependency of the
    train stage (dvc.yaml) and part of the resumable checkpoint's fingerprint. nproc and nnodes belong here
    because every rank's BatchNorm normalizes with its own share of the batch, so the process count changes
    the result (unless sync_bn)."""
    epochs: int
    batch_size: int
    max_lr: float
    warmup_fraction: float
    weight_decay: float
    grad_clip: float | bool  # False: no clipping
    seed: int
    precision: str  # auto | bf16 | fp16 | fp32; the train stage resolves it for its device (precision.py)
    nproc: int
    nnodes: int
    sync_bn: bool
    # The fast trainers' tricks (see README, "Beyond the study"); these defaults switch them off: the study's
    optimizer: str = "adam"  # adam | sgd
    momentum: float = 0.9  # sgd only
    nesterov: bool = True  # sgd only
    label_smoothing: float = 0.0
    ema_decay: float = 0.0  # 0: no EMA of the weights
    cutout: int = 0  # side of the square zeroed per image; 0: none
    flip: str = "random"  # random | alternating

    @classmethod
    def from_params(cls, params):
        return cls(**params["train"])

    @property
    def world_size(self):
        return self.nproc * self.nnodes


@dataclass(frozen=True)
class System:
    """The `system` section: where and how a run executes, never what it computes, so no stage depends on it
    and changing it neither reruns training nor invalidates a checkpoint. compile is here because
    torch.compile changes the results only by floating-point rounding (as another GPU model would); the
    rendezvous address and port cannot change them at all, nor can the device (on one kind of device; the
    checkpoint's fingerprint holds the device type)."""
    device: str  # auto | cpu | cuda | cuda:K (devices.py)
    compile: bool
    master_addr: str
    master_port: int

    @classmethod
    def from_params(cls, params):
        return cls(**params["system"])


def check_params(params, source=PARAMS_FILE):
    """Check every section and key against SCHEMA; the error names the key, the value and what is allowed."""
    if not isinstance(params, dict):
        raise UserError(f"{source}: expected a mapping of sections {', '.join(SCHEMA)}")
    for section, keys in SCHEMA.items():
        values = params.get(section)
        if not isinstance(values, dict):
            raise UserError(f"{source}: section '{section}' is missing or not a mapping")
        for key, check in keys.items():
            if key not in values:
                raise UserError(f"{source}: {section}.{key} is missing")
            problem = check(values[key])
            if problem:
                raise UserError(f"{source}: {section}.{key} = {values[key]!r} {problem}")
        for key in values:
            if key not in keys:
                raise UserError(f"{source}: unknown key {section}.{key} (allowed: {', '.join(keys)})")
    for section in params:
        if section not in SCHEMA:
            raise UserError(f"{source}: unknown section '{section}' (allowed: {', '.join(SCHEMA)})")
    model = params["model"]
    if len(model["blocks"]) != len(model["widths"]):
        raise UserError(
            f"{source}: model.blocks {model['blocks']} and model.widths {model['widths']} must have the same length "
            "(one entry per stage)"
        )
    train = params["train"]
    if train["cutout"] >= 32:
        raise UserError(f"{source}: train.cutout = {train['cutout']} must be smaller than the 32-pixel image "
                        "(0 switches cutout off)")
    if train["optimizer"] == "sgd" and train["nesterov"] and train["momentum"] == 0:
        raise UserError(f"{source}: train.nesterov = true needs train.momentum > 0 (Nesterov momentum is a "
                        "kind of momentum); set train.nesterov: false for plain SGD")
    processes = train["nproc"] * train["nnodes"]
    if train["batch_size"] < processes:
        raise UserError(
            f"{source}: train.batch_size = {train['batch_size']} is smaller than train.nproc * train.nnodes = "
            f"{processes}: every process needs at least one image of each batch"
        )
    return params


def load_params(path=PARAMS_FILE):
    path = Path(path)
    try:
        with open(path) as f:
            params = yaml.load(f, Loader=_Loader)
    except FileNotFoundError:
        raise UserError(f"{path}: not found; run the stages from the repository root")
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({' '.join(str(e).split())})")
    return check_params(params, path)
