"""Stage download: fetch CIFAR-10 from data.url, verify data.md5, extract to data/cifar-10-batches-py/."""
from cifar.data import DataParams, download
from cifar.params import load_params
from cifar.workspace import DATA_DIR, command


def main():
    data = load_params(DataParams)["data"]
    target = download(data["url"], data["md5"], DATA_DIR)
    print(f"extracted {target}")


if __name__ == "__main__":
    command(main)
