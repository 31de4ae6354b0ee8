"""Stage entry points on bad input: one line on stderr naming the problem, exit status 1, no output.

Each stage runs once as its own process (`python -m stages.X`, as DVC runs it) on an invalid param, for the
real exit status and stderr; the other cases call the same entry point (workspace.run around the stage's
main) in this process, which is what the subprocess would run, without starting Python and torch again."""
import hashlib
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from deadlines import finish_all
from dvcrepo import call, start

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def workdir(tmp_path, archive):
    for package in ["stages", "cifar"]:
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["url"], params["data"]["md5"] = archive
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path


def set_param(workdir, section, key, value):
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    params[section][key] = value
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))


def stage_processes(workdir, stages):
    """`python -m stages.<stage>` in workdir for each stage, as DVC runs it, all at once: {stage: (exit status,
    stderr)}."""
    processes = [start(workdir, sys.executable, "-m", f"stages.{stage}", PYTHONDONTWRITEBYTECODE="1")
                 for stage in stages]
    return {stage: (code, err.strip()) for stage, (code, _, err) in
            zip(stages, finish_all(processes, 120, f"the stages {', '.join(stages)} at once"))}


@pytest.fixture
def run_stage(stage):
    """A stage's entry point in this process, in workdir (conftest's runner): (exit status, stderr)."""
    def call(workdir, name):
        ran = stage(workdir, name)
        return ran.code, ran.err.strip()
    return call


def files_under(folder):
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*") if p.is_file()) if folder.exists() else []


def assert_one_line_error(code, stderr, *phrases):
    """Exit status 1 and the error as the last line of stderr (a download's progress bar may precede it)."""
    error = stderr.splitlines()[-1]
    assert code == 1 and error.startswith("error: ") and "Traceback" not in stderr, stderr
    for phrase in phrases:
        assert phrase in error, stderr


def test_download_with_a_wrong_checksum(workdir, run_stage):
    set_param(workdir, "data", "md5", "f" * 32)
    assert_one_line_error(*run_stage(workdir, "download"), "data.md5 is " + "f" * 32)
    assert files_under(workdir / "data") == []


def test_download_on_bad_input_leaves_nothing_and_a_corrected_rerun_succeeds(workdir, archive_dir, run_stage):
    good = yaml.safe_load((workdir / "params.yaml").read_text())["data"]
    short = (archive_dir / "cifar-10-python.tar.gz").read_bytes()[:5000]  # truncated, with its own md5
    (workdir / "short.tar.gz").write_bytes(short)
    for url, md5, phrase in [(str(workdir / "short.tar.gz"), hashlib.md5(short).hexdigest(), "not a readable .tar.gz"),
                             ("htp:/example.com/cifar.tar.gz", good["md5"], "unsupported scheme 'htp'"),
                             (str(workdir / "absent.tar.gz"), good["md5"], "absent.tar.gz': no such file")]:
        set_param(workdir, "data", "url", url)
        set_param(workdir, "data", "md5", md5)
        assert_one_line_error(*run_stage(workdir, "download"), phrase)
        assert files_under(workdir / "data") == []
    set_param(workdir, "data", "url", good["url"])
    set_param(workdir, "data", "md5", good["md5"])
    assert run_stage(workdir, "download")[0] == 0
    assert "cifar-10-batches-py/test_batch" in files_under(workdir / "data")


def test_train_over_the_budget_fails_before_any_work(workdir, run_stage):
    set_param(workdir, "model", "max_params", 1000)
    assert_one_line_error(*run_stage(workdir, "train"), "over model.max_params = 1,000")
    assert files_under(workdir / "models") == [] and files_under(workdir / "metrics") == []


@pytest.mark.parametrize("section, key, value, error, readers", [
    ("train", "epochs", 0, "train.epochs = 0 must be an integer >= 1", ["train"]),
    ("model", "widths", [8], "model.blocks [2, 1, 1, 1] and model.widths [8] must have the same length (one entry "
     "per layer)", ["train"]),
    ("evaluate", "tta", "crops", "evaluate.tta = 'crops' must be one of none, flip, flip_translate", ["evaluate"]),
    ("system", "device", "gpu", "system.device = 'gpu' must be auto, cpu, cuda or cuda:K (K: a GPU index)",
     ["train", "evaluate"]),
])
def test_an_invalid_param_fails_every_stage_that_reads_it_before_any_work(workdir, section, key, value, error,
                                                                           readers):
    """Each stage checks the sections it reads, whole, before any work: a bad value fails exactly those
    stages, in one line, and leaves download (which reads only `data`) to do its work."""
    set_param(workdir, section, key, value)
    for stage, (code, stderr) in stage_processes(workdir, [*readers, "download"]).items():
        if stage in readers:
            assert stderr == f"error: params.yaml: {error}" and code == 1, (stage, stderr)
        else:
            assert code == 0 and (workdir / "data/cifar-10-batches-py/batches.meta").is_file(), stderr


def test_evaluate_without_a_checkpoint(workdir, run_stage):
    assert_one_line_error(*run_stage(workdir, "evaluate"), "models/model.pt: no such checkpoint")


@pytest.mark.parametrize("checkpoint, phrase", [
    (b"\x00 half a file", "not a readable model checkpoint"),
    ({"config": {"blocks": [1, 1], "widths": [8, 16], "num_classes": 10},
      "state_dict": {"stem.0.weight": torch.zeros(4, 3, 3, 3)}, "stats": {}, "classes": [], "precision": "fp32"},
     "weights do not fit the architecture"),
])
def test_evaluate_on_a_damaged_or_incompatible_checkpoint(workdir, checkpoint, phrase, run_stage):
    (workdir / "models").mkdir()
    if isinstance(checkpoint, bytes):
        (workdir / "models/model.pt").write_bytes(checkpoint)
    else:
        torch.save(checkpoint, workdir / "models/model.pt")
    assert_one_line_error(*run_stage(workdir, "evaluate"), f"models/model.pt: {phrase}")
    assert files_under(workdir / "metrics") == []


def test_a_stage_on_an_older_python_says_so_in_one_line(workdir):
    """Python 3.10 stood in for by its version number: the package refuses before a 3.11-only module loads."""
    code = "import sys; sys.version_info = (3, 10, 12, 'final', 0); import runpy; runpy.run_module('stages.train')"
    status, _, err = call(workdir, sys.executable, "-c", code)
    assert status == 1 and err == "error: this project needs Python 3.11 or newer; this is Python 3.10.12\n", err
