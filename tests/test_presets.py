"""The sweep's presets pinned to literal values (docs/experiments.md gives them), so that a changed number
shows here rather than only in the expressions that build the commands."""
from pathlib import Path

import pytest

from cifar.model import ResNet, count_parameters
from cifar.workspace import UserError
from tools import sweep
from tools.sweep import FAST, SEARCHED, TRICKS, TUNED, ladder, planned, study, variants

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


def test_the_fast_preset_by_value_the_study_s_model_in_a_third_of_its_epochs():
    assert FAST == {"train.optimizer": "muon", "train.muon_lr": 0.1, "train.muon_momentum": 0.6, "train.max_lr": 0.2,
                    "train.momentum": 0.9, "train.nesterov": True, "train.weight_decay": 0.0005,
                    "train.label_smoothing": 0.2, "train.flip": "alternating", "train.warmup_fraction": 0.25,
                    "train.epochs": 20, "evaluate.tta": "flip_translate"}
    fast = variants(STUDY)["fast"]
    assert {k: v for k, v in fast.items() if k in STUDY} == {**STUDY, **{k: v for k, v in FAST.items() if k in STUDY}}
    # full size, under the budget, and at most a third of the study's 70 epochs
    assert count_parameters(ResNet(fast["model.blocks"], fast["model.widths"])) == 4977226
    assert fast["train.epochs"] * 3 <= 70


def test_each_variant_changes_exactly_its_named_keys():
    found = variants(STUDY)
    assert list(found) == ["final", "blocks-1111", "blocks-6543", "under-1m", "wd-1e-6", "wd-1e-5", "wd-5e-4", "tuned",
                           "fast"]
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


def test_a_confirmation_of_tuned_never_runs_its_search_s_seed():
    # both searches trained at train.seed 0: tuned-s0 would be the second search's trial 1, bit for bit
    assert SEARCHED == {"tuned": 0}
    found = variants(STUDY)
    with pytest.raises(UserError, match=r"^--seeds 0 1 2: tuned's run at seed 0 is its search's selected trial"):
        planned(["final", "tuned"], found, seeds=[0, 1, 2])
    assert [name for name, _ in planned(["final", "tuned"], found, seeds=[1, 2, 3])] == [
        "final-s1", "final-s2", "final-s3", "tuned-s1", "tuned-s2", "tuned-s3"]
    # without tuned, or without --seeds (one run, not a confirmation), seed 0 is anyone's
    assert [name for name, _ in planned(["final", "wd-1e-5"], found, seeds=[0, 1])] == [
        "final-s0", "final-s1", "wd-1e-5-s0", "wd-1e-5-s1"]
    assert [name for name, _ in planned(["tuned"], found)] == ["tuned"]
    # a search's best (--best-of) at the seed its trials trained at
    with pytest.raises(UserError, match=r"^--seeds 4 5: s-best's run at seed 4 .* e\.g\. --seeds 5 6$"):
        planned(["final", "s-best"], {**found, "s-best": found["final"]}, seeds=[4, 5], searched={"s-best": 4})


def test_a_search_s_best_is_never_confirmed_at_the_seed_its_trials_trained_at(monkeypatch, capsys, tmp_path):
    # --best-of STUDY: the study's trials trained at params.yaml's train.seed (here 3) unless the space searched it
    text = (Path(__file__).resolve().parent.parent / "params.yaml").read_text()
    assert text.count("\n  seed: 0 ") == 1
    (tmp_path / "params.yaml").write_text(text.replace("\n  seed: 0 ", "\n  seed: 3 "))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sweep, "best_of", lambda recipe, name, storage: {**recipe, "train.max_lr": 0.02})
    with pytest.raises(UserError, match=r"^--seeds 2 3: s-best's run at seed 3 is its search's selected trial"):
        sweep.main(["--best-of", "s", "--only", "final", "s-best", "--seeds", "2", "3", "--dry-run"])
    sweep.main(["--best-of", "s", "--only", "final", "s-best", "--seeds", "0", "1", "--dry-run"])
    assert [line.split()[5] for line in capsys.readouterr().out.splitlines()] == [
        "final-s0", "final-s1", "s-best-s0", "s-best-s1"]
    monkeypatch.setattr(sweep, "best_of", lambda recipe, name, storage: {**recipe, "train.seed": 7})
    with pytest.raises(UserError, match=r"^--seeds 6 7: s-best's run at seed 7 "):
        sweep.main(["--best-of", "s", "--only", "s-best", "--seeds", "6", "7", "--dry-run"])
