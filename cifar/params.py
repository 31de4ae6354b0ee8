"""params.yaml: loading, and each section a stage reads checked against its pydantic schema before the stage does
any work. Each schema lives beside the code that reads its section (data.DataParams, model.ModelParams,
training.Recipe, augment.EvaluateParams, export.ExportParams, devices.System), so a stage's code deps hold only
the schemas of the sections it reads: a new `train` key leaves download and stats up to date."""
import re
from pathlib import Path
from typing import Annotated, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .workspace import UserError

PARAMS_FILE = Path("params.yaml")
SECTIONS = ("data", "model", "train", "evaluate", "export", "system")  # params.yaml's sections, in its order


class _Loader(yaml.SafeLoader):
    """YAML 1.2 floats: `dvc exp run -S train.weight_decay=1e-5` writes 1e-05, which PyYAML's
    YAML 1.1 rules would read as a string."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(\d+\.\d*|\.\d+|\d+)([eE][-+]?\d+)?$|^[-+]?\.(inf|Inf|INF)$|^\.(nan|NaN|NAN)$"),
    list("-+0123456789."),
)


class Section(BaseModel):
    """One section of params.yaml: every key required, none unknown, no type coerced (true is no integer, "5"
    no number). Each field's description says what it allows, for the error message."""
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)
    section: ClassVar[str]


# Field types, each with the text of what it allows
def integer(minimum):
    return Annotated[int, Field(ge=minimum, description=f"an integer >= {minimum}")]


def number(*, gt=None, ge=None, lt=None, le=None):
    bounds = " and ".join(f"{op} {v}" for op, v in [(">", gt), (">=", ge), ("<", lt), ("<=", le)] if v is not None)
    return Annotated[float, Field(gt=gt, ge=ge, lt=lt, le=le, allow_inf_nan=False, description=f"a number {bounds}")]


def one_of(*choices):
    return Annotated[Literal[choices], Field(description="one of " + ", ".join(choices))]


def text(pattern=r".*\S.*", allowed="a non-empty string"):
    return Annotated[str, Field(pattern=pattern, description=allowed)]


def integers(minimum):
    return Annotated[list[Annotated[int, Field(ge=minimum)]], Field(min_length=1, description=
                                                                    f"a non-empty list of integers >= {minimum}")]


FLAG = Annotated[bool, Field(description="true or false")]


def _message(schema, error, values, source):
    """One pydantic error as one line: the key, its value and what the key allows."""
    where = f"{source}: {schema.section}"
    if not error["loc"]:  # the section's own checks (model_validator): their message names the keys
        return f"{source}: {error['msg'].removeprefix('Value error, ')}"
    key = error["loc"][0]
    if error["type"] == "missing":
        return f"{where}.{key} is missing"
    if error["type"] == "extra_forbidden":
        return f"{source}: unknown key {schema.section}.{key} (allowed: {', '.join(schema.model_fields)})"
    return f"{where}.{key} = {values[key]!r} must be {schema.model_fields[key].description}"


def check_section(schema, values, source=PARAMS_FILE, keys=None):
    """The section `schema.section` of params.yaml, checked: its values as a dict. With `keys`, only those keys'
    own errors count: each value on its own, before the values it must agree with are chosen (tools.search)."""
    if not isinstance(values, dict):
        raise UserError(f"{source}: section '{schema.section}' is missing or not a mapping")
    try:
        return schema(**values).model_dump()
    except ValidationError as e:
        errors = [error for error in e.errors() if keys is None or error["loc"][:1] in [(key,) for key in keys]]
        if errors:
            raise UserError(_message(schema, errors[0], values, source))
        return dict(values)


def parse_value(text):
    """A value as params.yaml and `dvc exp run -S` spell it, read by the stages' YAML rules: '1e-5' a float."""
    return yaml.load(text, Loader=_Loader)


def format_value(value):
    """A value as `dvc exp run -S` parses it (YAML), read back by parse_value as the same number: lists without
    spaces, true/false, floats short (`0.0001`, `0`) where that is exact, else repr's digits (6 digits alone made
    a proposal of 0.9999996 reach params.yaml as 1)."""
    if isinstance(value, bool):  # YAML's own spelling, not Python's True/False
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if isinstance(value, float):
        short = f"{value:g}"
        return short if parse_value(short) == value else repr(value)
    return str(value)


def parse_override(text):
    """`section.key=value` (a -S setting) as (key, value text), or a one-line error."""
    key, sep, value = text.partition("=")
    if not sep or not key or not value or "." not in key:
        raise UserError(f"-S {text!r}: expected section.key=value, e.g. -S train.epochs=5")
    return key, value


def load_yaml(path, missing="not found"):
    """A YAML file read by the stages' rules; a missing or broken one is a one-line error naming it."""
    path = Path(path)
    try:
        with open(path) as f:
            return yaml.load(f, Loader=_Loader)
    except FileNotFoundError:
        raise UserError(f"{path}: {missing}")
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({' '.join(str(e).split())})")


def read_params(path=PARAMS_FILE):
    """params.yaml as it is, its sections named but not yet checked."""
    path = Path(path)
    params = load_yaml(path, "not found; run the stages from the repository root")
    if not isinstance(params, dict):
        raise UserError(f"{path}: expected a mapping of sections {', '.join(SECTIONS)}")
    unknown = [s for s in params if s not in SECTIONS]
    if unknown:
        raise UserError(f"{path}: unknown section '{unknown[0]}' (allowed: {', '.join(SECTIONS)})")
    return params


def load_params(*schemas, path=PARAMS_FILE):
    """{section: its checked values} of the sections `schemas` describe: what a stage reads."""
    params = read_params(path)
    return {schema.section: check_section(schema, params.get(schema.section), path) for schema in schemas}
