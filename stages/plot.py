"""Stage plot: PNG figures in plots/ from the training curves and the test evaluation."""
from cifar.figures import draw_all
from cifar.workspace import command


def main():
    written = draw_all()
    print(f"wrote {len(written)} figures to {written[0].parent}/")


if __name__ == "__main__":
    command(main)
