"""The stages' shared ground: where they read and write (relative to the repository root, as dvc.yaml
declares), writing outputs whole or not at all, and one-line errors for problems the user can fix."""
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

DATA_DIR = Path("data")
BATCHES_DIR = DATA_DIR / "cifar-10-batches-py"  # the archive's folder (cifar10.ARCHIVE_FOLDER), extracted as is
STATS_FILE = DATA_DIR / "stats.json"
MODEL_FILE = Path("models/model.pt")
ONNX_FILE = Path("models/model.onnx")  # the export stage's: model.pt with its normalization, for onnxruntime
SUMMARY_FILE = Path("models/summary.txt")  # torchsummary's layer table
TRAIN_LOG_DIR = Path("metrics/train")  # DVCLive: metrics.json (last epoch's values) + plots/metrics/**.tsv
CURVES_DIR = TRAIN_LOG_DIR / "plots" / "metrics"
RUN_METRICS_FILE = TRAIN_LOG_DIR / "run.json"  # the run's size, time and speed: a column each in dvc exp show
EVALUATE_DIR = Path("metrics/evaluate")
TEST_METRICS_FILE = EVALUATE_DIR / "metrics.json"  # test accuracy and loss
PER_CLASS_FILE = EVALUATE_DIR / "per_class.json"  # test accuracy per class: a plot, not a column
CONFUSION_FILE = EVALUATE_DIR / "confusion.json"
EXPORT_DIR = Path("metrics/export")
EXPORT_METRICS_FILE = EXPORT_DIR / "metrics.json"  # the ONNX file against PyTorch: largest logit difference, agreement
PLOTS_DIR = Path("plots")


class UserError(Exception):
    """Bad input (params, URL, archive, checkpoint): reported as one line, no traceback."""


def command(main, *args):
    """Run a stage's or tool's main(*args); a UserError becomes 'error: <message>' on stderr and exit status 1 (or the
    error's own `exit_status`)."""
    try:
        main(*args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(getattr(e, "exit_status", 1))


@contextmanager
def atomic_path(path):
    """Yield a temporary name beside `path`; rename it onto `path` only if the block finishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path, text):
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=1) + "\n")


def read_json(path, produced_by):
    """A JSON input of a stage; if missing, say which stage produces it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: missing; run the {produced_by} stage first (dvc repro {produced_by})")
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})")
