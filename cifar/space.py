"""A search's space (tools.search, docs/experiments.md): params.yaml keys of model and train, each a list of
choices or a range, read from a space file and checked against the params' schemas before any trial; and why a
proposal cannot train (refusal), decided before training."""
from dataclasses import dataclass

import torch

from .augment import EvaluateParams
from .data import DataParams
from .devices import System
from .export import ExportParams
from .model import ModelParams, ResNet, count_parameters
from .params import check_section, format_value, parse_override, parse_value
from .training import Recipe
from .workspace import UserError

SCHEMAS = {schema.section: schema for schema in [DataParams, ModelParams, Recipe, EvaluateParams, ExportParams, System]}
SEARCHED = ("model", "train")  # what a trial may vary: what it trains
NOT_SEARCHED = {  # keys of those sections a space may not vary, and why
    "model.max_params": "the budget is the search's constraint, not a choice",
    "train.validation_images": "every trial is scored on the same held-out images (set it with -S)",
    "train.nproc": "a search trial trains on one process (the search runs trials side by side instead)",
    "train.nnodes": "a search trial trains on one process (the search runs trials side by side instead)",
    "evaluate.tta": "every trial's final model is scored with each TTA mode on validation, and the best is chosen "
                    "from those scores, without training again",
}
TRAINABLE_DRAWS = 200  # random proposals tried before a space is refused as one that cannot train


@dataclass(frozen=True)
class Dimension:
    """One key's range (low..high, on a log scale if asked, in steps if asked) or its choices."""
    key: str
    kind: type = None  # int or float for a range
    low: float = None
    high: float = None
    log: bool = False
    step: float = None
    choices: tuple = None

    def labels(self):
        """Optuna's categorical choices: each value, lists spelt as `-S` spells them (Optuna stores scalars only)."""
        return [format_value(c) if isinstance(c, list) else c for c in self.choices]

    def suggest(self, trial):
        """The trial's value of this key, asked of Optuna."""
        if self.choices is not None:
            return self.value(trial.suggest_categorical(self.key, self.labels()))
        if self.kind is int:
            return trial.suggest_int(self.key, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)

    def value(self, label):
        """A value as Optuna recorded it, back as params.yaml holds it."""
        return self.choices[self.labels().index(label)] if self.choices is not None else label


def key_schema(key, source):
    """The schema of `section.key`, or a one-line error."""
    section, _, name = key.partition(".")
    schema = SCHEMAS.get(section)
    if schema is None or not name:
        raise UserError(f"{source}: {key!r} is not a params.yaml key section.key (sections: {', '.join(SCHEMAS)})")
    if name not in schema.model_fields:
        raise UserError(f"{source}: unknown key {key} (allowed in {section}: {', '.join(schema.model_fields)})")
    return schema


def check_values(base, values, source):
    """Each of `values` ({key: value}) checked on its own by its section's schema, inside `base` (params by
    section): the error names the key, the value and what the key allows."""
    for key, value in values.items():
        schema = key_schema(key, source)
        section, name = key.split(".")
        check_section(schema, {**base[section], name: value}, source, keys=[name])


def dimension(key, spec, base, source):
    """A Dimension from the space file's entry: a list of choices, or {low, high, log?, step?} for a number."""
    schema = key_schema(key, source)
    if key in NOT_SEARCHED:
        raise UserError(f"{source}: {key} cannot be searched: {NOT_SEARCHED[key]}")
    if key.split(".")[0] not in SEARCHED:
        raise UserError(f"{source}: {key} cannot be searched: only keys of {', '.join(SEARCHED)} (fixed settings "
                        "of other sections go in -S)")
    if isinstance(spec, list):
        if not spec:
            raise UserError(f"{source}: {key}: no choices (give a list of at least one value)")
        for choice in spec:
            check_values(base, {key: choice}, source)
        return Dimension(key, choices=tuple(spec))
    kind = schema.model_fields[key.split(".")[1]].annotation
    allowed = {"low", "high", "log", "step"}
    if not isinstance(spec, dict) or not {"low", "high"} <= set(spec) or set(spec) - allowed:
        raise UserError(f"{source}: {key}: expected a list of choices or {{low: L, high: H}} with optional log: "
                        "true and step: S")
    if kind not in (int, float):
        raise UserError(f"{source}: {key} is not a number: give a list of choices")
    low, high, log, step = spec["low"], spec["high"], spec.get("log", False), spec.get("step")
    check_values(base, {key: low}, source)
    check_values(base, {key: high}, source)
    if not low < high:
        raise UserError(f"{source}: {key}: low {low} must be below high {high} (a fixed value goes in -S)")
    if not isinstance(log, bool) or (log and low <= 0):
        raise UserError(f"{source}: {key}: log must be true or false, and a log scale needs low > 0")
    if step is not None and (isinstance(step, bool) or not isinstance(step, kind) or step <= 0 or log):
        raise UserError(f"{source}: {key}: step must be a positive {kind.__name__}, and not with log: true")
    return Dimension(key, kind, low, high, log, step)


@dataclass(frozen=True)
class Space:
    """The search space (its dimensions), the trials to run first, and the file's mapping as read."""
    dimensions: tuple
    first: tuple
    raw: dict

    @property
    def keys(self):
        return [d.key for d in self.dimensions]

    def suggest(self, trial):
        return {d.key: d.suggest(trial) for d in self.dimensions}

    def values(self, optuna_params):
        """A trial's params as Optuna recorded them, back as params.yaml holds them."""
        return {d.key: d.value(optuna_params[d.key]) for d in self.dimensions if d.key in optuna_params}

    def labels(self, values):
        """{key: value} as Optuna records it (enqueue_trial)."""
        return {d.key: (format_value(values[d.key]) if isinstance(values[d.key], list) else values[d.key])
                for d in self.dimensions if d.key in values}


def parse_space(raw, base, source):
    """The Space of a space file's mapping: `space:` {key: choices or range}, and optionally `first:` a list of
    {key: value} trials to run before sampling (e.g. the study's recipe, as a baseline)."""
    if not isinstance(raw, dict) or "space" not in raw or set(raw) - {"space", "first"}:
        raise UserError(f"{source}: expected a mapping with 'space' (key: choices or range) and optionally 'first'")
    if not isinstance(raw["space"], dict) or not raw["space"]:
        raise UserError(f"{source}: 'space' must map at least one params.yaml key to its choices or range")
    dimensions = tuple(dimension(key, spec, base, source) for key, spec in raw["space"].items())
    space = Space(dimensions, (), raw)
    first = raw.get("first") or []
    if not isinstance(first, list) or not all(isinstance(trial, dict) for trial in first):
        raise UserError(f"{source}: 'first' must be a list of {{key: value}} mappings")
    for trial in first:
        for key, value in trial.items():
            if key not in space.keys:
                raise UserError(f"{source}: first: {key} is not a key of the space ({', '.join(space.keys)})")
            d = next(d for d in dimensions if d.key == key)
            inside = value in d.choices if d.choices is not None else (
                isinstance(value, (int, float)) and not isinstance(value, bool) and d.low <= value <= d.high)
            if not inside:
                raise UserError(f"{source}: first: {key} = {value!r} is outside the space's "
                                f"{list(d.choices) if d.choices is not None else [d.low, d.high]}")
    return Space(dimensions, tuple(first), raw)


def settings_of(overrides, base):
    """The -S settings as {key: value}, each checked by its section's schema; base updated with them."""
    settings = {}
    for text in overrides:
        key, value = parse_override(text)
        settings[key] = parse_value(value)
        check_values(base, {key: settings[key]}, "-S")
        section, name = key.split(".")
        base[section] = {**base[section], name: settings[key]}
    return settings


def check_search(base):
    """What every trial needs: images held out to score it on, and one process."""
    recipe = Recipe.model_construct(**base["train"])  # its values as they are: the trials check them whole
    if not recipe.validation_images:
        raise UserError("the search is scored on held-out images and never reads the test set: set "
                        "-S train.validation_images=N (N > 0, e.g. 5000 of CIFAR-10's 50,000)")
    if recipe.world_size > 1:
        raise UserError(f"train.nproc * train.nnodes = {recipe.world_size}: a search trial trains on one process; "
                        "--jobs runs trials side by side instead")


def refusal(base, values):
    """Why a trial's params cannot train (its sections' schemas as a whole, then the budget), or None."""
    params = {section: dict(values_) for section, values_ in base.items()}
    for key, value in values.items():
        section, name = key.split(".")
        params[section][name] = value
    try:
        for section in SEARCHED:
            check_section(SCHEMAS[section], params[section], "trial")
    except UserError as e:
        return str(e).removeprefix("trial: ")
    model = params["model"]
    with torch.device("meta"):  # shapes only: a proposal of 300M parameters is counted without allocating them
        n = count_parameters(ResNet(model["blocks"], model["widths"]))
    if n > model["max_params"]:
        return f"{n:,} parameters, over model.max_params = {model['max_params']:,}"
    return None


def check_trainable(space, base, source):
    """Refuse, before the first trial, a space that cannot propose a trial that trains (every choice over
    budget, widths that never match blocks): random proposals until one can train, TRAINABLE_DRAWS at most.
    Seeded, so that the same space is judged alike every time."""
    import optuna

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    reason = None
    for _ in range(TRAINABLE_DRAWS):
        reason = refusal(base, space.suggest(study.ask()))
        if reason is None:
            return
    raise UserError(f"{source}: none of {TRAINABLE_DRAWS} random proposals can train (e.g. {reason}): narrow the "
                    "space")
