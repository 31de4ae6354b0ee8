"""Stage stats: per-channel mean and std of the images the train stage trains on, for normalization, to
data/stats.json (with the number of images). With train.validation_images > 0, the held-out images are not
among them (cifar.data.training_split): the images a run is validated on never shape its normalization."""
from cifar.data import SplitParams, channel_stats, read_classes, training_split
from cifar.params import load_params
from cifar.workspace import BATCHES_DIR, STATS_FILE, command, write_json


def main():
    held_out = load_params(SplitParams)["train"]["validation_images"]
    (images, _), _ = training_split(BATCHES_DIR, held_out, len(read_classes(BATCHES_DIR)))
    mean, std = channel_stats(images)
    write_json(STATS_FILE, {"mean": mean, "std": std, "num_images": len(images)})
    print(f"{len(images)} training images{f' ({held_out} held out)' if held_out else ''}: "
          f"mean {[round(m, 4) for m in mean]}, std {[round(s, 4) for s in std]}")


if __name__ == "__main__":
    command(main)
