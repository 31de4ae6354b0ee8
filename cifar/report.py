"""A search's report (tools.search): reports/STUDY/trials.md, every trial's state, params, validation accuracy,
best TTA, epochs and fate, and Optuna's figures."""
import warnings

from .params import format_value
from .study import FAILED, PRUNE_RECORDED, counts, done, outcome, state, tta_choice
from .trial import PRUNED_ATTR
from .workspace import write_text


def trials_table(study, space):
    """trials.md's table: every trial's state, params, validation accuracy (the objective), its best TTA on
    validation, the epochs reached, and what became of it."""
    keys = space.keys
    header = ["trial", "state", *keys, "validation accuracy", "best TTA", "epochs", "note"]
    rows = []
    trials = study.get_trials(deepcopy=False)
    retried = {t.system_attrs.get("failed_trial"): t.number for t in trials if "failed_trial" in t.system_attrs}
    recorded = {t.system_attrs[PRUNE_RECORDED]: t.number for t in trials if PRUNE_RECORDED in t.system_attrs}
    for t in trials:
        values = space.values(t.params)
        epochs = t.user_attrs.get("epochs", max(t.intermediate_values, default=None))
        note = outcome(t)
        if t.number in retried:
            note = f"{note}; run again as trial {retried[t.number]}"
        elif t.number in recorded:
            note = f"{note}; pruned before its worker died, recorded as trial {recorded[t.number]}"
        elif "failed_trial" in t.system_attrs:
            note += f" (trial {t.system_attrs['failed_trial']} run again)"
        elif PRUNE_RECORDED in t.system_attrs:
            note += f" (trial {t.system_attrs[PRUNE_RECORDED]}'s prune)"
        choice = tta_choice(t) if state(t) == "complete" else None
        rows.append([str(t.number), state(t), *(format_value(values[k]) if k in values else "–" for k in keys),
                     f"{t.value:.4f}" if state(t) == "complete" else "–",
                     "–" if choice is None else f"{choice[0]} {choice[1]:.4f}",
                     "–" if epochs is None else str(epochs), note])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in rows]) + "\n"


def effort(study, epochs):
    """The epochs the finished and pruned trials trained, against all of them running to the end, and the time
    the trials took."""
    trials = study.get_trials(deepcopy=False)
    counted_trials = [t for t in trials if state(t) in ("complete", "pruned")]
    trained = sum(t.user_attrs.get("epochs", t.user_attrs.get(PRUNED_ATTR, epochs)) for t in counted_trials)
    seconds = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in trials
                  if t.datetime_complete and t.datetime_start)
    return (f"Epochs trained by them: {trained} of {len(counted_trials) * epochs} had each run its {epochs} "
            f"(pruning saved {len(counted_trials) * epochs - trained}). Trials' time, all added up: "
            f"{seconds / 60:.1f} min.")


def summary(study, trials, epochs):
    """The report's opening: the trials done, what the objective and the pruner compare, and the best."""
    found = counts(study)
    own = sum(bool(t.user_attrs.get(FAILED)) for t in study.get_trials(deepcopy=False))
    text = (f"# Search '{study.study_name}'\n\n{done(found)} of {trials} trials done: "
            f"{found.get('complete', 0)} finished, {found.get('pruned', 0)} pruned; besides them "
            f"{found.get('refused', 0)} refused before training, {found.get('fail', 0)} failed or stopped "
            f"({own} of them failed on their own). Objective: the final validation accuracy of each trial's model "
            f"(its EMA when on) without TTA, the measure every epoch reported and the pruner compared at the same "
            f"epoch; each trial's best TTA on validation is chosen afterwards from its final model's scores. "
            f"{effort(study, epochs)}\n\n")
    if found.get("complete"):
        best = study.best_trial
        mode, accuracy = tta_choice(best)
        values = " ".join(f"{k}={format_value(v)}" for k, v in best.params.items())
        seed = study.user_attrs["base"]["train"]["seed"]
        text += (f"Best: trial {best.number} ({best.user_attrs['experiment']}), {best.value:.4f}, with {mode} TTA "
                 f"{accuracy:.4f}: {values}. Confirm it (evaluate.tta={mode}) over seeds its trials did not train at "
                 f"(train.seed {seed}): `python -m tools.sweep --best-of {study.study_name} --seeds "
                 f"{' '.join(str(k) for k in range(seed + 1, seed + 4))}`.\n\n")
    return text


def write_report(study, space, trials, epochs, out):
    """`out`/trials.md and Optuna's figures (those it can draw from the trials so far)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as figures

    notes = []
    for name, draw in [("history", figures.plot_optimization_history), ("importances", figures.plot_param_importances),
                       ("parallel_coordinate", figures.plot_parallel_coordinate)]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                axes = draw(study)
            except (ValueError, RuntimeError) as e:  # e.g. importances need 2 finished trials that differ
                notes.append(f"- {name}.png: not drawn ({' '.join(str(e).split())})")
                continue
        figure = axes.flat[0].figure if hasattr(axes, "flat") else axes.figure
        if name == "history":
            axes.set_ylabel("final validation accuracy")
        figure.set_size_inches(10, 6)
        figure.tight_layout()
        figure.savefig(out / f"{name}.png", dpi=100)
        plt.close(figure)
    write_text(out / "trials.md", summary(study, trials, epochs) + trials_table(study, space)
               + ("\n" + "\n".join(notes) + "\n" if notes else ""))
