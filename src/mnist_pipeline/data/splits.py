"""Arrays and splits: turn the raw IDX files into validated uint8 train/val/test arrays.

The official 10,000-image test set is kept untouched; the validation split is carved out
of the 60,000 training images, stratified by class and seeded. Arrays stay uint8 (the
model rescales), so the processed data is as small as the raw data.
"""

from __future__ import annotations

import hashlib
import math
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np

from ..errors import DataError
from ..files import atomic_open
from . import idx

NUM_CLASSES = 10
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # (N, 28, 28) uint8
    labels: np.ndarray  # (N,) uint8

    def __post_init__(self) -> None:
        if (
            self.images.dtype != np.uint8
            or self.images.ndim != 3
            or self.images.shape[1:] != (28, 28)
        ):
            raise DataError(
                f"images: got {self.images.dtype} {self.images.shape}, expected uint8 (N, 28, 28)"
            )
        if self.labels.dtype != np.uint8 or self.labels.shape != (self.images.shape[0],):
            raise DataError(
                f"labels: got {self.labels.dtype} {self.labels.shape}, "
                f"expected uint8 ({self.images.shape[0]},) matching the images"
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def class_counts(self) -> list[int]:
        return np.bincount(self.labels, minlength=NUM_CLASSES).tolist()

    def sha256(self) -> str:
        """One digest of both arrays (shape, dtype and bytes), stable across platforms."""
        digest = hashlib.sha256()
        for array in (self.images, self.labels):
            digest.update(f"{array.dtype.str}{array.shape}".encode())
            digest.update(np.ascontiguousarray(array).data.cast("B"))  # no copy
        return digest.hexdigest()


def load_raw(raw_dir: str | os.PathLike[str], images_name: str, labels_name: str) -> Split:
    """Parse one images/labels IDX pair, checking that they describe the same items."""
    raw_dir = Path(raw_dir)
    images = idx.read_images(raw_dir / images_name)
    labels = idx.read_labels(raw_dir / labels_name)
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{raw_dir / labels_name}: item count: {labels.shape[0]} labels for "
            f"{images.shape[0]} images in {images_name}"
        )
    return Split(images, labels)


def stratified_split(labels: np.ndarray, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val) with `val_size` items, each class in proportion to its count.

    Per-class quotas use the largest-remainder method so they sum to exactly `val_size`;
    the items picked within each class are drawn with a seeded generator.
    """
    if not 0 < val_size < labels.shape[0]:
        raise DataError(
            f"preprocess.val_size: got {val_size}, expected between 1 and "
            f"{labels.shape[0] - 1} for {labels.shape[0]} training images"
        )
    counts = np.bincount(labels, minlength=NUM_CLASSES)
    exact = counts * val_size / labels.shape[0]
    quotas = np.floor(exact).astype(int)
    for cls in np.argsort(-(exact - quotas), kind="stable")[: val_size - quotas.sum()]:
        quotas[cls] += 1
    rng = np.random.default_rng(seed)
    val = np.concatenate(
        [
            rng.choice(np.flatnonzero(labels == cls), size=quota, replace=False)
            for cls, quota in enumerate(quotas)
        ]
    )
    val.sort()
    train = np.setdiff1d(np.arange(labels.shape[0]), val, assume_unique=True)
    return train, val


def save_split(
    processed_dir: str | os.PathLike[str], name: str, split: Split, *, compress: bool = False
) -> Path:
    """`<processed_dir>/<name>.npz` (images, labels), atomically; the same bytes for the same
    arrays (`write_npz`)."""
    path = Path(processed_dir) / f"{name}.npz"
    write_npz(path, {"images": split.images, "labels": split.labels}, compress=compress)
    return path


# A fixed time stamp on every member: `np.savez` stamps the current time, so the same arrays
# would give a different file (and a different DVC hash) on every run.
ZIP_TIME = (1980, 1, 1, 0, 0, 0)


def write_npz(
    path: str | os.PathLike[str], arrays: dict[str, np.ndarray], *, compress: bool = False
) -> None:
    """An .npz archive (no pickles) that `np.load` reads, byte-identical for equal arrays."""
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with atomic_open(path, "wb") as fh, zipfile.ZipFile(fh, "w", compression=method) as archive:
        for key, array in arrays.items():
            member = zipfile.ZipInfo(f"{key}.npy", date_time=ZIP_TIME)
            member.compress_type = method
            with archive.open(member, "w", force_zip64=True) as out:
                np.lib.format.write_array(out, np.ascontiguousarray(array), allow_pickle=False)


def load_split(processed_dir: str | os.PathLike[str], name: str) -> Split:
    path = Path(processed_dir) / f"{name}.npz"
    if not path.exists():
        raise DataError(f"{path}: not found (run the preprocess stage first: dvc repro preprocess)")
    try:
        with zipfile.ZipFile(path) as archive:
            return Split(_read_aligned(archive, "images"), _read_aligned(archive, "labels"))
    except (
        KeyError,
        ValueError,
        OSError,
        EOFError,
        MemoryError,
        OverflowError,
        zipfile.BadZipFile,
    ) as err:
        raise DataError(
            f"{path}: not a valid processed split ({err}); rerun: dvc repro preprocess"
        ) from None


# Arrays start on a 64-byte boundary, so TensorFlow can train from their memory as it is
# (see training.resident) instead of holding a second copy: loading the training split into a
# tensor peaks at +82 MB this way, +130 MB through `np.load` (whose arrays are not aligned).
ALIGNMENT = 64


def _read_aligned(archive: zipfile.ZipFile, key: str) -> np.ndarray:
    """Array `key` of an .npz archive (no pickles), read straight into aligned memory."""
    member = archive.getinfo(f"{key}.npy")
    # Read mode: a ZipExtFile (typeshed says IO[bytes], which has no readinto).
    with cast(zipfile.ZipExtFile, archive.open(member)) as fh:
        version = np.lib.format.read_magic(fh)
        if version not in ((1, 0), (2, 0), (3, 0)):
            raise ValueError(f"{key}: unknown .npy format version {version}")
        header = (
            np.lib.format.read_array_header_1_0
            if version == (1, 0)
            else np.lib.format.read_array_header_2_0
        )
        shape, fortran_order, dtype = header(fh)
        if dtype.hasobject or fortran_order:
            raise ValueError(
                f"{key}: expected a C-ordered array of numbers, got {dtype}"
                + (" in Fortran order" if fortran_order else "")
            )
        if not all(isinstance(n, int) and n >= 0 for n in shape):
            raise ValueError(f"{key}: invalid shape {shape}")
        nbytes = math.prod(shape) * dtype.itemsize
        stored = member.file_size - fh.tell()
        if stored != nbytes:
            raise ValueError(
                f"{key}: {stored} data bytes for shape {shape} of {dtype}, "
                f"expected {nbytes}" + (" (truncated)" if stored < nbytes else "")
            )
        buffer = np.empty(nbytes + ALIGNMENT, np.uint8)
        start = -buffer.ctypes.data % ALIGNMENT
        raw = buffer[start : start + nbytes]
        view, filled = raw.data, 0
        while filled < nbytes:
            got = fh.readinto(view[filled:])
            if not got:
                raise ValueError(f"{key}: truncated: {filled} of {nbytes} bytes")
            filled += got
        return raw.view(dtype).reshape(shape)


def report(splits: dict[str, Split], source: dict[str, Split] | None = None) -> dict:
    """Per-split counts, per-class counts, pixel statistics and SHA-256 of each split."""
    out: dict = {}
    for name, split in splits.items():
        mean, std = pixel_stats(split.images)
        out[name] = {
            "count": len(split),
            "class_counts": {str(c): n for c, n in enumerate(split.class_counts())},
            "pixel_mean": round(mean, 6),
            "pixel_std": round(std, 6),
            "sha256": split.sha256(),
        }
    if source:
        out["source"] = {
            name: {
                "count": len(s),
                "class_counts": {str(c): n for c, n in enumerate(s.class_counts())},
            }
            for name, s in source.items()
        }
    out["sha256"] = digest(splits)
    return out


def pixel_stats(images: np.ndarray, chunk: int = 4096) -> tuple[float, float]:
    """Mean and standard deviation of pixels scaled to [0, 1], in exact integer sums."""
    total = squares = 0
    for start in range(0, images.shape[0], chunk):
        block = images[start : start + chunk].astype(np.int64)
        total += int(block.sum())
        squares += int((block * block).sum())
    n = images.size
    mean = total / n
    return mean / 255.0, float(np.sqrt(max(squares / n - mean * mean, 0.0))) / 255.0


def digest(splits: dict[str, Split]) -> str:
    """One SHA-256 for a set of splits: the processed dataset's identity."""
    combined = hashlib.sha256()
    for name in sorted(splits):
        combined.update(f"{name}:{splits[name].sha256()}\n".encode())
    return combined.hexdigest()
