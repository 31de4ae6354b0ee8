"""The study's comparisons as DVC experiments: the sweep queues variants, DVC's queue runs them, and the
comparison reads them back through DVC's Python API. Two tiny variants on the synthetic archive; the tests
run in order and share one repository."""
import subprocess
import sys
import time

import pytest
from dvc.api import exp_show
from dvcrepo import assert_curves_overlaid, dvc, env, make_repo, run

from stages.compare import experiments, markdown_table
from stages.model import ResNet, count_parameters
from stages.sweep import VARIANTS, queue_commands

SWEEP = ["--only", "final", "blocks-1111", "--width-divisor", "8", "-S", "train.epochs=2"]
PARAMS = {"final": 79186, "blocks-1111": 78002}  # [2,1,1,1] and [1,1,1,1] x [8,16,32,64]
PNG = b"\x89PNG\r\n\x1a\n"


def module(repo, name, *args):
    """python -m stages.<name> args in repo -> (exit status, stdout + stderr)."""
    result = subprocess.run([sys.executable, "-m", f"stages.{name}", *args], cwd=repo, env=env(),
                            capture_output=True, text=True, timeout=300)
    return result.returncode, result.stdout + result.stderr


def queue_states(repo):
    """{experiment name: state} from `dvc queue status`."""
    table = dvc(repo, "queue", "status", timeout=120).split("\n\n")[0]  # then a blank line and the workers
    return {parts[1]: parts[-1] for parts in (line.split() for line in table.splitlines()[1:])}


def start_worker(repo, log):
    """`dvc queue start -j 1`. Its worker keeps the command's stdout and stderr open, so they go to a file:
    through a pipe, the command would seem to run as long as the worker."""
    with open(log, "w") as f:
        result = subprocess.run([sys.executable, "-m", "dvc", "queue", "start", "-j", "1"], cwd=repo, env=env(),
                                stdout=f, stderr=subprocess.STDOUT, timeout=120)
    assert result.returncode == 0, log.read_text()


def wait_for_experiments(repo, names, timeout=900):
    """Wait until each name has an experiment ref, reading git's refs only: polling `dvc queue status` makes
    the worker read the broker's control messages, and a message read half-written crashes it (dvc 3.67)."""
    deadline = time.monotonic() + timeout
    while True:
        refs = run(repo, "git", "for-each-ref", "--format=%(refname)", "refs/exps").split()
        if names <= {ref.rsplit("/", 1)[1] for ref in refs if not ref.startswith("refs/exps/celery/")}:
            return
        failed = "refs/exps/celery/failed" in refs
        assert not failed and time.monotonic() < deadline, dvc(repo, "queue", "status")
        time.sleep(5)


@pytest.fixture(scope="module")
def repo(tmp_path_factory, archive):
    repo = make_repo(tmp_path_factory.mktemp("experiments"), archive)
    yield repo
    # the queue's worker runs in the background: stop it, and any task a failed test left running
    subprocess.run([sys.executable, "-m", "dvc", "queue", "stop", "--kill"], cwd=repo, env=env(),
                   capture_output=True, timeout=120)


def test_the_study_variants_fit_the_budget_and_the_small_one_is_under_a_million():
    counts = {}
    for name, variant in VARIANTS.items():
        counts[name] = count_parameters(ResNet(variant["model.blocks"], variant["model.widths"]))
    assert counts["final"] == 4977226 and counts["blocks-1111"] == 4903242 and counts["blocks-6543"] == 4865322
    assert counts["under-1m"] == 313498
    assert {VARIANTS[n]["train.weight_decay"] for n in ["final", "wd-1e-6", "wd-1e-5", "wd-5e-4"]} == \
        {1e-4, 1e-6, 1e-5, 5e-4}


def test_a_sweep_command_sets_the_compared_keys_then_the_overrides():
    (command,) = queue_commands(["blocks-6543"], width_divisor=4, overrides=["train.epochs=5"], prefix="cpu-")
    assert command == ["dvc", "exp", "run", "--queue", "-n", "cpu-blocks-6543", "-S", "model.blocks=[6,5,4,3]",
                       "-S", "model.widths=[8,16,32,64]", "-S", "train.weight_decay=0.0001", "-S", "train.epochs=5"]
    (command,) = queue_commands(["wd-1e-6"], overrides=["train.weight_decay=3e-4"])
    assert command.count("-S") == 3 and "train.weight_decay=3e-4" in command


@pytest.mark.parametrize("args, phrase", [
    (["--only", "final", "deeper"], "unknown variant deeper (known: final,"),
    (["-S", "epochs"], "-S 'epochs': expected section.key=value"),
    (["--width-divisor", "3"], "--width-divisor 3 does not divide model.widths [64, 128, 256, 512]"),
])
def test_sweep_rejects_bad_input_in_one_line(repo, args, phrase):
    code, output = module(repo, "sweep", *args)
    assert code == 1 and output.strip().splitlines()[-1].startswith("error: ") and phrase in output, output
    assert "Traceback" not in output


def test_compare_reads_the_columns_exp_show_gives():
    rows = [{"rev": "workspace", "typ": "baseline", "accuracy": "!"},
            {"rev": "main", "typ": "baseline", "Experiment": None, "accuracy": "!", "params": "!"},
            {"rev": "abc1234", "typ": "branch_commit", "Experiment": "wide", "State": "Success",
             "model.blocks": "[1, 1, 1, 1]", "model.widths": "[64, 128, 256, 512]", "train.weight_decay": 1e-4,
             "train.epochs": 70.0, "params": 4903242.0, "metrics/evaluate/metrics.json:accuracy": 0.93,
             "best_val_acc": 0.935, "wall_time_s": 1500.0, "images_per_s": 2400.0},
            {"rev": "def5678", "typ": "branch_commit", "Experiment": "deep", "State": "Queued", "params": None}]
    records, pending = experiments(rows)
    assert pending == ["deep (Queued)"]
    (wide,) = records
    assert wide["name"] == "wide" and wide["blocks"] == [1, 1, 1, 1] and wide["accuracy"] == 0.93
    assert wide["params"] == 4903242 and wide["epochs"] == 70
    assert "| wide | abc1234 | [1, 1, 1, 1] | [64, 128, 256, 512] | 0.0001 | 70 | 4,903,242 | 93.00% | 93.50% | " \
           "1500 | 2400 |" in markdown_table(records)


def test_compare_without_experiments_says_how_to_get_some(repo, tmp_path):
    code, output = module(repo, "compare", "--out", str(tmp_path / "report"))
    assert code == 1 and "error: no experiment with results yet: queue some (python -m stages.sweep)" in output
    assert not (tmp_path / "report").exists()


def test_the_sweep_queues_two_tiny_experiments_and_the_queue_runs_them(repo, tmp_path):
    code, output = module(repo, "sweep", *SWEEP)
    assert code == 0 and "queued 2 experiment(s)" in output, output
    assert queue_states(repo) == {"final": "Queued", "blocks-1111": "Queued"}

    start_worker(repo, tmp_path / "queue-start.log")
    wait_for_experiments(repo, {"final", "blocks-1111"})
    assert queue_states(repo) == {"final": "Success", "blocks-1111": "Success"}

    code, output = module(repo, "sweep", "--only", "final")  # a name is one experiment per commit
    assert code == 1 and "error: queueing final failed: " in output and "conflicts with existing experiment" in output


def test_exp_show_lists_both_with_their_metrics(repo):
    rows = {row["Experiment"]: row for row in exp_show(repo=str(repo)) if row["Experiment"]}
    assert set(rows) == {"final", "blocks-1111"}
    for name, row in rows.items():
        assert row["params"] == PARAMS[name] and row["train.epochs"] == 2
        assert row["accuracy"] > 0.3, f"{name}: test accuracy {row['accuracy']}, chance is 0.1"
        assert row["wall_time_s"] > 0 and row["images_per_s"] > 0 and 0 < row["best_val_acc"] <= 1
    assert rows["blocks-1111"]["model.blocks"] == "[1, 1, 1, 1]" and rows["final"]["model.blocks"] == "[2, 1, 1, 1]"


def test_compare_draws_accuracy_against_size_and_the_curves_and_tabulates(repo):
    code, output = module(repo, "compare", "--out", "report", "--curves", "blocks-1111", "final")
    assert code == 0 and "compared 2 experiment(s)" in output, output
    for name in ["accuracy_vs_params.png", "val_acc.png"]:
        assert (repo / "report" / name).read_bytes().startswith(PNG), name
    table = (repo / "report" / "experiments.md").read_text().splitlines()
    assert table[0].startswith("| experiment | rev | blocks | widths |") and len(table) == 4
    assert any(line.startswith("| final |") and "| 79,186 |" in line for line in table), table
    assert any(line.startswith("| blocks-1111 |") and "| 78,002 |" in line for line in table), table
    assert not [p for p in (repo / "report").iterdir() if p.name.startswith(".")]  # no temporary files left

    code, output = module(repo, "compare", "--curves", "final", "nope")
    assert code == 1 and "error: --curves: no experiment with results named nope" in output


def test_plots_diff_overlays_two_experiments(repo):
    assert_curves_overlaid(repo, "final", "blocks-1111")
