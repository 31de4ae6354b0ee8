"""A sweep across machines (docs/experiments.md): two clones of one commit each run their share and push it
with `dvc exp push origin` (git refs to a bare git remote, outputs to a local DVC remote); a third clone pulls
them with `dvc exp pull origin`, and `python -m tools.compare` reports both with their metrics. Each share is
one tiny experiment whose stages DVC's run-cache restores (the swept repository ran them), so the test costs
DVC's commands, not training."""
from dvc.api import exp_show
from dvcrepo import copy_repo, dvc, run

from tools.compare import experiments


def test_two_machines_push_their_experiments_and_a_third_pulls_and_compares_both(swept, stage, tmp_path):
    origin, storage = tmp_path / "origin.git", tmp_path / "storage"
    run(tmp_path, "git", "clone", "-q", "--bare", str(swept.repo), str(origin))
    shares = {"machine-a": ("wd-5e-4", "train.weight_decay=5e-4"),
              "machine-b": ("blocks-1111", "model.blocks=[1,1,1,1]")}
    for machine, (name, setting) in shares.items():
        repo = copy_repo(swept.repo, tmp_path / machine)  # its cache holds the stages' runs: DVC's run-cache
        dvc(repo, "exp", "remove", "--all-commits")  # this machine's own experiments only
        run(repo, "git", "remote", "add", "origin", str(origin))
        dvc(repo, "remote", "add", "--local", "-d", "origin", str(storage))
        dvc(repo, "exp", "run", "-n", name, "-S", setting)
        dvc(repo, "exp", "push", "origin")
    comparer = tmp_path / "machine-c"
    run(tmp_path, "git", "clone", "-q", str(origin), str(comparer))
    dvc(comparer, "remote", "add", "--local", "-d", "origin", str(storage))
    dvc(comparer, "exp", "pull", "origin")
    ran = stage(comparer, "tools.compare", "--out", str(tmp_path / "report"))
    # both experiments; the baseline commit's own outputs were never pulled here, so it has no results
    assert ran.code == 0 and "compared 2 experiment(s)" in ran.output, ran.output
    table = (tmp_path / "report/experiments.md").read_text()
    for name in ["wd-5e-4", "blocks-1111"]:
        accuracy = swept.results[name]["evaluate"]["accuracy"]
        assert f"| {name} | " in table and f"| {accuracy:.2%} |" in table, table
    records, pending = experiments(exp_show(repo=str(comparer)))
    assert {r["name"] for r in records} == {"wd-5e-4", "blocks-1111"} and not pending, records
