"""The one way tests build the typed views of params.yaml: the shipped file's values (the study's recipe),
with the changes a test names."""
from pathlib import Path

import yaml

from cifar.devices import System
from cifar.training import Recipe

SHIPPED = yaml.safe_load((Path(__file__).resolve().parent.parent / "params.yaml").read_text())


def recipe(**changes):
    """The `train` section as a Recipe: params.yaml's values, `changes` applied (and checked)."""
    return Recipe(**{**SHIPPED["train"], **changes})


def system(**changes):
    return System(**{**SHIPPED["system"], **changes})


def changed(section, **changes):
    """A copy of a Recipe or System with `changes`, checked as params.yaml's values are."""
    return type(section)(**{**section.model_dump(), **changes})
