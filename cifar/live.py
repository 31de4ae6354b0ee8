"""The train stage's log, through DVCLive: one point per epoch on every curve (metrics/train/plots/metrics/),
and DVCLive's metrics.json of the last epoch's values. Only the main rank logs; the other ranks get NoLive."""
from dvclive import Live

from .workspace import TRAIN_LOG_DIR


class NoLive:
    """What ranks other than 0 log to: nothing (DVCLive's calls the train stage makes, doing nothing)."""
    step = 0

    def __init__(self):
        self.summary = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def log_metric(self, *args, **kwargs):
        pass

    def next_step(self):
        pass


def open_log(context):
    """DVCLive on the main rank (dvc.yaml declares the plots, so DVCLive leaves it alone); NoLive elsewhere."""
    if context.is_main:
        return Live(dir=str(TRAIN_LOG_DIR), dvcyaml=False, save_dvc_exp=False)
    return NoLive()


def log_epoch(live, row):
    """One epoch's point on every curve (the step is the epoch)."""
    live.step = row["step"]
    for name, value in row.items():
        if name != "step":
            live.log_metric(name, value)
    live.next_step()
