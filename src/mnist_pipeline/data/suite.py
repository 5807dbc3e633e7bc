"""The corrupted test suite on disk: one compressed `.npz` per corruption and a manifest.

    data/corrupted/<corruption>.npz   images (N, 28, 28) uint8, labels (N,) uint8
    data/corrupted/suite.json         seed, corruptions, the test split's SHA-256, each file's

The manifest is written last, so a suite whose writing was cut short has files the manifest
does not vouch for; `load` checks every array against it and against the test split the
suite was made from, and refuses a mismatch with the command that rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..files import write_json
from .splits import Split, load_split, save_split

MANIFEST = "suite.json"
REBUILD = "dvc repro corrupt"


@dataclass(frozen=True)
class Suite:
    """Every corruption of one test split: `images[name]` is (N, 28, 28) uint8, in the test
    split's order, so `labels` serve them all."""

    images: dict[str, np.ndarray]
    labels: np.ndarray
    seed: int
    test_sha256: str

    @property
    def names(self) -> list[str]:
        return list(self.images)

    def __len__(self) -> int:
        """Images per corruption."""
        return int(self.labels.shape[0])

    def sha256(self) -> str:
        """One digest of the whole suite: each corruption's name and split digest, in order."""
        return suite_digest(
            {name: Split(images, self.labels).sha256() for name, images in self.images.items()}
        )


def suite_digest(digests: dict[str, str]) -> str:
    combined = hashlib.sha256()
    for name, digest in digests.items():
        combined.update(f"{name}:{digest}\n".encode())
    return combined.hexdigest()


def save(
    folder: str | os.PathLike[str], corrupted: dict[str, np.ndarray], test: Split, seed: int
) -> str:
    """Write the suite made from `test` (each file atomically, the manifest last); remove
    files of corruptions no longer in it. Returns the suite's digest."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    digests = {}
    for name, images in corrupted.items():
        split = Split(images, test.labels)
        save_split(folder, name, split, compress=True)
        digests[name] = split.sha256()
    for stale in folder.glob("*.npz"):
        if stale.stem not in corrupted:
            stale.unlink()
    digest = suite_digest(digests)
    write_json(
        folder / MANIFEST,
        {"seed": seed, "test_sha256": test.sha256(), "corruptions": digests, "sha256": digest},
    )
    return digest


def load(folder: str | os.PathLike[str], test: Split) -> Suite:
    """The suite in `folder`, checked: made from `test`, every array as the manifest says."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        digests = dict(manifest["corruptions"])
        seed, made_from = int(manifest["seed"]), str(manifest["test_sha256"])
    except FileNotFoundError:
        raise DataError(
            f"{manifest_path}: not found (make the corrupted suite: {REBUILD})"
        ) from None
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(
            f"{manifest_path}: not a suite manifest ({err}); rerun: {REBUILD}"
        ) from None
    if made_from != test.sha256():
        raise DataError(
            f"{manifest_path}: made from test split {made_from[:12]}…, but the test "
            f"split is now {test.sha256()[:12]}…; rerun: {REBUILD}"
        )
    images = {}
    for name, digest in digests.items():
        if not (folder / f"{name}.npz").is_file():
            raise DataError(
                f"{folder / name}.npz: not found, though {MANIFEST} lists it; rerun: {REBUILD}"
            )
        split = load_split(folder, name)
        if split.sha256() != digest:
            raise DataError(
                f"{folder / name}.npz: its arrays differ from what {MANIFEST} "
                f"records (sha256 {split.sha256()[:12]}… != {digest[:12]}…); "
                f"rerun: {REBUILD}"
            )
        if not np.array_equal(split.labels, test.labels):
            raise DataError(
                f"{folder / name}.npz: labels differ from the test split's; rerun: {REBUILD}"
            )
        images[name] = split.images
    return Suite(images=images, labels=test.labels, seed=seed, test_sha256=made_from)
