"""Download, checksum, extraction, batch reading and channel statistics."""
import gzip
import hashlib
import io
import pickle
import re
import tarfile

import numpy as np
import pytest
import torch
from conftest import CLASSES, TEST_IMAGES, TRAIN_PER_BATCH, build_archive, synthetic_batches

from cifar.data import channel_stats, download, load_split, read_batch, read_classes
from cifar.workspace import UserError


def assert_nothing_left(data_dir):
    assert list(data_dir.iterdir()) == [], f"partial output left in {data_dir}: {list(data_dir.iterdir())}"


def assert_nothing_left_and_a_corrected_run_works(data_dir, archive_dir):
    assert_nothing_left(data_dir)
    download(str(archive_dir / "cifar-10-python.tar.gz"), (archive_dir / "md5.txt").read_text(), data_dir)
    assert load_split(data_dir / "cifar-10-batches-py", "test")[0].shape[0] == TEST_IMAGES


def test_download_over_http_extracts_the_official_layout(tmp_path, archive):
    url, md5 = archive
    target = download(url, md5, tmp_path / "data")
    assert target == tmp_path / "data" / "cifar-10-batches-py"
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["cifar-10-batches-py"]  # no archive, no temp
    images, labels = load_split(target, "train")
    assert images.shape == (5 * TRAIN_PER_BATCH, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.shape == (5 * TRAIN_PER_BATCH,) and labels.dtype == torch.int64
    test_images, _ = load_split(target, "test")
    assert test_images.shape == (TEST_IMAGES, 3, 32, 32)
    assert read_classes(target) == CLASSES


@pytest.mark.parametrize("form", ["path", "file-url"])
def test_download_from_a_local_copy(tmp_path, archive_dir, form):
    path = archive_dir / "cifar-10-python.tar.gz"
    url = str(path) if form == "path" else path.as_uri()
    download(url, (archive_dir / "md5.txt").read_text(), tmp_path / "data")
    assert load_split(tmp_path / "data" / "cifar-10-batches-py", "test")[0].shape[0] == TEST_IMAGES


def test_wrong_checksum_is_an_error_and_leaves_nothing(tmp_path, archive, archive_dir):
    url, _ = archive
    with pytest.raises(UserError, match="md5 is [0-9a-f]{32}, but data.md5 is 0{32}"):
        download(url, "0" * 32, tmp_path / "data")
    assert_nothing_left_and_a_corrected_run_works(tmp_path / "data", archive_dir)


def test_unreachable_url_is_an_error(tmp_path, server_url, archive_dir):
    with pytest.raises(UserError, match="could not be downloaded: .*point data.url at its local path"):
        download(server_url + "/no-such-file.tar.gz", "0" * 32, tmp_path / "data")
    assert_nothing_left_and_a_corrected_run_works(tmp_path / "data", archive_dir)


def test_archive_without_the_expected_batches_is_an_error(tmp_path, archive_dir):
    files = synthetic_batches()
    del files["data_batch_3"], files["test_batch"]
    md5 = build_archive(tmp_path / "partial.tar.gz", files)
    with pytest.raises(UserError, match="lacks cifar-10-batches-py/data_batch_3, test_batch"):
        download(str(tmp_path / "partial.tar.gz"), md5, tmp_path / "data")
    assert_nothing_left_and_a_corrected_run_works(tmp_path / "data", archive_dir)


@pytest.mark.parametrize("damage, reason", [
    (lambda good: good[: len(good) // 2], "Compressed file ended before the end-of-stream marker"),  # truncated
    (lambda good: good[:100] + bytes(200) + good[300:], "not a readable .tar.gz archive"),  # bytes overwritten
    (lambda good: b"<html>mirror moved</html>\n" * 20, "not a gzip file"),  # not an archive at all
    (lambda good: gzip.compress(b"not a tar file" * 100), "invalid header"),  # gzip, but no tar inside
])
def test_a_corrupt_archive_whose_md5_the_user_supplies_is_an_error(tmp_path, archive_dir, damage, reason):
    """The md5 matches the (damaged) file, so only extraction can tell: a one-line error, nothing left."""
    bad = damage((archive_dir / "cifar-10-python.tar.gz").read_bytes())
    (tmp_path / "bad.tar.gz").write_bytes(bad)
    with pytest.raises(UserError, match="not a readable .tar.gz archive") as error:
        download(str(tmp_path / "bad.tar.gz"), hashlib.md5(bad).hexdigest(), tmp_path / "data")
    assert reason in str(error.value) and "\n" not in str(error.value)
    assert_nothing_left_and_a_corrected_run_works(tmp_path / "data", archive_dir)


def crafted_archive(path, *members):
    """The synthetic archive with `members` (tarfile.TarInfo) added after its batches, a file's content its
    name: a .tar.gz at `path`, whose md5 is returned (the user's own md5: only extraction stands in the way)."""
    files = {f"cifar-10-batches-py/{name}": pickle.dumps(obj, protocol=2) for name, obj in synthetic_batches().items()}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for info in [*(tarfile.TarInfo(name) for name in files), *members]:
            data = files.get(info.name, info.name.encode()) if info.isfile() else b""
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buffer.getvalue())
    return hashlib.md5(buffer.getvalue()).hexdigest()


def member(name, kind=tarfile.REGTYPE, linkname=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


@pytest.mark.parametrize("case, why", [
    ("relative escape", "it would land outside the folder it is extracted to"),
    ("absolute path", "an absolute path"),
    ("symbolic link out", "a symbolic link (to '../../../..')"),
    ("hard link", "a hard link (to '{victim}')"),
    ("device file", "a device file, pipe or other special file"),
])
def test_an_archive_member_that_would_write_outside_its_folder_is_refused_and_nothing_is_written(tmp_path, archive_dir,
                                                                                                    case, why):
    """data.url may be any file whose md5 the user sets: a member named ../../../x (from the extraction folder,
    data/.download-*/extracted, that is tmp_path), an absolute one, a link to tmp_path and a file written through
    it, a hard link to a file outside, a device file. Each is refused in one line naming it, before anything is
    extracted: nothing appears outside data/, and nothing is left in it."""
    victim = tmp_path / "victim.txt"
    victim.write_text("untouched\n")
    bad = {"relative escape": [member("../../../escaped-rel.txt")],
           "absolute path": [member(str(tmp_path / "escaped-abs.txt"))],
           "symbolic link out": [member("cifar-10-batches-py/out", tarfile.SYMTYPE, "../../../.."),
                                 member("cifar-10-batches-py/out/escaped-link.txt")],
           "hard link": [member("cifar-10-batches-py/hard", tarfile.LNKTYPE, str(victim))],
           "device file": [member("cifar-10-batches-py/null", tarfile.CHRTYPE)]}[case]
    md5 = crafted_archive(tmp_path / "crafted.tar.gz", *bad)
    url = str(tmp_path / "crafted.tar.gz")
    with pytest.raises(UserError) as error:
        download(url, md5, tmp_path / "data")
    assert str(error.value) == (f"data.url {url!r}: refused the archive's member {bad[0].name!r}: "
                                f"{why.format(victim=victim)}; a CIFAR-10 archive holds plain files and folders only")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crafted.tar.gz", "data", "victim.txt"]
    assert victim.read_text() == "untouched\n"
    assert_nothing_left_and_a_corrected_run_works(tmp_path / "data", archive_dir)


@pytest.mark.parametrize("url, message", [
    ("http://", "is malformed: no host"),
    ("https://:443/cifar.tar.gz", "is malformed: no host"),
    ("http://[::1/cifar.tar.gz", "is malformed: Invalid IPv6 URL"),
    ("htp:/x", "unsupported scheme 'htp'"),
    ("gopher://example.com/cifar.tar.gz", "unsupported scheme 'gopher'"),
    ("http://exa mple.com/cifar.tar.gz", "could not be downloaded"),
    ("/no/such/cifar-10-python.tar.gz", "no such file"),
    ("file:///no/such/cifar-10-python.tar.gz", "no such file"),
])
def test_a_malformed_url_or_missing_local_copy_is_an_error(tmp_path, archive_dir, url, message):
    with pytest.raises(UserError, match=f"^data.url {re.escape(repr(url))}.*{re.escape(message)}"):
        download(url, "0" * 32, tmp_path / "data")
    assert_nothing_left_and_a_corrected_run_works(tmp_path / "data", archive_dir)


def test_batches_with_bytes_keys_read_the_same(tmp_path):
    """Some copies (like the real subset in shared/) pickle their dict keys as bytes."""
    files = synthetic_batches()
    build_archive(tmp_path / "a.tar.gz", files)
    md5 = build_archive(tmp_path / "b.tar.gz", files, bytes_keys=True)
    download(str(tmp_path / "b.tar.gz"), md5, tmp_path / "data")
    images, labels = read_batch(tmp_path / "data" / "cifar-10-batches-py" / "data_batch_1")
    expected = files["data_batch_1"]
    assert torch.equal(images.reshape(len(images), -1), torch.from_numpy(expected["data"]))
    assert labels.tolist() == expected["labels"]
    assert read_classes(tmp_path / "data" / "cifar-10-batches-py") == CLASSES


def test_rows_are_read_as_red_green_blue_planes(tmp_path):
    """CIFAR stores each image as 1024 red, then 1024 green, then 1024 blue values, row-major."""
    row = np.concatenate([np.full(1024, 10), np.full(1024, 20), np.arange(1024) % 256]).astype(np.uint8)
    files = synthetic_batches()
    files["data_batch_1"]["data"][0] = row
    md5 = build_archive(tmp_path / "a.tar.gz", files)
    download(str(tmp_path / "a.tar.gz"), md5, tmp_path / "data")
    image = read_batch(tmp_path / "data" / "cifar-10-batches-py" / "data_batch_1")[0][0]
    assert (image[0] == 10).all() and (image[1] == 20).all()
    assert image[2, 0, 5] == 5 and image[2, 1, 0] == 32  # row-major: the second row starts at index 32


def test_channel_stats_on_known_answers():
    # channel 0: half 0, half 255 -> mean 0.5, std 0.5; channel 1: all 51 -> mean 0.2, std 0;
    # channel 2: values 0..255 uniformly -> mean 127.5/255, population std sqrt((256^2 - 1) / 12) / 255
    images = torch.zeros(8, 3, 16, 16, dtype=torch.uint8)
    images[:4, 0] = 255
    images[:, 1] = 51
    images[:, 2] = torch.arange(256, dtype=torch.uint8).view(16, 16)
    mean, std = channel_stats(images)
    assert mean == pytest.approx([0.5, 0.2, 127.5 / 255], abs=1e-12)
    assert std == pytest.approx([0.5, 0.0, ((256**2 - 1) / 12) ** 0.5 / 255], abs=1e-12)


def test_channel_stats_pool_all_pixels_not_per_image_stds():
    """Two flat images, 0 and 255: every per-image std is 0, the population std over all pixels is 0.5."""
    images = torch.stack([torch.zeros(3, 4, 4), torch.full((3, 4, 4), 255.0)]).to(torch.uint8)
    mean, std = channel_stats(images)
    assert mean == pytest.approx([0.5] * 3) and std == pytest.approx([0.5] * 3)


def test_channel_stats_match_a_float64_computation():
    images = torch.randint(0, 256, (50, 3, 32, 32), dtype=torch.uint8)
    x = images.double().div(255).transpose(0, 1).reshape(3, -1)
    mean, std = channel_stats(images)
    assert mean == pytest.approx(x.mean(1).tolist(), abs=1e-12)
    assert std == pytest.approx(x.std(1, correction=0).tolist(), abs=1e-12)


class Payload:
    """Unpickled, it would create the file `marker` (io.open): what a crafted batch could run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.mark.parametrize("name", ["data_batch_2", "batches.meta"])
def test_a_pickle_that_would_run_code_is_refused_and_never_runs(tmp_path, archive_dir, name):
    """data.url may name any local file whose md5 the user sets: unpickling names no global a batch does not hold."""
    marker = tmp_path / "ran"
    files = synthetic_batches()
    files[name] = pickle.dumps({**files[name], "labels": Payload(marker), "label_names": Payload(marker)}, protocol=2)
    md5 = build_archive(tmp_path / "crafted.tar.gz", files)
    with pytest.raises(UserError) as error:
        download(str(tmp_path / "crafted.tar.gz"), md5, tmp_path / "data")
    assert re.fullmatch(rf".*/cifar-10-batches-py/{name}: refused to unpickle io.open: a CIFAR-10 batch holds "
                        r"only dicts, lists, strings, bytes, numbers and numpy arrays", str(error.value)), error.value
    assert not marker.exists()
    assert_nothing_left_and_a_corrected_run_works(tmp_path / "data", archive_dir)


# numpy >= 2 pickles arrays through numpy._core; the official archive (protocol 2, numpy 1) through numpy.core
@pytest.mark.parametrize("protocol, numpy_module", [*((p, "numpy._core") for p in range(pickle.HIGHEST_PROTOCOL + 1)),
                                                    (2, "numpy.core")])
def test_a_batch_pickled_by_any_protocol_and_numpy_reads(tmp_path, protocol, numpy_module):
    batch = synthetic_batches()["data_batch_1"]
    payload = pickle.dumps({**batch, "batch_label": batch["batch_label"].encode()}, protocol=protocol)
    (tmp_path / "batch").write_bytes(payload.replace(b"numpy._core", numpy_module.encode()))
    images, labels = read_batch(tmp_path / "batch")
    assert torch.equal(images.reshape(len(images), -1), torch.from_numpy(batch["data"]))
    assert labels.tolist() == batch["labels"]
