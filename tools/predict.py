"""Classify your own images: `python -m tools.predict IMAGE_OR_FOLDER ... [--model models/model.pt] [--top K]
[--json] [--device D]`.

PNG and JPEG files, or folders of them (at any depth), of any size and mode: each is converted to RGB and
resized to 32x32, then scored by the trained model (models/model.pt in PyTorch, or models/model.onnx in
onnxruntime), which normalizes it as in training. Prints each image's K most probable classes, as a table or
(--json) one JSON object per line. An unreadable file is reported on stderr and skipped; the exit status is then 1."""
import argparse
import json
import re
import sys

from cifar.devices import DEVICE_ALLOWED, DEVICE_PATTERN, System, inference_device
from cifar.params import PARAMS_FILE, check_section, read_params
from cifar.predict import classify, find_images
from cifar.runtime import open_model
from cifar.workspace import MODEL_FILE, UserError, command


def device_setting(option):
    """--device, else system.device of params.yaml where there is one, else auto."""
    if option is not None:
        if not re.fullmatch(DEVICE_PATTERN, option):
            raise UserError(f"--device {option!r} must be {DEVICE_ALLOWED}")
        return option
    if not PARAMS_FILE.is_file():
        return "auto"
    return check_section(System, read_params().get("system"))["device"]


def main(argv):
    parser = argparse.ArgumentParser(prog="python -m tools.predict", description=__doc__.split("\n\n")[1])
    parser.add_argument("paths", nargs="+", metavar="IMAGE_OR_FOLDER")
    parser.add_argument("--model", default=str(MODEL_FILE), help="a .pt or .onnx model file (default: %(default)s)")
    parser.add_argument("--top", type=int, default=3, help="classes shown per image (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line per image")
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:K (default: system.device of params.yaml, or auto)")
    args = parser.parse_args(argv)
    if args.top < 1:
        raise UserError(f"--top {args.top}: must be an integer >= 1")
    files = find_images(args.paths)
    device = inference_device(device_setting(args.device))  # never waits behind a training's claim
    model = open_model(args.model, device)
    failed = []

    def report(error):
        failed.append(error)
        print(f"error: {error}", file=sys.stderr, flush=True)

    for path, top in classify(files, model, args.top, report):
        if args.json:
            print(json.dumps({"image": str(path), "top": [{"class": c, "probability": round(p, 6)} for c, p in top]}))
        else:
            print(f"{path}\n" + "".join(f"  {c:<12}{p:7.2%}\n" for c, p in top), end="", flush=True)
    if len(failed) > 1:
        raise UserError(f"{len(failed)} of {len(files)} images could not be read")
    if failed:  # its one line is out already
        sys.exit(1)


if __name__ == "__main__":
    command(main, sys.argv[1:])
