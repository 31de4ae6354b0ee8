"""The sweep's presets pinned to literal values (docs/experiments.md gives them), so that a changed number
shows here rather than only in the expressions that build the commands."""
from pathlib import Path

from tools.sweep import TRICKS, TUNED, ladder, study, variants

STUDY = study(Path(__file__).resolve().parent.parent / "params.yaml")


def test_the_tricks_values():
    assert TRICKS == [
        ("sgd-nesterov", {"train.optimizer": "sgd", "train.momentum": 0.9, "train.nesterov": True,
                          "train.max_lr": 0.2, "train.weight_decay": 0.0005}),
        ("label-smoothing", {"train.label_smoothing": 0.2}),
        ("alternating-flip", {"train.flip": "alternating"}),
        ("ema", {"train.ema_decay": 0.99}),
        ("cutout", {"train.cutout": 8}),
        ("flip-tta", {"evaluate.tta": "flip"}),
        ("flip-translate-tta", {"evaluate.tta": "flip_translate"}),
    ]


def test_the_study_and_the_tuned_preset_by_value():
    assert STUDY == {"model.blocks": [2, 1, 1, 1], "model.widths": [64, 128, 256, 512], "train.weight_decay": 0.0001,
                     "train.optimizer": "adam", "train.max_lr": 0.01, "train.label_smoothing": 0.0,
                     "train.flip": "random", "train.ema_decay": 0, "train.cutout": 0, "evaluate.tta": "none"}
    # tuned: the search's best trial (docs/experiments.md), the study's training with flip-and-translate TTA
    assert TUNED == {"evaluate.tta": "flip_translate"}
    assert variants(STUDY)["tuned"] == {
        "model.blocks": [2, 1, 1, 1], "model.widths": [64, 128, 256, 512], "train.weight_decay": 0.0001,
        "train.optimizer": "adam", "train.max_lr": 0.01, "train.label_smoothing": 0.0, "train.flip": "random",
        "train.ema_decay": 0, "train.cutout": 0, "evaluate.tta": "flip_translate"}


def test_each_variant_changes_exactly_its_named_keys():
    found = variants(STUDY)
    assert list(found) == ["final", "blocks-1111", "blocks-6543", "under-1m", "wd-1e-6", "wd-1e-5", "wd-5e-4", "tuned"]
    changed = {name: {k: v for k, v in keys.items() if STUDY.get(k) != v} for name, keys in found.items()}
    assert changed["final"] == {}
    assert changed["blocks-1111"] == {"model.blocks": [1, 1, 1, 1]}
    assert changed["blocks-6543"] == {"model.blocks": [6, 5, 4, 3], "model.widths": [32, 64, 128, 256]}
    assert changed["under-1m"] == {"model.widths": [16, 32, 64, 128]}
    # the weight-decay sweep by name: each name says its value
    assert changed["wd-1e-6"] == {"train.weight_decay": 0.000001}
    assert changed["wd-1e-5"] == {"train.weight_decay": 0.00001}
    assert changed["wd-5e-4"] == {"train.weight_decay": 0.0005}


def test_the_ladders_last_rung_has_every_trick():
    last = ladder(STUDY)["ablation-7-flip-translate-tta"]
    assert {k: last[k] for k in ["train.optimizer", "train.max_lr", "train.weight_decay", "train.label_smoothing",
                                 "train.flip", "train.ema_decay", "train.cutout", "evaluate.tta"]} == {
        "train.optimizer": "sgd", "train.max_lr": 0.2, "train.weight_decay": 0.0005, "train.label_smoothing": 0.2,
        "train.flip": "alternating", "train.ema_decay": 0.99, "train.cutout": 8, "evaluate.tta": "flip_translate"}
