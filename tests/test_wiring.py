"""dvc.yaml's wiring: each stage depends on exactly the code it runs and the params it reads, the `system`
section changes nothing DVC or the checkpoint cares about, and the model is a DVC artifact."""
import re
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest
import yaml
from dvcrepo import (
    REPO,
    copy_repo,
    dvc,
    run,
    set_params,
    stages_run,
)

from cifar import imports
from cifar.augment import EvaluateParams
from cifar.data import DataParams
from cifar.devices import System
from cifar.export import ExportParams
from cifar.model import ModelParams
from cifar.training import Recipe
from stages import download, evaluate, export, plot, stats, train

DVC_YAML = yaml.safe_load((REPO / "dvc.yaml").read_text())
STAGES = DVC_YAML["stages"]
SCHEMAS = {schema.section: schema for schema in [DataParams, ModelParams, Recipe, EvaluateParams, ExportParams,
                                                   System]}


# Code: the stage script and every project module it imports, transitively (cifar/imports.py reads them)

def code_of(script):
    """The stage's code as paths relative to the repository."""
    return {p.relative_to(REPO).as_posix() for p in imports.code_of(script)}


def stage_script(name):
    match = re.fullmatch(r"python -m stages\.(\w+)", STAGES[name]["cmd"])
    assert match, f"dvc.yaml stage {name}: cmd {STAGES[name]['cmd']!r} is not `python -m stages.<module>`"
    return f"stages/{match.group(1)}.py"


def test_stages_holds_exactly_the_pipelines_stage_scripts():
    """`ls stages/` is the pipeline: one script per dvc.yaml stage, nothing else."""
    assert sorted(p.name for p in (REPO / "stages").iterdir() if p.name != "__pycache__") == \
        sorted(Path(stage_script(name)).name for name in STAGES)


@pytest.mark.parametrize("name", list(STAGES))
def test_each_stage_depends_on_exactly_the_code_it_runs(name):
    declared = {dep for dep in STAGES[name]["deps"] if dep.endswith(".py")}
    imported = code_of(stage_script(name))
    missing, extra = sorted(imported - declared), sorted(declared - imported)
    assert not missing, f"dvc.yaml stage {name}: deps lack {', '.join(missing)}, which the stage imports"
    assert not extra, f"dvc.yaml stage {name}: deps list {', '.join(extra)}, which the stage never imports"


def test_the_import_scan_follows_imports_through_other_modules():
    """evaluate reaches distributed.py only through training.py: the scan must follow it there."""
    assert "cifar/distributed.py" not in {p.relative_to(REPO).as_posix()
                                          for p in imports.imported_modules(REPO / "stages/evaluate.py")}
    assert {"cifar/distributed.py", "cifar/augment.py", "cifar/__init__.py"} <= code_of("stages/evaluate.py")


def test_the_data_stages_depend_on_no_training_code():
    for name in ["download", "stats"]:
        assert not code_of(stage_script(name)) & {"cifar/training.py", "cifar/model.py", "cifar/fit.py"}, name


@pytest.mark.parametrize("source, resolves_to", [
    ("from .data import load_split", {"cifar/__init__.py", "cifar/data.py"}),  # a package runs its __init__.py
    ("from . import devices", {"cifar/__init__.py", "cifar/devices.py"}),
    ("from . import sys", {"cifar/__init__.py"}),  # a name cifar/__init__.py defines (it imports sys)
    ("from cifar.model import ResNet", {"cifar/__init__.py", "cifar/model.py"}),
    ("import cifar.fit", {"cifar/__init__.py", "cifar/fit.py"}),
    ("import os.path\nfrom torch import nn", set()),  # not the project's: not followed
])
def test_the_import_scan_resolves_each_form_of_import(tmp_path, monkeypatch, source, resolves_to):
    module = REPO / "cifar" / "_scan_probe.py"
    module.write_text(source + "\n")
    try:
        found = {p.relative_to(REPO).as_posix() for p in imports.imported_modules(module)}
    finally:
        module.unlink()
    assert found == resolves_to


@pytest.mark.parametrize("source", ["from .sub.mod import x", "from .nothing import x", "from . import nothing",
                                    "import cifar.nothing", "from cifar.data import nothing_either\n"
                                    "from cifar.gone import x"])
def test_an_import_of_the_projects_code_that_names_no_file_fails_loudly(source):
    """Skipped, it would drop that code from the stage's deps and the checkpoint fingerprint."""
    module = REPO / "cifar" / "_scan_probe.py"
    module.write_text(source + "\n")
    try:
        with pytest.raises(imports.UnresolvedImport, match=r"cifar/_scan_probe.py:\d+: .*"):
            imports.imported_modules(module)
    finally:
        module.unlink()


# Params: what each stage reads

class Reads(Mapping):
    """params.yaml's content that records every key a stage takes the value of, as 'section.key'."""

    def __init__(self, values, log, prefix=""):
        self._values, self._log, self._prefix = values, log, prefix

    def __getitem__(self, key):
        value, name = self._values[key], self._prefix + key
        if isinstance(value, dict):
            return Reads(value, self._log, name + ".")
        self._log.add(name)
        return value

    def __iter__(self):
        return iter(self._values)

    def __len__(self):
        return len(self._values)


def declared_keys(name):
    """dvc.yaml's params of a stage as 'section.key' (a whole section: all of its keys)."""
    keys = set()
    for entry in STAGES[name].get("params", []):
        assert isinstance(entry, str), f"dvc.yaml stage {name}: params entry {entry!r} (only params.yaml's are used)"
        keys |= {f"{entry}.{key}" for key in SCHEMAS[entry].model_fields} if entry in SCHEMAS else {entry}
    return keys


@pytest.fixture(scope="module")
def reads(tmp_path_factory, archive_dir, monkeypatch_module):
    """Every stage run in-process, in order, in a fresh folder with a tiny recipe: {stage: keys it read}.

    How "reads" is decided: a stage loads and checks the sections it uses (load_params with their schemas);
    that check is not reading. What counts is what the stage does with the checked params afterwards: each
    key whose value its code takes, directly or by unpacking a section (Recipe.from_params,
    build_model(**params["model"])). `system` keys are read too, by train and evaluate, but by definition
    they never change a result, so no stage declares them (checked below)."""
    from cifar import params as params_module

    folder = tmp_path_factory.mktemp("reads")
    monkeypatch_module.chdir(folder)
    values = yaml.safe_load((REPO / "params.yaml").read_text())
    values["data"].update(url=str(archive_dir / "cifar-10-python.tar.gz"), md5=(archive_dir / "md5.txt").read_text())
    values["model"]["widths"] = [8, 16, 32, 64]
    values["train"].update(epochs=1, batch_size=100)
    (folder / "params.yaml").write_text(yaml.safe_dump(values))
    found = {}
    for name, module, args in [("download", download, ()), ("stats", stats, ()), ("train", train, ([],)),
                               ("evaluate", evaluate, ()), ("export", export, ()), ("plot", plot, ())]:
        log = set()
        if hasattr(module, "load_params"):
            monkeypatch_module.setattr(module, "load_params",
                                       lambda *schemas, log=log: Reads(params_module.load_params(*schemas), log))
        module.main(*args)
        found[name] = log
    return found


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.mark.parametrize("name", list(STAGES))
def test_each_stage_declares_exactly_the_params_it_reads(reads, name):
    read = {key for key in reads[name] if not key.startswith("system.")}
    missing, extra = sorted(read - declared_keys(name)), sorted(declared_keys(name) - read)
    assert not missing, f"dvc.yaml stage {name}: params lack {', '.join(missing)}, which the stage reads"
    assert not extra, f"dvc.yaml stage {name}: params list {', '.join(extra)}, which the stage never reads"


def test_train_and_evaluate_read_system_and_no_stage_depends_on_it(reads):
    assert {key for key in reads["train"] if key.startswith("system.")} == {f"system.{k}" for k in System.model_fields}
    assert {key for key in reads["evaluate"] if key.startswith("system.")} == {"system.device"}
    assert not any(key.startswith("system.") for name in ["download", "stats", "export", "plot"]
                   for key in reads[name])
    assert not any(key.startswith("system") for name in STAGES for key in declared_keys(name))


# The system section through DVC, and the model as an artifact

@pytest.fixture
def repo(trained_repo, tmp_path):
    """A copy of the trained pipeline, committed with its dvc.lock."""
    return copy_repo(trained_repo.repo, tmp_path / "repo")


@pytest.fixture(scope="module")
def registered(trained_repo, tmp_path_factory):
    """A copy of the trained pipeline whose model is registered as version v1.0.0 of the artifact (the GTO git
    tag `gto register` writes) and pushed to a local remote, as a user would publish it."""
    repo = copy_repo(trained_repo.repo, tmp_path_factory.mktemp("registered") / "repo")
    dvc(repo, "remote", "add", "-d", "local", str(tmp_path_factory.mktemp("remote")))
    run(repo, "git", "commit", "-qam", "a remote")
    dvc(repo, "push")
    run(repo, str(Path(sys.executable).parent / "gto"), "register", "cifar10-resnet", "--version", "v1.0.0")
    return repo


def test_editing_the_training_code_or_its_schema_leaves_the_data_stages_up_to_date(repo):
    """A new `train` key in the schema, or any edit of the training code, reruns train (and what follows),
    never download or stats."""
    training = repo / "cifar/training.py"
    schema = training.read_text().replace("    flip: one_of(", "    warmup_epochs: integer(0)\n    flip: one_of(")
    training.write_text(schema)
    (repo / "cifar/fit.py").write_text((repo / "cifar/fit.py").read_text() + "\n# edited\n")
    status = dvc(repo, "status")
    stale = set(re.findall(r"^(\w+):", status, re.MULTILINE))
    assert stale == {"train", "evaluate"}, status  # evaluate runs training.py's scoring: it is its code too
    assert "cifar/training.py" in status and "download" not in status and "stats" not in status


def test_changing_where_the_run_executes_reruns_nothing(repo):
    set_params(repo, system__master_port=29999, system__master_addr="10.0.0.1", system__compile=True)
    assert "up to date" in dvc(repo, "status")
    assert stages_run(dvc(repo, "repro")) == set()


@pytest.mark.parametrize("key, value", [("train__nproc", 2), ("train__nnodes", 2), ("train__precision", "bf16"),
                                        ("train__sync_bn", True)])
def test_a_key_that_changes_results_makes_train_stale(repo, key, value):
    set_params(repo, **{key: value})
    status = dvc(repo, "status")  # DVC names the section of a whole-section dependency
    assert re.fullmatch(r"train:\s+changed deps:\s+params.yaml:\s+modified:\s+train\s*", status), status


def test_the_validation_split_makes_stats_stale_too(repo):
    """The held-out images are not among those the normalization is computed over (stages/stats.py)."""
    set_params(repo, train__validation_images=100)
    status = dvc(repo, "status")
    assert re.fullmatch(r"stats:\s+changed deps:\s+params.yaml:\s+modified:\s+train.validation_images\s+"
                        r"train:\s+changed deps:\s+params.yaml:\s+modified:\s+train\s*", status), status


def test_test_time_augmentation_makes_evaluate_alone_stale(repo):
    # no training output depends on it: train scores its final model with every TTA mode (cifar.fit)
    set_params(repo, evaluate__tta="flip")
    status = dvc(repo, "status")
    assert re.fullmatch(r"evaluate:\s+changed deps:\s+params.yaml:\s+modified:\s+evaluate.tta\s*", status), status


def test_dvc_lists_the_model_as_an_artifact(registered):
    repo = registered
    from dvc.api import artifacts_show
    from dvc.repo import Repo

    head = run(repo, "git", "rev-parse", "HEAD").strip()
    assert artifacts_show("cifar10-resnet", repo=str(repo)) == {"rev": head, "path": "models/model.pt"}
    with Repo(str(repo)) as dvc_repo:
        (artifacts,) = dvc_repo.artifacts.read().values()
    artifact = artifacts["cifar10-resnet"]
    assert artifact.type == "model" and artifact.path == "models/model.pt" and "resnet" in artifact.labels
    assert artifact.desc


def test_dvc_artifacts_get_fetches_the_pushed_model_from_a_clone(registered, tmp_path):
    dvc(tmp_path, "artifacts", "get", str(registered), "cifar10-resnet", "-o", "fetched.pt")
    assert (tmp_path / "fetched.pt").read_bytes() == (registered / "models/model.pt").read_bytes()
