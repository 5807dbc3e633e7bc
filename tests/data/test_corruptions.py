"""The corrupted test suite: each corruption does what the benchmark's does, the suite is the
same bytes on every run (pinned), and its files are checked when loaded."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from helpers.digits import synthetic_digits

from mnist_pipeline.data import corruptions, suite
from mnist_pipeline.data.splits import Split, load_split
from mnist_pipeline.errors import DataError

SEED = 2019
# SHA-256 of the 15 corruptions of `synthetic_digits(600, seed=3)` (two chunks each), in the
# benchmark's order. Pinned on an AMD EPYC (AVX-512). Every step is either exact IEEE
# arithmetic, SciPy's compiled filters (the same machine code on every x86-64 CPU), or a
# NumPy function that the Intel Xeons we run on dispatch to the same AVX-512 code, and the
# suite avoids BLAS, whose kernels are chosen per CPU. The one place where a last-bit
# difference could move a pixel (a truncation of a blurred flat region) has a guard, so
# the exact bytes are the form both CPU kinds reproduce.
PINNED = "419a69d287fdbcde55de6338e2cb118116f20938c051031130771b6a74f37817"


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return synthetic_digits(600, seed=3)[0]


def suite_sha256(corrupted: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for name in corruptions.CORRUPTIONS:
        digest.update(name.encode())
        digest.update(corrupted[name].tobytes())
    return digest.hexdigest()


def test_corrupt_suite_is_pinned_and_independent_of_processes(images):
    one = corruptions.generate(images, corruptions.CORRUPTIONS, SEED, processes=1)
    two = corruptions.generate(images, corruptions.CORRUPTIONS, SEED, processes=2)
    assert list(one) == list(corruptions.CORRUPTIONS)
    for name in corruptions.CORRUPTIONS:
        assert one[name].dtype == np.uint8 and one[name].shape == images.shape, name
        assert np.array_equal(one[name], two[name]), name
    assert suite_sha256(one) == PINNED


def test_corrupt_chunks_are_seeded_on_their_own(images):
    """The first chunk's images are the same whether the suite holds 600 images or 500, and
    whatever other corruptions were selected."""
    whole = corruptions.generate(images, ["fog", "zigzag"], SEED)
    alone = corruptions.generate(images[: corruptions.CHUNK], ["zigzag"], SEED)
    assert np.array_equal(whole["zigzag"][: corruptions.CHUNK], alone["zigzag"])
    other_seed = corruptions.generate(images[: corruptions.CHUNK], ["zigzag"], SEED + 1)
    assert not np.array_equal(alone["zigzag"], other_seed["zigzag"])


def test_corrupt_unknown_name_is_refused(images):
    with pytest.raises(ValueError, match="'blurry'.*shot_noise"):
        corruptions.generate(images[:10], ["blurry"], SEED)


def test_corrupt_pixel_exact_corruptions():
    """Brightness adds half the range; stripe inverts 7 columns at each side; scale and
    translate move a single bright pixel where the benchmark's affine maps send it."""
    image = np.zeros((1, 28, 28), np.uint8)
    image[0, 10, 20] = 200
    bright = corruptions.corrupt(image, "brightness", SEED)
    assert bright[0, 0, 0] == 128 and bright[0, 10, 20] == 255
    striped = corruptions.corrupt(image, "stripe", SEED)
    assert (striped[0, :, :7] == 255).all() and (striped[0, :, 21:] == 255).all()
    assert striped[0, 10, 20] == 200 and striped[0, 5, 10] == 0
    moved = corruptions.corrupt(image, "translate", SEED)
    row, col = np.unravel_index(np.argmax(moved[0]), (28, 28))
    assert abs(int(row) - 10) == 3 and abs(int(col) - 20) == 3 and moved[0, row, col] == 200
    # Scale by 0.7 about (13.5, 13.5): column 20 -> 13.5 + 6.5 * 0.7 = 18.05, row 10 -> 11.05.
    scaled = corruptions.corrupt(image, "scale", SEED)
    row, col = np.unravel_index(np.argmax(scaled[0]), (28, 28))
    assert (int(row), int(col)) == (11, 18)


def test_corrupt_noise_rates_match_the_benchmark():
    """Impulse noise hits 17% of pixels, half salt; shot noise is Poisson(3 x) / 3, clipped."""
    flat = np.full((2000, 28, 28), 128, np.uint8)
    impulse = corruptions.corrupt(flat, "impulse_noise", SEED)
    assert abs((impulse != 128).mean() - 0.17) < 0.005
    assert abs((impulse == 255).mean() - 0.085) < 0.005
    shot = corruptions.corrupt(flat, "shot_noise", SEED).astype(np.float64)
    from scipy.stats import poisson

    lam = 3 * 128 / 255
    clipped_mean = sum(k * poisson.pmf(k, lam) for k in range(3)) + 3 * poisson.sf(2, lam)
    assert abs(shot.mean() - 255 / 3 * clipped_mean) < 0.5
    assert set(np.unique(shot)) <= {0.0, 85.0, 170.0, 255.0}  # Poisson(3 x) / 3


def test_corrupt_canny_outlines_a_square():
    """Canny's edges of a filled square: its outline, nothing inside or far outside."""
    image = np.zeros((1, 28, 28), np.uint8)
    image[0, 8:20, 8:20] = 255
    edges = corruptions.corrupt(image, "canny_edges", SEED)[0]
    assert set(np.unique(edges)) == {0, 255}
    assert edges[14, 14] == 0 and edges[2, 2] == 0
    rows = np.flatnonzero(edges[:, 14])
    assert rows.min() in (7, 8) and rows.max() in (19, 20)  # the top and bottom edges


def test_corrupt_fog_keeps_the_digit_visible():
    image = np.zeros((20, 28, 28), np.uint8)
    image[:, 10:18, 12:16] = 255
    fogged = corruptions.corrupt(image, "fog", SEED).astype(np.float64)
    assert (fogged[:, 10:18, 12:16].mean(axis=(1, 2)) > fogged[:, :5, :5].mean(axis=(1, 2))).all()
    assert fogged[:, :5, :5].mean() > 20  # the background is fog now


def test_corrupt_suite_round_trip_and_checks(tmp_path, images):
    labels = synthetic_digits(600, seed=3)[1]
    test = Split(images, labels)
    made = corruptions.generate(images, ["stripe", "brightness"], SEED)
    digest = suite.save(tmp_path, made, test, SEED)
    first = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert suite.save(tmp_path, made, test, SEED) == digest
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == first  # byte-identical

    loaded = suite.load(tmp_path, test)
    assert loaded.names == ["stripe", "brightness"] and loaded.sha256() == digest
    assert np.array_equal(loaded.images["stripe"], made["stripe"])

    other = Split(images[::-1].copy(), labels[::-1].copy())
    with pytest.raises(DataError, match="made from test split .* rerun: dvc repro corrupt"):
        suite.load(tmp_path, other)

    tampered = load_split(tmp_path, "stripe")
    images_changed = tampered.images.copy()
    images_changed[0, 0, 0] ^= 1
    from mnist_pipeline.data.splits import save_split

    save_split(tmp_path, "stripe", Split(images_changed, tampered.labels), compress=True)
    with pytest.raises(DataError, match="stripe.npz: its arrays differ"):
        suite.load(tmp_path, test)

    (tmp_path / "stripe.npz").unlink()
    with pytest.raises(DataError, match="stripe.npz: not found"):
        suite.load(tmp_path, test)


def test_corrupt_suite_drops_corruptions_no_longer_selected(tmp_path, images):
    test = Split(images, synthetic_digits(600, seed=3)[1])
    suite.save(tmp_path, corruptions.generate(images, ["stripe", "fog"], SEED), test, SEED)
    suite.save(tmp_path, corruptions.generate(images, ["stripe"], SEED), test, SEED)
    assert sorted(p.name for p in tmp_path.glob("*.npz")) == ["stripe.npz"]
    assert suite.load(tmp_path, test).names == ["stripe"]
