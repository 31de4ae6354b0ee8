"""Stage stats: per-channel mean and std of the training images, for normalization, to data/stats.json."""
from cifar.data import channel_stats, load_split
from cifar.workspace import BATCHES_DIR, STATS_FILE, command, write_json


def main():
    images, _ = load_split(BATCHES_DIR, "train")
    mean, std = channel_stats(images)
    write_json(STATS_FILE, {"mean": mean, "std": std, "num_images": len(images)})
    print(f"{len(images)} training images: mean {[round(m, 4) for m in mean]}, std {[round(s, 4) for s in std]}")


if __name__ == "__main__":
    command(main)
