"""The IDX file format MNIST ships in: parse with validation, and write (for tests and tools).

Layout (big-endian): two zero bytes, a type code (0x08 = unsigned byte), the number of
dimensions, one uint32 per dimension, then the data in C order.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..files import atomic_open

UBYTE = 0x08


def read(
    path: str | os.PathLike[str], *, ndim: int, shape_tail: tuple[int, ...] = ()
) -> np.ndarray:
    """Read an unsigned-byte IDX file with `ndim` dimensions.

    `shape_tail` pins the trailing dimensions (e.g. (28, 28) for images). Any deviation
    raises `DataError` naming the file and the field that is wrong.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(
            f"{path}: file not found (run the fetch stage first: dvc repro fetch)"
        ) from None
    header_len = 4 + 4 * ndim
    if len(data) < 4:
        raise DataError(
            f"{path}: magic number: file is {len(data)} bytes, too short for an IDX header"
        )
    zero, dtype_code, dims = struct.unpack(">HBB", data[:4])
    magic = int.from_bytes(data[:4], "big")
    expected_magic = (UBYTE << 8) | ndim
    if zero != 0 or dtype_code != UBYTE or dims != ndim:
        raise DataError(
            f"{path}: magic number: got 0x{magic:08x}, expected 0x{expected_magic:08x} "
            f"(unsigned-byte IDX with {ndim} dimension{'s' if ndim > 1 else ''})"
        )
    if len(data) < header_len:
        raise DataError(
            f"{path}: dimensions: header needs {header_len} bytes, file has {len(data)}"
        )
    shape = struct.unpack(f">{ndim}I", data[4:header_len])
    if shape_tail and tuple(shape[1:]) != tuple(shape_tail):
        raise DataError(
            f"{path}: dimensions: got {'x'.join(map(str, shape[1:]))} per item, "
            f"expected {'x'.join(map(str, shape_tail))}"
        )
    if shape[0] == 0:
        raise DataError(f"{path}: dimensions: item count is 0, expected at least one item")
    expected_len = header_len + int(np.prod(shape, dtype=np.int64))
    if len(data) != expected_len:
        raise DataError(
            f"{path}: byte length: got {len(data)} bytes, expected {expected_len} "
            f"for dimensions {'x'.join(map(str, shape))} (truncated or padded file)"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_len).reshape(shape).copy()


def read_images(path: str | os.PathLike[str]) -> np.ndarray:
    return read(path, ndim=3, shape_tail=(28, 28))


def read_labels(path: str | os.PathLike[str]) -> np.ndarray:
    labels = read(path, ndim=1)
    bad = np.flatnonzero(labels > 9)
    if bad.size:
        raise DataError(
            f"{path}: labels: value {int(labels[bad[0]])} at index {int(bad[0])} "
            f"is outside 0-9 ({bad.size} such label{'s' if bad.size > 1 else ''})"
        )
    return labels


def write(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """Write a uint8 array as IDX (atomically)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">HBB", 0, UBYTE, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    with atomic_open(path, "wb") as fh:
        fh.write(header)
        fh.write(array.tobytes())
