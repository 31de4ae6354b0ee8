"""Compare the DVC experiments of the current commit: `python -m tools.compare [--out DIR] [--curves NAME ...]`.

Reads every experiment through DVC's Python API (dvc.api.exp_show for the table, dvc.api.read for each
experiment's per-epoch accuracy curve) and writes, to --out (default reports/):
  experiments.md          one row per experiment with results: shape, weight decay, parameters, accuracy, time
  accuracy_vs_params.png  test accuracy against parameter count, every experiment
  epoch_acc.png           the per-epoch accuracy curves of the chosen experiments (--curves; default all): on the
                          test set, or on the held-out validation images where a run had them
and, when the experiments hold an ablation ladder (python -m tools.sweep --ablation):
  ablation.md             each rung's test accuracy and its gain over the rung before
  ablation.png            the same as a bar chart (ablation-PREFIX.png for a ladder queued with --prefix)"""
import argparse
import re
from pathlib import Path

import yaml

from cifar.figures import parse_curve, plot_ablation, plot_accuracy_vs_params, plot_curves
from cifar.workspace import CURVES_DIR, RUN_METRICS_FILE, TEST_METRICS_FILE, UserError, command, write_text

RUN_METRICS = str(RUN_METRICS_FILE)
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
    "wall_time_s": (RUN_METRICS, "wall_time_s"),
    "images_per_s": (RUN_METRICS, "images_per_s"),
}


def _cell(row, file, column):
    """exp_show names a column by its key alone, or `file:key` when two files share the key."""
    value = row.get(f"{file}:{column}", row.get(column))
    if isinstance(value, str):  # lists come as text ("[2, 1, 1, 1]"); "!" or "-" mean no value
        value = yaml.safe_load(value) if value.startswith("[") else None
    return value


def experiments(rows):
    """exp_show's rows -> one record per experiment (or baseline commit) with a test accuracy, and the
    names of those without one (queued, running, failed)."""
    records, pending = [], []
    for row in rows:
        if row.get("rev") == "workspace":
            continue
        name = row.get("Experiment") or row["rev"]
        record = {"name": name, "rev": row["rev"]}
        record.update({key: _cell(row, *where) for key, where in COLUMNS.items()})
        if not isinstance(record["accuracy"], (int, float)) or not isinstance(record["params"], (int, float)):
            if row.get("typ") != "baseline":
                pending.append(f"{name} ({row.get('State') or 'no results'})")
            continue
        record["params"] = int(record["params"])
        record["epochs"] = int(record["epochs"]) if record["epochs"] is not None else None
        records.append(record)
    return records, pending


def _number(value, fmt):
    return "–" if value is None else format(value, fmt)


def markdown_table(records):
    header = ["experiment", "rev", "blocks", "widths", "weight decay", "epochs", "parameters", "test accuracy",
              "best epoch accuracy", "train time (s)", "images/s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in sorted(records, key=lambda r: -r["accuracy"]):
        cells = [r["name"], r["rev"], str(r["blocks"]), str(r["widths"]), _number(r["weight_decay"], "g"),
                 _number(r["epochs"], "d"), f"{r['params']:,}", f"{r['accuracy']:.2%}",
                 _number(r.get("best_epoch_acc"), ".2%"), _number(r["wall_time_s"], ".0f"),
                 _number(r["images_per_s"], ".0f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


RUNG = re.compile(r"(?P<prefix>.*?)ablation-(?P<index>\d+)-(?P<rung>.+)")  # tools.sweep's ladder names


def ablations(records):
    """{prefix: [rung record, ...] in ladder order} of the experiments named as tools.sweep names the
    ladder's rungs (PREFIX + ablation-K-TRICK), each with its gain over the rung before it (or, where that
    one has no results, over the nearest earlier one that has: `gain_over` names it)."""
    ladders = {}
    for r in records:
        match = RUNG.fullmatch(r["name"])
        if match:
            ladders.setdefault(match["prefix"], []).append({**r, "index": int(match["index"]), "rung": match["rung"]})
    for rungs in ladders.values():
        rungs.sort(key=lambda r: r["index"])
        for before, r in zip([None] + rungs, rungs):
            r["gain"] = None if before is None else r["accuracy"] - before["accuracy"]
            r["gain_over"] = None if before is None else before["index"]
    return ladders


def _gain(r):
    if r["gain"] is None:
        return "–"
    skipped = "" if r["gain_over"] == r["index"] - 1 else f" (over rung {r['gain_over']})"
    return f"{100 * r['gain']:+.2f}{skipped}"


def ablation_table(rungs):
    header = ["rung", "adds", "experiment", "test accuracy", "gain (points)", "without TTA", "train time (s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rungs:
        cells = [str(r["index"]), r["rung"], r["name"], f"{r['accuracy']:.2%}", _gain(r),
                 _number(r["accuracy_without_tta"], ".2%"),
                 _number(r["wall_time_s"], ".0f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_ablations(ladders, out_dir):
    """ablation.md (one section per ladder) and a bar chart per ladder; returns the chart files' names."""
    sections, charts = [], []
    for prefix, rungs in sorted(ladders.items()):
        chart = f"ablation-{prefix.rstrip('-')}.png" if prefix else "ablation.png"
        plot_ablation(rungs, out_dir / chart)
        title = f"Ablation{f' {prefix!r}' if prefix else ''}: each rung adds one trick to the one before"
        sections.append(f"## {title}\n\n{ablation_table(rungs)}\n![ablation]({chart})\n")
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


def compare(out_dir=OUT_DIR, curves=None, num=1):
    """Write the table and both figures to out_dir; returns the experiment records."""
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
    write_text(out_dir / "experiments.md", markdown_table(records))
    plot_accuracy_vs_params(records, out_dir / "accuracy_vs_params.png")
    plot_curves({name: epoch_acc[name][1] for name in curves or by_name}, f"{' or '.join(sorted(splits))} accuracy",
                out_dir / "epoch_acc.png")
    ladders = ablations(records)
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
    parser.add_argument("-n", "--num", type=int, default=1,
                        help="experiments of the last N commits, as dvc exp show -n (default 1; -1: all)")
    args = parser.parse_args(argv)
    records = compare(args.out, args.curves, args.num)
    print(f"compared {len(records)} experiment(s): wrote {args.out}/experiments.md, accuracy_vs_params.png, "
          "epoch_acc.png")


if __name__ == "__main__":
    command(main)
