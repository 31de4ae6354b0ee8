"""params.yaml validation: every key of a section a stage reads is checked, errors name the key, the value and
what is allowed; each section's schema lives beside the code that reads it."""
import copy
from pathlib import Path

import pytest
import yaml

from cifar.augment import EvaluateParams
from cifar.data import DataParams
from cifar.devices import System
from cifar.export import ExportParams
from cifar.model import ModelParams
from cifar.params import (
    FLAG,
    SECTIONS,
    Section,
    check_section,
    integer,
    integers,
    load_params,
    number,
    one_of,
    read_params,
    text,
)
from cifar.training import Recipe
from cifar.workspace import UserError

REPO = Path(__file__).resolve().parent.parent
DEFAULTS = yaml.safe_load((REPO / "params.yaml").read_text())
SCHEMAS = {schema.section: schema for schema in [DataParams, ModelParams, Recipe, EvaluateParams, ExportParams,
                                                   System]}


def check_params(params):
    """Every section checked, as the stages together check them."""
    return {name: check_section(schema, params.get(name)) for name, schema in SCHEMAS.items()}


def with_value(key, value):
    params = copy.deepcopy(DEFAULTS)
    section, name = key.split(".")
    params[section][name] = value
    return params


def test_the_shipped_params_are_valid_and_are_the_study_recipe():
    params = load_params(*SCHEMAS.values(), path=REPO / "params.yaml")
    assert params["model"] == {"blocks": [2, 1, 1, 1], "widths": [64, 128, 256, 512], "max_params": 5_000_000}
    assert params["train"]["batch_size"] == 400 and params["train"]["max_lr"] == 0.01
    assert params["train"]["grad_clip"] == 0.1 and params["train"]["epochs"] == 70
    assert params["train"]["warmup_fraction"] == 0.3 and params["train"]["weight_decay"] == 1e-4
    assert params["train"]["nproc"] == params["train"]["nnodes"] == 1 and params["train"]["sync_bn"] is False
    assert params["data"]["md5"] == "c58f30108f718f92721af3b95e74349a"
    assert params["system"] == {"device": "auto", "compile": False, "master_addr": "localhost", "master_port": 29500,
                                 "max_restarts": 3}
    # the fast trainers' tricks are all off: Adam, no smoothing, no EMA, no cutout, random flips, no TTA
    tricks = {key: params["train"][key] for key in ["optimizer", "label_smoothing", "ema_decay", "cutout", "flip",
                                                     "bn_lr_scale"]}
    assert tricks == {"optimizer": "adam", "label_smoothing": 0, "ema_decay": 0, "cutout": 0, "flip": "random",
                      "bn_lr_scale": 1}
    assert params["evaluate"] == {"tta": "none"}
    assert params["export"] == {"opset": 18, "max_logit_diff": 1e-3, "min_agreement": 0.999}


def test_every_section_has_one_schema_and_the_schemas_have_no_defaults():
    """params.yaml is the one place the study's recipe is written: a schema default would be a second."""
    assert list(SCHEMAS) == list(SECTIONS) == list(DEFAULTS)
    for schema in SCHEMAS.values():
        assert list(schema.model_fields) == list(DEFAULTS[schema.section]), schema.section
        assert all(field.is_required() for field in schema.model_fields.values()), schema.section
    assert Recipe(**DEFAULTS["train"]).world_size == 1 and System(**DEFAULTS["system"]).master_port == 29500


def test_a_stage_checks_only_the_sections_it_reads():
    """download reads `data` alone: a bad `train` value is train's error, not download's."""
    params = with_value("train.epochs", 0)
    assert check_section(DataParams, params["data"])["url"] == DEFAULTS["data"]["url"]
    with pytest.raises(UserError, match="train.epochs = 0"):
        check_section(Recipe, params["train"])


@pytest.mark.parametrize("key, value, allowed", [
    ("model.blocks", [2, 0, 1, 1], "a non-empty list of integers >= 1"),
    ("model.blocks", [], "non-empty list of integers >= 1"),
    ("model.widths", [64, -128, 256, 512], "non-empty list of integers >= 1"),
    ("model.widths", "64", "non-empty list of integers >= 1"),
    ("model.max_params", 0, "integer >= 1"),
    ("train.epochs", 0, "integer >= 1"),
    ("train.epochs", 2.5, "an integer >= 1"),
    ("train.batch_size", True, "an integer >= 1"),
    ("train.batch_size", 0, "integer >= 1"),
    ("train.max_lr", 0, "number > 0"),
    ("train.max_lr", "fast", "a number > 0"),
    ("train.warmup_fraction", 1.0, "a number > 0 and < 1"),
    ("train.weight_decay", -1e-4, "number >= 0"),
    ("train.grad_clip", -0.1, "number > 0, or false"),
    ("train.grad_clip", 0, "number > 0, or false"),
    ("train.grad_clip", "off", "a number > 0, or false"),
    ("train.seed", -1, "integer >= 0"),
    ("train.precision", "fp8", "one of auto, bf16, fp16, fp32"),
    ("system.device", "gpu", "must be auto, cpu, cuda or cuda:K"),
    ("system.device", "cuda:x", "must be auto, cpu, cuda or cuda:K"),
    ("system.compile", "yes", "true or false"),
    ("train.nproc", 0, "integer >= 1"),
    ("train.nnodes", 1.5, "integer >= 1"),
    ("system.master_addr", "", "non-empty string"),
    ("system.master_port", 70000, "a TCP port, an integer from 1 to 65535"),
    ("system.max_restarts", -1, "an integer >= 0"),
    ("train.sync_bn", "on", "true or false"),
    ("data.md5", "abc", "an md5 checksum of 32 hex digits"),
    ("data.url", "", "non-empty string"),
    ("train.optimizer", "lamb", "one of adam, sgd, muon"),
    ("train.muon_lr", 0, "a number > 0"),
    ("train.muon_momentum", 1.0, "a number >= 0 and < 1"),
    ("train.momentum", 1.0, "a number >= 0 and < 1"),
    ("train.nesterov", "yes", "true or false"),
    ("train.label_smoothing", -0.1, "number >= 0 and < 1"),
    ("train.ema_decay", 1, "a number >= 0 and < 1"),
    ("train.cutout", 2.5, "integer >= 0"),
    ("train.flip", "never", "must be one of random, alternating"),
    ("train.bn_lr_scale", 0, "a number > 0"),
    ("evaluate.tta", "crops", "one of none, flip, flip_translate"),
    ("export.opset", 17, "an integer >= 18"),
    ("export.max_logit_diff", -1e-3, "a number >= 0"),
    ("export.min_agreement", 1.5, "a number >= 0 and <= 1"),
    ("train.max_lr", float("nan"), "a number > 0"),
    ("train.grad_clip", True, "a number > 0, or false"),
    ("model.max_params", "5M", "an integer >= 1"),
])
def test_bad_values_name_the_key_the_value_and_what_is_allowed(key, value, allowed):
    with pytest.raises(UserError) as error:
        check_params(with_value(key, value))
    message = str(error.value)
    assert f"{key} = {value!r}" in message and allowed in message and "\n" not in message


def test_unknown_and_missing_keys_and_sections_are_named(tmp_path):
    with pytest.raises(UserError, match=r"unknown key train\.learning_rate \(allowed: epochs, batch_size"):
        check_params(with_value("train.learning_rate", 0.1))
    params = copy.deepcopy(DEFAULTS)
    del params["train"]["seed"]
    with pytest.raises(UserError, match=r"train\.seed is missing"):
        check_params(params)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({**DEFAULTS, "optimizer": {}}))
    with pytest.raises(UserError, match=r"unknown section 'optimizer' \(allowed: data, model, train"):
        read_params(tmp_path / "params.yaml")
    del params["train"]
    with pytest.raises(UserError, match=r"section 'train' is missing or not a mapping"):
        check_params(params)


def test_a_section_s_own_check_is_the_whole_message():
    """pydantic's 'Value error, ' prefix is not shown: the line is the file and what is wrong."""
    with pytest.raises(UserError) as error:
        check_params(with_value("model.blocks", [2, 1, 1]))
    assert str(error.value) == ("params.yaml: model.blocks [2, 1, 1] and model.widths [64, 128, 256, 512] must have "
                                "the same length (one entry per layer)")


def test_blocks_and_widths_need_one_entry_per_layer():
    with pytest.raises(UserError, match=r"model.blocks \[2, 1, 1\] and model.widths \[64, 128, 256, 512\] must have "
                                        r"the same length \(one entry per layer\)"):
        check_params(with_value("model.blocks", [2, 1, 1]))


def test_every_process_needs_an_image_of_each_batch():
    params = with_value("train.batch_size", 15)
    params["train"].update(nproc=8, nnodes=2)
    with pytest.raises(UserError, match=r"train.batch_size = 15 is smaller than train.nproc \* train.nnodes = 16"):
        check_params(params)
    params["train"]["batch_size"] = 16
    assert check_params(params)["train"]["nproc"] == 8


def test_cutout_must_fit_the_image_and_nesterov_needs_momentum():
    with pytest.raises(UserError, match=r"train.cutout = 32 must be smaller than the 32-pixel image"):
        check_params(with_value("train.cutout", 32))
    params = with_value("train.optimizer", "sgd")
    params["train"]["momentum"] = 0
    with pytest.raises(UserError, match=r"train.nesterov = true needs train.momentum > 0"):
        check_params(params)
    params["train"]["nesterov"] = False
    assert check_params(params)["train"]["momentum"] == 0  # plain SGD


def test_grad_clip_can_be_switched_off():
    assert check_params(with_value("train.grad_clip", False))["train"]["grad_clip"] is False


def test_exponent_floats_as_dvc_writes_them_are_numbers(tmp_path):
    """`dvc exp run -S train.weight_decay=1e-5` writes 1e-05, a string to plain PyYAML."""
    text = (REPO / "params.yaml").read_text().replace("weight_decay: 1.0e-4", "weight_decay: 1e-05")
    (tmp_path / "params.yaml").write_text(text)
    assert load_params(Recipe, path=tmp_path / "params.yaml")["train"]["weight_decay"] == 1e-5


def test_unreadable_params_files_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_params(Recipe, path=tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("train: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML") as error:
        load_params(Recipe, path=tmp_path / "params.yaml")
    assert "\n" not in str(error.value)


def test_each_field_type_checks_its_bounds_and_says_what_it_allows():
    """The field-type helpers, called here (not only when the stages' schemas are defined at import): each
    bound at its edge, and each message's text."""
    class Probe(Section):
        section = "probe"
        count: integer(2)
        rate: number(gt=0, le=1)
        low: number(ge=-1, lt=0)
        kind: one_of("a", "b")
        name: text()
        code: text(r"^x\d$", "x and a digit")
        sizes: integers(3)
        on: FLAG
        decay: number(ge=0)

    good = dict(count=2, rate=1.0, low=-1.0, kind="b", name=" n ", code="x1", sizes=[3], on=False, decay=0.0)
    assert check_section(Probe, good) == good
    bad = [("count", 1, "an integer >= 2"), ("count", 2.0, "an integer >= 2"),
           ("rate", 0.0, "a number > 0 and <= 1"), ("rate", 1.5, "a number > 0 and <= 1"),
           ("rate", float("inf"), "a number > 0 and <= 1"), ("rate", float("nan"), "a number > 0 and <= 1"),
           ("low", -1.5, "a number >= -1 and < 0"), ("low", 0.0, "a number >= -1 and < 0"),
           ("kind", "c", "one of a, b"), ("name", " ", "a non-empty string"), ("name", "", "a non-empty string"),
           ("code", "x12", "x and a digit"), ("code", "y1", "x and a digit"),
           ("sizes", [], "a non-empty list of integers >= 3"), ("sizes", [3, 2], "a non-empty list of integers >= 3"),
           ("on", 1, "true or false"), ("decay", float("inf"), "a number >= 0")]
    for key, value, allowed in bad:
        with pytest.raises(UserError) as e:
            check_section(Probe, {**good, key: value})
        assert str(e.value) == f"params.yaml: probe.{key} = {value!r} must be {allowed}", (key, value)


def test_a_params_file_that_is_not_a_mapping_of_sections_is_one_line(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("- data\n- model\n")
    with pytest.raises(UserError) as e:
        read_params(path)
    assert str(e.value) == f"{path}: expected a mapping of sections data, model, train, evaluate, export, system"
    path.write_text("train: [1,\n  epochs: 2\n")
    with pytest.raises(yaml.YAMLError) as parsed, open(path) as f:
        yaml.safe_load(f)
    with pytest.raises(UserError) as e:
        read_params(path)
    one_line = " ".join(str(parsed.value).split())
    assert str(e.value) == f"{path}: not valid YAML ({one_line})" and "\n" not in str(e.value)


def test_a_bad_value_names_the_params_file_it_came_from(tmp_path):
    params = read_params(REPO / "params.yaml")
    params["system"]["master_port"] = 0
    path = tmp_path / "other.yaml"
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(UserError) as e:
        load_params(System, path=path)
    assert str(e.value) == f"{path}: system.master_port = 0 must be a TCP port, an integer from 1 to 65535"
