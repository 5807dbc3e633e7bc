"""The sample pictures in examples/: each converts to an MNIST digit, and the script that
draws them makes exactly the pictures the repository ships."""

from __future__ import annotations

import runpy

import numpy as np
import pytest
from helpers.digits import ROOT
from PIL import Image
from scipy import ndimage

from mnist_pipeline.serve import imaging

EXAMPLES = ROOT / "examples"
PICTURES = sorted(p for p in EXAMPLES.iterdir() if p.suffix in (".png", ".jpg", ".jpeg"))


def test_there_are_pictures_to_predict():
    assert len(PICTURES) >= 4, PICTURES


@pytest.mark.parametrize("picture", PICTURES, ids=[p.name for p in PICTURES])
def test_each_picture_converts_to_a_28x28_uint8_digit(picture):
    digit = imaging.convert(picture)
    assert digit.shape == (28, 28) and digit.dtype == np.uint8
    assert digit.max() == 255  # strokes reach full white, as in MNIST
    ink = digit > 64
    assert 0.05 < ink.mean() < 0.5, f"{picture.name}: {ink.mean():.2f} of the field is ink"
    # as MNIST: the digit fits a 20x20 box (its anti-aliased rim aside), centred by mass
    rows, cols = np.nonzero(ink)
    assert max(rows.max() - rows.min(), cols.max() - cols.min()) + 1 <= 21
    assert np.allclose(ndimage.center_of_mass(digit.astype(float)), (14, 14), atol=1.0)


def test_the_script_draws_the_shipped_pictures(tmp_path):
    script = runpy.run_path(str(EXAMPLES / "make_examples.py"))
    written = script["write_all"](tmp_path)
    assert sorted(p.name for p in written) == [p.name for p in PICTURES]
    for path in written:
        with Image.open(path) as fresh, Image.open(EXAMPLES / path.name) as shipped:
            assert fresh.mode == shipped.mode and fresh.size == shipped.size
            assert np.array_equal(np.asarray(fresh), np.asarray(shipped)), path.name
