"""Search the study's design space with Optuna: `python -m tools.search SPACE.yaml --trials N [-S key=value ...]`.

Every trial is a DVC experiment: `dvc exp run --temp -n STUDY-tK -S ... train`, in a copy of the workspace, so
that several trials run at once and the workspace stays free. A trial trains and is scored on the held-out
validation images (train.validation_images > 0): the search never reads the test set. Every epoch the train
stage reports the validation accuracy of its model (the EMA when on) without TTA, Optuna's MedianPruner stops
a trial behind the finished ones' median on it (DVC keeps no experiment of it), and the objective is that same
measure after the last epoch. The final model is scored with each TTA mode too: the trial's best is recorded,
and the study's best trial brings it as evaluate.tta. A proposal over model.max_params, or one the params'
schemas refuse, is refused before training (and TPE learns the region); a space that cannot propose a trial
that trains is refused before the first. A trial that fails on its own is recorded with its reason and the
search goes on; 3 failures in a row stop it.

The study lives in a storage that outlives the process (default: SQLite in .optuna/, git-ignored; for several
machines, one PostgreSQL URL): rerun the same command after a stop and it continues the same study, until N
trials have finished or been pruned; a trial a stop interrupted runs again then, with the same params. Each
worker's trials keep a heartbeat; a trial whose worker died (killed, its machine lost) is failed once its
heartbeat is older than 3 beats and run again with the same params (one already pruned is recorded as pruned).
Each worker draws its own proposals (no --seed); a fixed --seed with one worker reproduces a search.

Writes reports/STUDY/: trials.md (every trial's state, params, validation accuracy, epochs), Optuna's figures
(history.png, importances.png, parallel_coordinate.png) and logs/ (each trial's output). The best trial's
params, with its best TTA, become a tools.sweep preset: `python -m tools.sweep --best-of STUDY --seeds 1 2 3`."""
import argparse
import signal
import threading
import time
from pathlib import Path

from cifar.params import load_yaml
from cifar.report import write_report
from cifar.runner import Search, stop, work_thread
from cifar.space import check_search, check_trainable, parse_space, settings_of
from cifar.study import DEFAULT_STORAGE, base_params, counts, done, open_storage, open_study, redact
from cifar.workspace import UserError, command

REPORTS = Path("reports")


def default_jobs():
    """One trial per visible GPU, or one on a CPU (trials side by side would only share its cores)."""
    import torch

    return max(1, torch.cuda.device_count())


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tools.search", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("space", help="the space file (YAML): `space:` params.yaml keys of model and train, "
                        "each a list of choices or {low, high, log?, step?}; optionally `first:` trials to run first")
    parser.add_argument("--trials", type=int, default=24, help="finished or pruned trials the study needs (default 24)")
    parser.add_argument("--study", help="the study's name and its experiments' prefix (default: the space file's name)")
    parser.add_argument("--storage", default=DEFAULT_STORAGE,
                        help=f"Optuna's storage URL, shared by every worker (default {DEFAULT_STORAGE}; several "
                        "machines: postgresql://USER:PASSWORD@HOST/DB)")
    parser.add_argument("-S", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a params.yaml key set in every trial (repeatable), e.g. -S train.epochs=10")
    parser.add_argument("--jobs", type=int, help="trials at once in this worker (default: one per visible GPU, "
                        "or 1 on a CPU); each trial claims a free GPU")
    parser.add_argument("--seed", type=int, help="the TPE sampler's seed, to reproduce a search run by one worker "
                        "(default: none, each worker draws its own proposals)")
    parser.add_argument("--pruner", choices=["median", "none"], default="median",
                        help="median (default): stop a trial below the finished trials' median at the same epoch")
    parser.add_argument("--startup-trials", type=int, default=5,
                        help="finished trials before the pruner stops any (default 5)")
    parser.add_argument("--warmup-epochs", type=int, default=2,
                        help="the first epoch at which a trial may be pruned (default 2)")
    parser.add_argument("--heartbeat", type=int, default=30,
                        help="seconds between a running trial's heartbeats; 3 missed: its worker is taken for dead "
                        "and the trial is run again (default 30)")
    parser.add_argument("--report-only", action="store_true", help="write the report of the trials so far, run none")
    args = parser.parse_args(argv)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # the search prints its own line per trial

    for flag, value, least in [("--trials", args.trials, 1), ("--jobs", args.jobs, 1),
                               ("--heartbeat", args.heartbeat, 1), ("--startup-trials", args.startup_trials, 0),
                               ("--warmup-epochs", args.warmup_epochs, 0)]:
        if value is not None and value < least:
            raise UserError(f"{flag} {value}: must be an integer >= {least}")
    source = Path(args.space)
    name = args.study or source.stem
    if not name.replace("-", "").replace("_", "").isalnum():
        raise UserError(f"study name {name!r}: letters, digits, - and _ only (it names the DVC experiments)")
    base = base_params()
    settings = settings_of(args.overrides, base)
    space = parse_space(load_yaml(source), base, source)
    check_search(base)
    check_trainable(space, base, source)
    storage = open_storage(args.storage, args.heartbeat)
    study = open_study(name, storage, space, base, args.seed)
    jobs = args.jobs or default_jobs()
    pruner = {"name": args.pruner, "startup_trials": args.startup_trials, "warmup_epochs": args.warmup_epochs}
    search = Search(study, storage, space, settings, base, args.trials, pruner, REPORTS / name, jobs)
    search.report_dir.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        found = counts(study)
        continuing = " (continuing)" if set(found) - {"waiting"} else ""
        print(f"search '{name}' in {redact(args.storage)}: {done(found)}/{args.trials} trials done{continuing}; "
              f"{jobs} at a time; objective: final validation accuracy without TTA (each TTA mode scored after); "
              f"pruner: {args.pruner}", flush=True)
        started = time.monotonic()
        threads = [threading.Thread(target=work_thread, args=(search, started)) for _ in range(jobs)]
        for signum in (signal.SIGINT, signal.SIGTERM):  # to the worker alone or with its group, as Ctrl-C does
            signal.signal(signum, lambda signum, frame: stop(search, signal.Signals(signum)))
        # no KeyboardInterrupt: a join it interrupts leaves the thread looking ended (Python 3.11), and the
        # process would exit with its trial running and the trial's state never written
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    write_report(study, space, args.trials, base["train"]["epochs"], search.report_dir)  # however it ended
    if search.errors:
        raise search.errors[0]
    print(f"wrote {search.report_dir}/trials.md and its figures")


if __name__ == "__main__":
    command(main)
