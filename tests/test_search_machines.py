"""A search across machines (docs/experiments.md): two workers, each in its own clone of one commit, started
together with the default flags, share a study on a real PostgreSQL server and together run exactly the trials
asked for, none twice and no two with the same params; their experiments reach a third clone through
`dvc exp push`/`dvc exp pull` and are compared there.

The server is Debian's `postgresql` (.ci/run installs it): a throwaway cluster on a free local port, run as
its own user. Without it this test skips locally and, with CI=true, fails."""
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import optuna
import pytest
import yaml
from deadlines import finish_all
from dvc.api import exp_show
from dvcrepo import copy_repo, dvc, experiment_refs, run, start

from tools.compare import experiments

POSTGRES_BIN = sorted(Path("/usr/lib/postgresql").glob("*/bin"))  # Debian's layout, one folder per version


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres():
    """The URL of a database on a PostgreSQL server started for these tests, stopped after them."""
    if not POSTGRES_BIN:
        message = "needs Debian's postgresql package (apt-get install postgresql): no server binaries found"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    binaries = POSTGRES_BIN[-1]
    folder = Path(tempfile.mkdtemp(prefix="search-postgres-"))
    # the server refuses to run as root: as root, it runs as Debian's postgres user
    user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if user:
        shutil.chown(folder, "postgres")
    port = free_port()

    def pg(*args, **kwargs):
        return subprocess.run([*user, *args], check=True, capture_output=True, text=True, **kwargs)

    pg(str(binaries / "initdb"), "-D", str(folder / "data"), "-U", "postgres", "--auth=trust")
    pg(str(binaries / "pg_ctl"), "-D", str(folder / "data"), "-l", str(folder / "log"), "-w", "start", "-o",
       f"-p {port} -k {folder} -c listen_addresses=127.0.0.1")
    try:
        pg(str(binaries / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "studies")
        yield f"postgresql://postgres@127.0.0.1:{port}/studies"
    finally:
        pg(str(binaries / "pg_ctl"), "-D", str(folder / "data"), "-m", "immediate", "stop")
        shutil.rmtree(folder, ignore_errors=True)


def test_two_workers_share_a_postgresql_study_and_a_third_clone_compares_their_experiments(data_repo, postgres,
                                                                                          tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"space": {"train.max_lr": {"low": 0.005, "high": 0.05, "log": True}}}))
    origin, storage = tmp_path / "origin.git", tmp_path / "storage"
    run(tmp_path, "git", "clone", "-q", "--bare", str(data_repo.repo), str(origin))
    machines = [copy_repo(data_repo.repo, tmp_path / name) for name in ["machine-a", "machine-b"]]
    # 8 trials, all in TPE's random start-up (10): where workers of one seed would propose the same ones
    workers = [start(repo, "python", "-m", "tools.search", str(space), "--study", "shared", "--trials", "8",
                     "--storage", postgres, "--pruner", "none", "--heartbeat", "5",
                     "-S", "train.validation_images=100", "-S", "train.epochs=1")
               for repo in machines]
    outputs = finish_all(workers, 900, "two search workers on one PostgreSQL study")
    assert [code for code, _, _ in outputs] == [0, 0], outputs

    study = optuna.load_study(study_name="shared", storage=postgres)
    finished = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(finished) == 8, [(t.number, t.state.name, t.user_attrs) for t in study.trials]
    assert len({t.params["train.max_lr"] for t in finished}) == 8, [t.params for t in finished]  # no duplicates
    # no trial twice: each finished trial is one experiment, in one of the two clones
    refs = [experiment_refs(repo) for repo in machines]
    names = [name for found in refs for name in found]
    assert sorted(names) == sorted(f"shared-t{t.number}" for t in finished), refs
    assert all(refs), "each worker ran some of the trials"

    for repo in machines:
        run(repo, "git", "remote", "add", "origin", str(origin))
        dvc(repo, "remote", "add", "--local", "-d", "origin", str(storage))
        dvc(repo, "exp", "push", "origin")
    comparer = tmp_path / "machine-c"
    run(tmp_path, "git", "clone", "-q", str(origin), str(comparer))
    dvc(comparer, "remote", "add", "--local", "-d", "origin", str(storage))
    dvc(comparer, "exp", "pull", "origin")
    output = run(comparer, "python", "-m", "tools.compare", "--out", str(tmp_path / "report"))
    assert "compared 8 experiment(s)" in output, output
    records, pending = experiments(exp_show(repo=str(comparer)))
    values = {f"shared-t{t.number}": t.value for t in finished}
    assert {r["name"]: r["validation_accuracy"] for r in records} == values and not pending, records
    table = (tmp_path / "report/experiments.md").read_text()
    assert all(f"| {name} | " in table for name in values), table
