"""Compare the DVC experiments of the current commit: `python -m tools.compare [--out DIR] [--curves NAME ...]`.

Reads every experiment through DVC's Python API (dvc.api.exp_show for the table, dvc.api.read for each
experiment's per-epoch accuracy curve) and writes, to --out (default reports/):
  experiments.md          one row per variant (its seeds' runs together: mean ± std, n, min–max of the test and
                          validation accuracy, the difference from --reference and whether it is within noise by
                          the test it names: paired by seed where both ran the same seeds, else Welch's), then
                          one row per experiment
  accuracy_vs_params.png  test accuracy against parameter count, one point per variant, its std as error bars
  epoch_acc.png           the per-epoch accuracy curves of the chosen experiments (--curves; default all): on the
                          test set, or on the held-out validation images where a run had them
and, when the experiments hold an ablation ladder (python -m tools.sweep --ablation):
  ablation.md             each rung's accuracy and its gain over the rung before, with its spread (in validation
                          accuracy where the runs held images out, so the verdicts never look at the test set)
  ablation.png            the same as a bar chart (ablation-PREFIX.png for a ladder queued with --prefix)"""
import argparse
import re
from pathlib import Path

import yaml

from cifar.figures import parse_curve, plot_ablation, plot_accuracy_vs_params, plot_curves
from cifar.noise import RULE, difference, seed_of, summarize, variant_of
from cifar.workspace import (
    CURVES_DIR,
    RUN_METRICS_FILE,
    TEST_METRICS_FILE,
    TRAIN_LOG_DIR,
    UserError,
    command,
    write_text,
)

RUN_METRICS = str(RUN_METRICS_FILE)
TRAIN_METRICS = (TRAIN_LOG_DIR / "metrics.json").as_posix()
TEST_METRICS = str(TEST_METRICS_FILE)
# the per-epoch accuracy: on the held-out validation images where the run had them, else on the test set
EPOCH_ACC = {split: (CURVES_DIR / split / "acc.tsv").as_posix() for split in ["validation", "test"]}
OUT_DIR = Path("reports")

# record key -> (file, column) in exp_show's rows
COLUMNS = {
    "blocks": ("params.yaml", "model.blocks"),
    "widths": ("params.yaml", "model.widths"),
    "weight_decay": ("params.yaml", "train.weight_decay"),
    "epochs": ("params.yaml", "train.epochs"),
    "params": (RUN_METRICS, "params"),
    "accuracy": (TEST_METRICS, "accuracy"),
    "accuracy_without_tta": (TEST_METRICS, "without_tta.accuracy"),
    # the final model's, with train.validation_images, without TTA (with it: validation_with_tta)
    "validation_accuracy_without_tta": (TRAIN_METRICS, "validation.acc"),
    "wall_time_s": (RUN_METRICS, "wall_time_s"),
    "images_per_s": (RUN_METRICS, "images_per_s"),
}


def _cell(row, file, column):
    """exp_show names a column by its key alone, or `file:key` when two files share the key."""
    value = row.get(f"{file}:{column}", row.get(column))
    if isinstance(value, str):  # lists come as text ("[2, 1, 1, 1]"); "!" or "-" mean no value
        value = yaml.safe_load(value) if value.startswith("[") else None
    return value


def scored(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def experiments(rows):
    """exp_show's rows -> one record per experiment (or baseline commit) with a test accuracy or, for a search
    trial (tools.search: the train stage alone, scored on validation), a validation accuracy; and the names of
    those with neither (queued, running, failed). Where the rows span several commits (-n N), every name says
    its commit, NAME@COMMIT, so that runs of one name in two commits are neither pooled nor confused."""
    records, pending, commit = [], [], None
    for row in rows:
        if row.get("rev") == "workspace":
            continue
        if row.get("typ") == "baseline":  # exp_show lists each commit, then its experiments
            commit = row["rev"]
        name = row.get("Experiment") or row["rev"]
        record = {"name": name, "rev": row["rev"], "commit": commit}
        record.update({key: _cell(row, *where) for key, where in COLUMNS.items()})
        record["validation_accuracy"] = validation_with_tta(row, record["validation_accuracy_without_tta"])
        if not (scored(record["accuracy"]) or scored(record["validation_accuracy"])) or not scored(record["params"]):
            if row.get("typ") != "baseline":
                pending.append(f"{name} ({row.get('State') or 'no results'})")
            continue
        record["params"] = int(record["params"])
        record["epochs"] = int(record["epochs"]) if record["epochs"] is not None else None
        records.append(record)
    if len({r["commit"] for r in records}) > 1:  # -n N: a name is one experiment per commit, so say which
        for r in records:
            if r["name"] != r["commit"]:
                r["name"] = f"{r['name']}@{r['commit']}"
    return records, pending


def validation_with_tta(row, without_tta):
    """The final model's validation accuracy scored as its test accuracy is, with the run's evaluate.tta: the
    train stage scores every mode (validation.acc_with_tta.MODE); a run from before logged only its own TTA's
    score (validation.acc_with_tta), and one from before that none, so its plain score stands in."""
    tta = row.get("params.yaml:evaluate.tta", row.get("evaluate.tta"))  # text, which _cell reads as no value
    for column in (f"validation.acc_with_tta.{tta}", "validation.acc_with_tta"):
        value = _cell(row, TRAIN_METRICS, column)
        if scored(value):
            return value
    return without_tta


def rank(test, validation):
    """Best first: by test accuracy, then the runs with validation accuracy alone (search trials)."""
    return (test is None, -(test if test is not None else validation))


def _number(value, fmt):
    return "–" if value is None else format(value, fmt)


def _table(header, rows):
    """A Markdown table: the header, then one line per row of cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in rows]) + "\n"


def markdown_table(records):
    header = ["experiment", "rev", "blocks", "widths", "weight decay", "epochs", "parameters", "test accuracy",
              "best epoch accuracy", "train time (s)", "images/s"]
    return _table(header, ([r["name"], r["rev"], str(r["blocks"]), str(r["widths"]), _number(r["weight_decay"], "g"),
                            _number(r["epochs"], "d"), f"{r['params']:,}", _number(r["accuracy"], ".2%"),
                            _number(r.get("best_epoch_acc"), ".2%"), _number(r["wall_time_s"], ".0f"),
                            _number(r["images_per_s"], ".0f")]
                           for r in sorted(records, key=lambda r: rank(r["accuracy"], r["validation_accuracy"]))))


# a variant's shape (its first run's), and what is summarized over its seeds
SHAPE = ["blocks", "widths", "weight_decay", "epochs", "params"]
SUMMARIZED = ["accuracy", "accuracy_without_tta", "validation_accuracy", "wall_time_s"]


def variant_groups(records):
    """The experiments grouped by variant (tools.sweep --seeds names a variant's runs VARIANT-sK), in order of
    their first run: each with its runs and the Summary of its test accuracy (with evaluate.tta), test
    accuracy without TTA, final validation accuracy (where the runs held images out) and training time, each
    value with its run's seed, so that two variants' runs pair up by seed."""
    groups = {}
    for r in records:
        groups.setdefault(variant_of(r["name"]), []).append(r)
    return [{"variant": variant, "runs": runs, **{key: runs[0][key] for key in SHAPE},
             **{key: summarize([r[key] for r in runs], [seed_of(r["name"]) for r in runs]) for key in SUMMARIZED}}
            for variant, runs in groups.items()]


def _summary(summary):
    return "–" if summary is None else summary.percent()


def _mean(summary):
    return None if summary is None else summary.mean


def _mean_seconds(summary):
    return _number(_mean(summary), ".0f")  # no run of the variant logged its time


def variants_table(groups, reference):
    """One row per variant: its shape, n, mean ± std (min–max) of the test and validation accuracy, and its
    test accuracy's difference from `reference` (a variant's name) with its t-test's verdict (paired by seed
    where both ran the same seeds, else Welch's; the cell names which)."""
    # the reference variant; across commits, the first commit's (exp_show lists HEAD first)
    base = next((g for g in groups if g["variant"].split("@")[0] == reference), None)
    header = ["variant", "n", "blocks", "widths", "weight decay", "epochs", "parameters", "test accuracy",
              "validation accuracy", f"test Δ vs {reference} (points)", "train time (s)"]

    def versus(g):
        if base is None or g is base or base["accuracy"] is None or g["accuracy"] is None:
            return "–"
        return difference(base["accuracy"], g["accuracy"]).points()
    return _table(header, ([g["variant"], str(len(g["runs"])), str(g["blocks"]), str(g["widths"]),
                            _number(g["weight_decay"], "g"), _number(g["epochs"], "d"), f"{g['params']:,}",
                            _summary(g["accuracy"]), _summary(g["validation_accuracy"]), versus(g),
                            _mean_seconds(g["wall_time_s"])]
                           for g in sorted(groups, key=lambda g: rank(_mean(g["accuracy"]),
                                                                      _mean(g["validation_accuracy"])))))


RUNG = re.compile(r"(?P<prefix>.*?)ablation-(?P<index>\d+)-(?P<rung>.+)")  # tools.sweep's ladder names


def ablations(groups):
    """{prefix: [rung group, ...] in ladder order} of the variants named as tools.sweep names the ladder's
    rungs (PREFIX + ablation-K-TRICK, over seeds), each with its gain over the rung before it (or, where that
    one has no results, over the nearest earlier one that has: `gain_over` names it). The gains are in
    validation accuracy where every rung held images out, so that the verdicts never look at the test set;
    else in test accuracy (`chosen_by` says which)."""
    ladders = {}
    for g in groups:
        match = RUNG.fullmatch(g["variant"])
        if match:
            ladders.setdefault(match["prefix"], []).append({**g, "index": int(match["index"]), "rung": match["rung"]})
    for rungs in ladders.values():
        rungs.sort(key=lambda r: r["index"])
        chosen_by = "validation_accuracy" if all(r["validation_accuracy"] for r in rungs) else "accuracy"
        for before, r in zip([None] + rungs, rungs):
            r["chosen_by"] = chosen_by
            r["gain"] = None if before is None else difference(before[chosen_by], r[chosen_by])
            r["gain_over"] = None if before is None else before["index"]
    return ladders


def _gain(r):
    if r["gain"] is None:
        return "–"
    skipped = "" if r["gain_over"] == r["index"] - 1 else f" (over rung {r['gain_over']})"
    return f"{r['gain'].points()}{skipped}"


def ablation_table(rungs):
    metric = "validation" if rungs[0]["chosen_by"] == "validation_accuracy" else "test"
    header = ["rung", "adds", "n", f"{metric} accuracy", f"gain in {metric} accuracy (points)", "test accuracy",
              "test without TTA", "train time (s)"]
    return _table(header, ([str(r["index"]), r["rung"], str(r["accuracy"].n), _summary(r[r["chosen_by"]]), _gain(r),
                            _summary(r["accuracy"]), _summary(r["accuracy_without_tta"]),
                            _mean_seconds(r["wall_time_s"])] for r in rungs))


def write_ablations(ladders, out_dir):
    """ablation.md (one section per ladder) and a bar chart per ladder; returns the chart files' names."""
    sections, charts = [], []
    for prefix, rungs in sorted(ladders.items()):
        chart = f"ablation-{prefix.rstrip('-')}.png" if prefix else "ablation.png"
        plot_ablation(rungs, out_dir / chart)
        title = f"Ablation{f' {prefix!r}' if prefix else ''}: each rung adds one trick to the one before"
        sections.append(f"## {title}\n\n{ablation_table(rungs)}\n{RULE}.\n\n![ablation]({chart})\n")
        charts.append(chart)
    write_text(out_dir / "ablation.md", "\n".join(sections))
    return charts


def read_epoch_curve(rev):
    """(split, (epochs, accuracy)) of an experiment's per-epoch accuracy curve."""
    import dvc.api
    from dvc.exceptions import DvcException, PathMissingError

    for split, path in EPOCH_ACC.items():
        try:
            return split, parse_curve(dvc.api.read(path, rev=rev), "acc")
        except (FileNotFoundError, PathMissingError):
            continue
        except (DvcException, KeyError, ValueError) as e:
            raise UserError(f"{path} at {rev}: not readable ({type(e).__name__}: {e})".splitlines()[0])
    raise UserError(f"{' or '.join(EPOCH_ACC.values())} at {rev}: missing")


def load_rows(num):
    import dvc.api
    from dvc.exceptions import DvcException, NotDvcRepoError
    from dvc.repo import Repo

    try:
        return dvc.api.exp_show(repo=Repo.find_root(), num=num)
    except NotDvcRepoError:
        raise UserError("not inside a DVC repository: run this from the project's root")
    except DvcException as e:
        raise UserError(f"dvc exp show: {e}".splitlines()[0])


def compare(out_dir=OUT_DIR, curves=None, num=1, reference="final"):
    """Write the tables and figures to out_dir; returns the experiment records."""
    records, pending = experiments(load_rows(num))
    if not records:
        raise UserError("no experiment with results yet: queue some (python -m tools.sweep), run them "
                        "(dvc queue start), and check them (dvc queue status)" +
                        (f"; without results: {', '.join(pending)}" if pending else ""))
    by_name = {r["name"]: r for r in records}
    unknown = [name for name in curves or [] if name not in by_name]
    if unknown:
        raise UserError(f"--curves: no experiment with results named {', '.join(unknown)} "
                        f"(known: {', '.join(by_name)})")
    epoch_acc = {r["name"]: read_epoch_curve(r["rev"]) for r in records}
    for r in records:
        r["best_epoch_acc"] = max(epoch_acc[r["name"]][1][1], default=None)
    splits = {split for split, _ in epoch_acc.values()}
    out_dir = Path(out_dir)
    groups = variant_groups(records)
    write_text(out_dir / "experiments.md", f"## Variants: mean ± standard deviation over seeds\n\n{RULE}.\n\n"
               f"{variants_table(groups, reference)}\n## Every run\n\n{markdown_table(records)}")
    points = [{"name": g["variant"], "params": g["params"], "accuracy": g["accuracy"].mean,
               "accuracy_std": g["accuracy"].std, "blocks": g["blocks"], "widths": g["widths"],
               "weight_decay": g["weight_decay"]} for g in groups if g["accuracy"] is not None]
    if points:
        plot_accuracy_vs_params(points, out_dir / "accuracy_vs_params.png")
    else:
        print("accuracy_vs_params.png: not drawn, no experiment has a test accuracy (search trials are scored on "
              "validation alone)")
    plot_curves({name: epoch_acc[name][1] for name in curves or by_name}, f"{' or '.join(sorted(splits))} accuracy",
                out_dir / "epoch_acc.png")
    ladders = ablations(groups)
    if ladders:
        print(f"ablation: wrote {out_dir}/ablation.md, {', '.join(write_ablations(ladders, out_dir))}")
    if pending:
        print(f"left out (no results): {', '.join(pending)}")
    return records


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tools.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(OUT_DIR), help=f"folder for the report (default {OUT_DIR}/)")
    parser.add_argument("--curves", nargs="+", metavar="NAME", help="experiments whose per-epoch accuracy "
                        "curves to overlay (default: all)")
    parser.add_argument("--reference", default="final", metavar="VARIANT",
                        help="the variant every other one's test accuracy is compared with (default: final)")
    parser.add_argument("-n", "--num", type=int, default=1,
                        help="experiments of the last N commits, as dvc exp show -n (default 1; -1: all)")
    args = parser.parse_args(argv)
    records = compare(args.out, args.curves, args.num, args.reference)
    figures = ["accuracy_vs_params.png"] if any(scored(r["accuracy"]) for r in records) else []
    print(f"compared {len(records)} experiment(s): wrote {args.out}/experiments.md, "
          f"{', '.join(figures + ['epoch_acc.png'])}")


if __name__ == "__main__":
    command(main)
