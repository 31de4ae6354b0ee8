"""The study's comparisons, the tuned preset, the tricks' ablation and a search's best trial as queued DVC
experiments: `python -m tools.sweep [--ablation] [--best-of STUDY]`, then `dvc queue start -j N`.

The study's recipe is params.yaml's (its defaults always stay the study's): every variant and rung sets the
keys it compares explicitly, from those values, and everything else comes from params.yaml. For a reduced
run, `--width-divisor N` narrows every variant alike, `--epochs N` shortens them, and `-S key=value`
overrides any key in all of them."""
import argparse

from cifar.augment import EvaluateParams
from cifar.model import ModelParams
from cifar.noise import confirmation_seeds
from cifar.params import PARAMS_FILE, format_value, load_params, parse_override
from cifar.training import Recipe
from cifar.workspace import UserError, command

# The keys the variants and the ladder compare; the study's values of them are params.yaml's defaults
STUDY_KEYS = ["model.blocks", "model.widths", "train.weight_decay", "train.optimizer", "train.max_lr",
              "train.label_smoothing", "train.flip", "train.ema_decay", "train.cutout", "evaluate.tta"]

# The tricks, in the order the ablation ladder adds them: (rung name, the keys it sets). The values, and why
# each, are in docs/experiments.md.
TRICKS = [
    # SGD needs its own learning rate and weight decay: Adam's 0.01 and 1e-4 would barely move it
    ("sgd-nesterov", {"train.optimizer": "sgd", "train.momentum": 0.9, "train.nesterov": True,
                      "train.max_lr": 0.2, "train.weight_decay": 5e-4}),
    ("label-smoothing", {"train.label_smoothing": 0.2}),
    ("alternating-flip", {"train.flip": "alternating"}),
    ("ema", {"train.ema_decay": 0.99}),
    ("cutout", {"train.cutout": 8}),
    ("flip-tta", {"evaluate.tta": "flip"}),
    ("flip-translate-tta", {"evaluate.tta": "flip_translate"}),
]
# The tuned preset: the best recipe tools.search found on validation (docs/experiments.md: two searches of
# search.yaml's space on the 50k set). No finished trial trained better than the study's recipe; its training
# with flip-and-translate TTA scored best, so tuned is exactly that.
TUNED = {"evaluate.tta": "flip_translate"}
# The fast preset: the study's test accuracy in at most a third of its epochs (20 of 70), the same model. Reasoned
# from the fast trainers (docs/results.md#full-scale): Muon for the convolution filters (airbench94_muon: its
# momentum 0.6; muon_lr 0.1, the best of 0.03, 0.1 and 0.3 in full-width probes), Nesterov SGD for BatchNorm and
# the head at Page's ResNet-9 rate and decay, label smoothing 0.2 and alternating flips (both airbench's), a
# quarter of the steps to warm up, and flip-and-translate TTA (tuned's, and the best mode on fast's choice run)
FAST = {"train.optimizer": "muon", "train.muon_lr": 0.1, "train.muon_momentum": 0.6, "train.max_lr": 0.2,
        "train.momentum": 0.9, "train.nesterov": True, "train.weight_decay": 5e-4, "train.label_smoothing": 0.2,
        "train.flip": "alternating", "train.warmup_fraction": 0.25, "train.epochs": 20,
        "evaluate.tta": "flip_translate"}
# The variants a search selected: {name: the train.seed its search's trials trained at}. Their run at that seed
# is the selected trial again (tuned-s0 is the second search's trial 1, bit for bit), so a confirmation over
# --seeds runs others (cifar.noise.confirmation_seeds). Both searches trained at params.yaml's seed, 0.
SEARCHED = {"tuned": 0}


def study(path=PARAMS_FILE):
    """The study's recipe: params.yaml's values of STUDY_KEYS (its defaults always stay the study's), checked
    as the stages check them."""
    params = load_params(ModelParams, Recipe, EvaluateParams, path=path)
    return {key: params[key.split(".")[0]][key.split(".")[1]] for key in STUDY_KEYS}


def ladder(study):
    """The ablation: the study's recipe, then each rung adding one trick to the one before."""
    rungs, keys = {"ablation-0-study": study}, dict(study)
    for i, (name, trick) in enumerate(TRICKS, 1):
        keys = {**keys, **trick}
        rungs[f"ablation-{i}-{name}"] = keys
    return rungs


def variants(study):
    """name -> the keys it sets; the names are DVC experiment names (git ref names: no spaces, no dots). The
    counts are of the study's widths 64..512."""
    widths = study["model.widths"]
    return {
        "final": study,  # 4,977,226 parameters; also the weight-decay sweep's 1e-4 point
        "blocks-1111": {**study, "model.blocks": [1, 1, 1, 1]},  # 4,903,242
        "blocks-6543": {**study, "model.blocks": [6, 5, 4, 3], "model.widths": [w // 2 for w in widths]},  # 4,865,322
        "under-1m": {**study, "model.widths": [w // 4 for w in widths]},  # 313,498
        "wd-1e-6": {**study, "train.weight_decay": 1e-6},
        "wd-1e-5": {**study, "train.weight_decay": 1e-5},
        "wd-5e-4": {**study, "train.weight_decay": 5e-4},
        # beyond the study: the search's best recipe, the same model. It differs from final in evaluate.tta
        # alone, which no training output depends on: tuned-sK's train stage is restored from final-sK's entry
        # in DVC's run cache (queued after it), and only evaluate runs again
        "tuned": {**study, **TUNED},
        "fast": {**study, **FAST},  # the same model; its recipe sets keys beyond STUDY_KEYS (epochs, Muon's)
    }


def best_of(study, name, storage=None):
    """The variant of the best finished trial of tools.search's study `name`: the study's recipe with the
    trial's params (the keys the search varied) and its best TTA on validation, so that it is confirmed over
    seeds like any variant."""
    from cifar.study import DEFAULT_STORAGE, best_values

    return {**study, **best_values(name, storage or DEFAULT_STORAGE)}


def variant_params(variant, width_divisor=1, overrides=()):
    """The -S values of one variant: its keys (widths divided by width_divisor), then the overrides."""
    params = {key: format_value(value) for key, value in variant.items()}
    if width_divisor != 1:
        widths = variant["model.widths"]
        if any(w % width_divisor for w in widths):
            raise UserError(f"--width-divisor {width_divisor} does not divide model.widths {widths}")
        params["model.widths"] = format_value([w // width_divisor for w in widths])
    params.update(parse_override(o) for o in overrides)
    return params


def planned(names, experiments, width_divisor=1, overrides=(), prefix="", seeds=(), searched=SEARCHED):
    """[(experiment name, {key: value as -S writes it})] of the chosen ones of `experiments`; with `seeds`,
    each once per seed, named NAME-sK (train.seed=K), which tools.compare groups back into its variant, and
    none at the seed a search selected one of them at (`searched`, as SEARCHED)."""
    unknown = [n for n in names if n not in experiments]
    if unknown:
        raise UserError(f"unknown variant {', '.join(unknown)} (known: {', '.join(experiments)})")
    if width_divisor < 1:
        raise UserError(f"--width-divisor {width_divisor}: must be an integer >= 1")
    if any(seed < 0 for seed in seeds) or len(set(seeds)) < len(seeds):
        raise UserError(f"--seeds {' '.join(map(str, seeds))}: must be different integers >= 0")
    if seeds:
        confirmation_seeds(seeds, {name: seed for name, seed in searched.items() if name in names})
    runs = [(name, name, {}) for name in names] if not seeds else [
        (name, f"{name}-s{seed}", {"train.seed": str(seed)}) for name in names for seed in seeds]
    return [(prefix + run, {**variant_params(experiments[name], width_divisor, overrides), **seed})
            for name, run, seed in runs]


def command_line(name, params, force=False):
    """The `dvc exp run --queue` command that queues one experiment: what --dry-run prints."""
    settings = [f"-S {key}={value}" if "[" not in value else f"-S '{key}={value}'" for key, value in params.items()]
    return " ".join(["dvc exp run --queue -n", name] + (["--force"] if force else []) + settings)


def queue(experiments, force=False):
    """Queue the experiments as their command lines would, through DVC's Python API in this one process:
    no DVC start-up per experiment (a second or two each)."""
    from dvc.exceptions import DvcException, NotDvcRepoError
    from dvc.repo import Repo

    try:
        repo = Repo()
    except NotDvcRepoError:
        raise UserError("not inside a DVC repository: run this from the project's root")
    with repo:
        for name, params in experiments:
            try:
                repo.experiments.run(queue=True, name=name, force=force,
                                     params=[f"{key}={value}" for key, value in params.items()])
            except DvcException as e:
                raise UserError(f"queueing {name} failed: {' '.join(str(e).split())}")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tools.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", metavar="NAME",
                        help="queue only these variants, or with --ablation these rungs (default: all; --dry-run "
                             "lists them)")
    parser.add_argument("--ablation", action="store_true",
                        help="queue the tricks' ablation ladder instead (rungs ablation-K-TRICK)")
    parser.add_argument("--width-divisor", type=int, default=1, metavar="N",
                        help="divide every variant's widths by N: a narrower sweep of the same shapes")
    parser.add_argument("--epochs", type=int, metavar="N", help="train every variant N epochs (-S train.epochs=N)")
    parser.add_argument("-S", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="set a params.yaml key in every variant (repeatable), e.g. -S train.seed=1")
    parser.add_argument("--seeds", nargs="+", type=int, default=[], metavar="K",
                        help="queue every variant (or rung) once per seed, named NAME-sK; tools.compare reports "
                             "each variant's mean ± std over them")
    parser.add_argument("--best-of", metavar="STUDY",
                        help="add the variant STUDY-best: the study's recipe with the best trial's params of a "
                             "tools.search study, to confirm over --seeds")
    parser.add_argument("--storage", help="the --best-of study's Optuna storage URL (default: tools.search's)")
    parser.add_argument("--prefix", default="", help="prepended to every experiment name, e.g. cpu-")
    parser.add_argument("--force", action="store_true", help="replace experiments of the same names")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, queue nothing")
    args = parser.parse_args(argv)

    if args.epochs is not None and args.epochs < 1:
        raise UserError(f"--epochs {args.epochs}: must be an integer >= 1")
    overrides = ([f"train.epochs={args.epochs}"] if args.epochs else []) + args.overrides
    recipe = study()
    chosen = ladder(recipe) if args.ablation else variants(recipe)
    searched = dict(SEARCHED)
    if args.best_of:
        chosen[f"{args.best_of}-best"] = best_of(recipe, args.best_of, args.storage)
        # its trials trained at params.yaml's seed, unless the space searched it
        searched[f"{args.best_of}-best"] = chosen[f"{args.best_of}-best"].get(
            "train.seed", load_params(Recipe)["train"]["seed"])
    experiments = planned(args.only or list(chosen), chosen, args.width_divisor, overrides, args.prefix, args.seeds,
                          searched)
    for name, params in experiments:
        print(command_line(name, params, args.force), flush=True)
    if not args.dry_run:
        queue(experiments, args.force)
        print(f"queued {len(experiments)} experiment(s); run them with `dvc queue start -j N`, "
              "follow with `dvc queue status`, compare with `dvc exp show` and `python -m tools.compare`")


if __name__ == "__main__":
    command(main)
