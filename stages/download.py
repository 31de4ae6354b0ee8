"""Stage download: fetch CIFAR-10 from data.url, verify data.md5, extract to data/cifar-10-batches-py/."""
from .cifar10 import download
from .params import load_params
from .workspace import DATA_DIR, run


def main():
    data = load_params()["data"]
    target = download(data["url"], data["md5"], DATA_DIR)
    print(f"extracted {target}")


if __name__ == "__main__":
    run(main)
