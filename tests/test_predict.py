"""tools.predict: the synthetic test images, written as PNG files, get the classes the evaluate stage predicted
for them, through model.pt and through model.onnx alike; images of other sizes and modes are read as the model
needs them; unreadable files, empty folders and missing models are one-line errors."""
import json
import sys

import numpy as np
import pytest
import torch
import yaml
from agreement import real_disagreements
from conftest import CLASSES, TEST_IMAGES, synthetic_batches
from dvcrepo import REPO, call, read_json
from PIL import ExifTags, Image

from cifar.predict import classify, read_image

EXPORT = yaml.safe_load((REPO / "params.yaml").read_text())["export"]  # the check's tolerance: onnxruntime's slack


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """The synthetic test set as PNG files 000.png ... 199.png (in order), and the images as uint8 [N, 32, 32, 3]."""
    folder = tmp_path_factory.mktemp("pictures")
    images = synthetic_batches()["test_batch"]["data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    return folder, images


def predict(stage, repo, *args):
    """tools.predict in this process (conftest's runner), in `repo`, on the CPU as the evaluate stage ran there."""
    return stage(repo, "tools.predict", *args, "--device", "cpu")


def records(ran):
    return [json.loads(line) for line in ran.out.splitlines()]


@pytest.mark.parametrize("model", ["models/model.pt", "models/model.onnx"])
def test_each_test_image_gets_the_class_evaluate_predicted(trained_repo, pictures, stage, model):
    folder, _ = pictures
    ran = predict(stage, trained_repo.repo, str(folder), "--model", model, "--json", "--top", "3")
    assert ran.code == 0 and ran.err == "", ran.err
    found = records(ran)
    confusion = read_json(trained_repo.repo, "metrics/evaluate/confusion.json")
    assert [r["image"] for r in found] == [str(folder / f"{i:03d}.png") for i in range(TEST_IMAGES)]
    predicted = [r["top"][0]["class"] for r in found]
    if model.endswith(".pt"):  # evaluate's model in evaluate's precision: its classes, ties broken alike
        assert predicted == [c["predicted"] for c in confusion]
    else:  # fp32 in onnxruntime: evaluate's classes but where the precisions' rounding cannot tell two apart
        found_classes = torch.tensor([CLASSES.index(name) for name in predicted])
        assert real_disagreements(trained_repo.repo, found_classes, "fp32", slack=2 * EXPORT["max_logit_diff"]) == []
    for r in found:
        probabilities = [t["probability"] for t in r["top"]]
        assert len(probabilities) == 3 and probabilities == sorted(probabilities, reverse=True)
        assert 0 < sum(probabilities) <= 1 + 1e-5


def test_the_table_names_each_image_and_its_top_classes(trained_repo, pictures, stage):
    folder, _ = pictures
    ran = predict(stage, trained_repo.repo, str(folder / "000.png"), str(folder / "001.png"), "--top", "2")
    confusion = read_json(trained_repo.repo, "metrics/evaluate/confusion.json")
    lines = ran.out.splitlines()
    assert ran.code == 0 and len(lines) == 6 and lines[0] == str(folder / "000.png") and lines[3].endswith("001.png")
    assert lines[1].split()[0] == confusion[0]["predicted"] and lines[4].split()[0] == confusion[1]["predicted"]
    assert lines[1].split()[1].endswith("%")


def test_any_size_and_mode_becomes_32x32_rgb(pictures, tmp_path):
    _, images = pictures
    Image.fromarray(images[0]).save(tmp_path / "same.png")
    assert (read_image(tmp_path / "same.png").permute(1, 2, 0).numpy() == images[0]).all()  # 32x32: as it is
    big = Image.fromarray(images[0]).resize((96, 128), Image.Resampling.NEAREST).convert("RGBA")
    big.save(tmp_path / "big.png")
    big.convert("RGB").save(tmp_path / "big.jpg", quality=95)
    Image.fromarray(images[0]).convert("L").save(tmp_path / "grey.png")
    for name in ["big.png", "big.jpg"]:
        read = read_image(tmp_path / name)
        assert read.shape == (3, 32, 32) and read.dtype == torch.uint8
        assert np.abs(read.permute(1, 2, 0).numpy().astype(float).mean((0, 1)) - images[0].mean((0, 1))).max() < 8
    grey = read_image(tmp_path / "grey.png")
    assert grey.shape == (3, 32, 32) and (grey[0] == grey[1]).all() and (grey[1] == grey[2]).all()
    # antialiased: a 1-pixel black and white checkerboard halved is grey, not (as sampling would make it) black
    # or white
    Image.fromarray(((np.indices((64, 64)).sum(0) % 2) * 255).astype(np.uint8)).save(tmp_path / "checks.png")
    checks = read_image(tmp_path / "checks.png")[:, 4:-4, 4:-4].float()
    assert (checks - 127.5).abs().max() < 20


def test_an_unreadable_file_in_a_folder_is_reported_skipped_and_fails_the_run(trained_repo, pictures, tmp_path):
    """As its own process, for the real exit status: the readable images are classified all the same."""
    _, images = pictures
    for i in range(3):
        Image.fromarray(images[i]).save(tmp_path / f"{i}.png")
    (tmp_path / "1.png").write_bytes(b"not a png at all")
    code, out, err = call(trained_repo.repo, sys.executable, "-m", "tools.predict", str(tmp_path), "--json",
                          "--device", "cpu")
    assert code == 1
    assert [json.loads(line)["image"] for line in out.splitlines()] == [str(tmp_path / "0.png"),
                                                                          str(tmp_path / "2.png")]
    assert err.splitlines() == [f"error: {tmp_path / '1.png'}: not a readable PNG or JPEG image "
                                f"(cannot identify image file '{tmp_path / '1.png'}')"]


@pytest.mark.parametrize("case, message", [
    ("corrupt", "{folder}/bad.jpg: not a readable PNG or JPEG image"),
    ("empty", "{folder}/empty: no PNG or JPEG images in this folder"),
    ("missing", "{folder}/nothing.png: no such file or folder"),
    ("no model", "models/model.pt: no such checkpoint; run the train stage first (dvc repro train)"),
    ("no onnx", "models/model.onnx: no such ONNX model; run the export stage first (dvc repro export)"),
])
def test_each_problem_is_a_one_line_error(trained_repo, pictures, stage, tmp_path, case, message):
    folder, _ = pictures
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (tmp_path / "empty").mkdir()
    (tmp_path / "models").mkdir()
    arg = {"corrupt": tmp_path / "bad.jpg", "empty": tmp_path / "empty", "missing": tmp_path / "nothing.png"}
    repo = tmp_path if case.startswith("no ") else trained_repo.repo  # tmp_path has no models
    model = ["--model", "models/model.onnx"] if case == "no onnx" else []
    ran = predict(stage, repo, str(arg.get(case, folder / "000.png")), *model)
    assert ran.code == 1 and ran.out == "", ran.out
    assert ran.err.count("\n") == 1 and ran.err.startswith("error: " + message.format(folder=tmp_path)), ran.err


def test_top_beyond_the_number_of_classes_lists_every_class(trained_repo, pictures, stage):
    folder, _ = pictures
    ran = predict(stage, trained_repo.repo, str(folder / "000.png"), "--json", "--top", "25")
    assert ran.code == 0 and ran.err == "", ran.output
    (record,) = records(ran)
    assert sorted(t["class"] for t in record["top"]) == sorted(CLASSES)
    assert sum(t["probability"] for t in record["top"]) == pytest.approx(1, abs=1e-4)


class WhereRed:
    """A model for classify: the class is the side of the image (top, bottom, left, right) that is reddest."""
    classes = ["top", "bottom", "left", "right"]

    def logits(self, images):
        red = images[:, 0].float() - images[:, 2].float()
        return torch.stack([red[:, :16].mean((1, 2)), red[:, 16:].mean((1, 2)), red[:, :, :16].mean((1, 2)),
                            red[:, :, 16:].mean((1, 2))], 1)


def test_a_phone_photo_is_classified_as_it_is_shown_not_as_it_is_stored(tmp_path):
    """A camera held upright stores its pixels sideways and an EXIF Orientation tag (6: show them turned 90
    degrees clockwise). What the user sees, red on the left, is stored red at the bottom."""
    shown = np.zeros((64, 64, 3), dtype=np.uint8)
    shown[:, :, 2] = 255
    shown[:, :32] = [255, 0, 0]
    stored = Image.fromarray(shown).transpose(Image.Transpose.ROTATE_90)  # counter-clockwise: red at the bottom
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    stored.save(tmp_path / "phone.jpg", quality=95, exif=exif)
    (path, top), = classify([tmp_path / "phone.jpg"], WhereRed(), 1, on_error=pytest.fail)
    assert path == tmp_path / "phone.jpg" and top[0][0] == "left"
    stored.save(tmp_path / "untagged.jpg", quality=95)  # the same pixels without the tag: as stored
    assert next(classify([tmp_path / "untagged.jpg"], WhereRed(), 1, on_error=pytest.fail))[1][0][0] == "bottom"


class Tied:
    """A model for classify whose two best classes tie, as bf16 rounds two near logits to one value."""
    classes = CLASSES

    def logits(self, images):
        return torch.tensor([[0, 0, 0, 0, 0, 3.484375, 0, 3.484375, 0, 0]]).expand(len(images), -1)


def test_equally_probable_classes_come_in_the_models_order_as_evaluate_breaks_ties(tmp_path):
    """The evaluate stage's class is the first of the tied ones (argmax): so is predict's (torch.topk put horse
    first)."""
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    (_, top), = classify([tmp_path / "x.png"], Tied(), 3, on_error=pytest.fail)
    assert CLASSES[Tied().logits(torch.zeros(1)).argmax(1).item()] == "dog"
    assert [c for c, _ in top] == ["dog", "horse", "airplane"] and top[0][1] == top[1][1] > top[2][1]
