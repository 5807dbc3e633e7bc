"""IDX parsing with validation, the stratified split, the data report."""

from __future__ import annotations

import io
import struct
import zipfile

import numpy as np
import pytest
from helpers.digits import synthetic_digits

from mnist_pipeline.data import idx
from mnist_pipeline.data.splits import (
    ALIGNMENT,
    Split,
    load_raw,
    load_split,
    report,
    save_split,
    stratified_split,
)
from mnist_pipeline.errors import DataError


def _write_pair(tmp_path, n=50):
    images, labels = synthetic_digits(n)
    idx.write(tmp_path / "img", images)
    idx.write(tmp_path / "lbl", labels)
    return images, labels


def test_roundtrip(tmp_path):
    images, labels = _write_pair(tmp_path)
    split = load_raw(tmp_path, "img", "lbl")
    np.testing.assert_array_equal(split.images, images)
    np.testing.assert_array_equal(split.labels, labels)
    assert (tmp_path / "img").stat().st_size == 16 + 50 * 784


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda b: b"\x00\x00\x08\x01" + b[4:], "magic number"),  # labels magic on images
        (lambda b: b"\x00\x00\x0d\x03" + b[4:], "magic number"),  # float type code
        (lambda b: b"\x01\x00" + b[2:], "magic number"),
        (lambda b: b[:2], "magic number"),
        (lambda b: b[:10], "dimensions"),
        (lambda b: b[:8] + struct.pack(">II", 27, 28) + b[16:], "dimensions"),
        (lambda b: b[:-1], "byte length"),
        (lambda b: b + b"\x00", "byte length"),
        (lambda b: b[:4] + struct.pack(">I", 0) + b[8:16], "dimensions"),
    ],
)
def test_bad_image_file_names_file_and_field(tmp_path, mutate, field):
    _write_pair(tmp_path)
    path = tmp_path / "img"
    path.write_bytes(mutate(path.read_bytes()))
    with pytest.raises(DataError) as info:
        idx.read_images(path)
    assert str(path) in str(info.value) and field in str(info.value)


def test_label_out_of_range_is_named(tmp_path):
    labels = np.array([0, 1, 12, 3], dtype=np.uint8)
    idx.write(tmp_path / "lbl", labels)
    with pytest.raises(DataError, match=r"lbl: labels: value 12 at index 2 is outside 0-9"):
        idx.read_labels(tmp_path / "lbl")


def test_count_mismatch_between_images_and_labels(tmp_path):
    images, labels = synthetic_digits(20)
    idx.write(tmp_path / "img", images)
    idx.write(tmp_path / "lbl", labels[:19])
    with pytest.raises(DataError, match="item count: 19 labels for 20 images"):
        load_raw(tmp_path, "img", "lbl")


def test_missing_raw_file_says_which_stage_to_run(tmp_path):
    with pytest.raises(DataError, match="dvc repro fetch"):
        idx.read_images(tmp_path / "nope")


def test_stratified_split_is_exact_seeded_and_proportional():
    rng = np.random.default_rng(1)
    labels = rng.choice(10, size=6000, p=np.linspace(0.05, 0.15, 10)).astype(np.uint8)
    train, val = stratified_split(labels, 500, seed=7)
    assert len(val) == 500 and len(train) == 5500
    assert not set(train) & set(val)
    expected = np.bincount(labels, minlength=10) * 500 / 6000
    assert np.all(np.abs(np.bincount(labels[val], minlength=10) - expected) <= 1)
    again_train, again_val = stratified_split(labels, 500, seed=7)
    np.testing.assert_array_equal(val, again_val)
    other = stratified_split(labels, 500, seed=8)[1]
    assert not np.array_equal(val, other)


def test_split_rejects_impossible_sizes():
    with pytest.raises(DataError, match="val_size"):
        stratified_split(np.zeros(10, dtype=np.uint8), 10, seed=0)


def test_save_and_load_split_keep_uint8(tmp_path):
    images, labels = synthetic_digits(30)
    save_split(tmp_path, "train", Split(images, labels))
    loaded = load_split(tmp_path, "train")
    assert loaded.images.dtype == np.uint8 and loaded.images.shape == (30, 28, 28)
    assert loaded.sha256() == Split(images, labels).sha256()
    assert not list(tmp_path.glob(".*tmp*")), "no temporary file left behind"


def test_corrupt_processed_split_is_reported(tmp_path):
    (tmp_path / "val.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="val.npz: not a valid processed split"):
        load_split(tmp_path, "val")


def test_loaded_arrays_start_on_a_64_byte_boundary(tmp_path):
    # resident shares such arrays with TensorFlow instead of copying them.
    images, labels = synthetic_digits(33)
    save_split(tmp_path, "train", Split(images, labels))
    loaded = load_split(tmp_path, "train")
    for array in (loaded.images, loaded.labels):
        assert array.ctypes.data % ALIGNMENT == 0
        assert array.flags.c_contiguous and array.flags.writeable
    np.testing.assert_array_equal(loaded.images, images)
    np.testing.assert_array_equal(loaded.labels, labels)


def test_truncated_split_is_reported(tmp_path):
    images, labels = synthetic_digits(30)
    with zipfile.ZipFile(tmp_path / "train.npz", "w") as archive:
        buffer = io.BytesIO()
        np.save(buffer, images)
        archive.writestr("images.npy", buffer.getvalue()[:-100])  # 100 bytes short
        buffer = io.BytesIO()
        np.save(buffer, labels)
        archive.writestr("labels.npy", buffer.getvalue())
    with pytest.raises(
        DataError,
        match=r"train.npz: not a valid processed split \(images: "
        r"\d+ data bytes for shape \(30, 28, 28\) of uint8, "
        r"expected 23520 \(truncated\)",
    ):
        load_split(tmp_path, "train")


@pytest.mark.parametrize("shape", [(-1,), (2**40, 28, 28)], ids=["negative", "huge"])
def test_a_header_that_lies_about_the_shape_is_refused(tmp_path, shape):
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": "|u1", "fortran_order": False, "shape": shape}
    )
    with zipfile.ZipFile(tmp_path / "train.npz", "w") as archive:
        archive.writestr("images.npy", buffer.getvalue() + bytes(62))
    with pytest.raises(DataError, match="train.npz: not a valid processed split"):
        load_split(tmp_path, "train")


def test_pickled_arrays_are_refused_without_unpickling(tmp_path):
    with zipfile.ZipFile(tmp_path / "train.npz", "w") as archive:
        buffer = io.BytesIO()
        np.save(buffer, np.array([{"x": 1}], dtype=object), allow_pickle=True)
        archive.writestr("images.npy", buffer.getvalue())
    with pytest.raises(
        DataError, match="images: expected a C-ordered array of numbers, got object"
    ):
        load_split(tmp_path, "train")


def test_report_counts_stats_and_hashes():
    images, labels = synthetic_digits(40)
    split = Split(images, labels)
    summary = report({"train": split})
    assert summary["train"]["count"] == 40
    assert sum(summary["train"]["class_counts"].values()) == 40
    scaled = images / 255.0
    assert summary["train"]["pixel_mean"] == pytest.approx(scaled.mean(), abs=1e-6)
    assert summary["train"]["pixel_std"] == pytest.approx(scaled.std(), abs=1e-6)
    flipped = Split(images, labels[::-1].copy())
    assert report({"train": flipped})["train"]["sha256"] != summary["train"]["sha256"]
