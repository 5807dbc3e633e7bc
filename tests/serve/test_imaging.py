"""Pictures of digits -> MNIST format: polarity, cropping, 20x20 box, centre of mass, files."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from helpers.tiny_store import render_digit
from PIL import Image, ImageDraw
from scipy import ndimage

from mnist_pipeline.serve import imaging


def as_array(picture: Image.Image) -> np.ndarray:
    return np.asarray(picture, dtype=np.float32)


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel().astype(float), b.ravel().astype(float))[0, 1])


def assert_mnist_like(image: np.ndarray) -> None:
    """uint8 28x28, white ink on exact black, digit inside 20x20, centre of mass at (14, 14)."""
    assert image.dtype == np.uint8 and image.shape == (28, 28)
    rows, cols = np.nonzero(image)
    assert rows.max() - rows.min() + 1 <= 20 and cols.max() - cols.min() + 1 <= 20
    assert max(rows.max() - rows.min(), cols.max() - cols.min()) + 1 >= 19  # fills the box
    com = ndimage.center_of_mass(image.astype(float))
    assert abs(com[0] - 14) <= 1.0 and abs(com[1] - 14) <= 1.0, com
    assert image.max() == 255
    assert (image == 0).mean() > 0.5  # the background is exactly 0, as in MNIST
    corners = image[:3, :3], image[:3, -3:], image[-3:, :3], image[-3:, -3:]
    assert max(int(corner.max()) for corner in corners) == 0


@pytest.fixture(scope="module")
def reference() -> dict[int, np.ndarray]:
    """Each digit drawn big and clean, white on black, centred: what the others must match."""
    return {d: imaging.to_mnist(as_array(render_digit(d, ink=255, paper=0))) for d in (3, 5, 7)}


@pytest.mark.parametrize("digit", [3, 5, 7])
def test_big_inverted_off_centre_noisy_digit_becomes_mnist(digit, reference):
    picture = as_array(render_digit(digit, size=300, canvas=(700, 560), at=(20, 10)))
    rng = np.random.default_rng(digit)
    picture = picture + rng.normal(0, 12, picture.shape)  # paper texture and sensor noise
    picture[:10, :] = 0  # a dark frame on two edges
    picture[:, -8:] = 0
    picture[400:404, 600:604] = 0  # a speck of dust
    converted = imaging.to_mnist(np.clip(picture, 0, 255))
    assert_mnist_like(converted)
    assert correlation(converted, reference[digit]) > 0.9


def test_mnist_image_stays_an_mnist_image(reference):
    again = imaging.to_mnist(reference[3].astype(np.float32))
    assert_mnist_like(again)
    assert correlation(again, reference[3]) > 0.95


def test_jpeg_photo_with_gray_uneven_paper(tmp_path, reference):
    ink = as_array(render_digit(5, size=220, canvas=(420, 320), at=(170, 30))) / 255.0
    rows, cols = np.mgrid[0 : ink.shape[0], 0 : ink.shape[1]]
    paper = 150 + 40 * cols / ink.shape[1] + 15 * rows / ink.shape[0]  # light falls unevenly
    gray = paper * ink + 55 * (1 - ink) + np.random.default_rng(1).normal(0, 6, ink.shape)
    rgb = np.stack([gray, gray * 0.97, gray * 0.9], axis=-1).clip(0, 255).astype(np.uint8)
    path = tmp_path / "photo.jpg"
    Image.fromarray(rgb).save(path, "JPEG", quality=70)
    converted = imaging.convert(path)
    assert_mnist_like(converted)
    assert correlation(converted, reference[5]) > 0.9


@pytest.mark.parametrize("stroke_colour", [20, 255])
def test_rgba_strokes_on_transparent_canvas(tmp_path, reference, stroke_colour):
    """Dark strokes composite onto white; white strokes (invisible on white) are read from
    the alpha channel."""
    alpha = np.asarray(render_digit(5, ink=255, paper=0))
    rgba = np.zeros((*alpha.shape, 4), dtype=np.uint8)
    rgba[..., :3] = stroke_colour
    rgba[..., 3] = alpha
    path = tmp_path / "drawing.png"
    Image.fromarray(rgba, "RGBA").save(path)
    converted = imaging.convert(path)
    assert_mnist_like(converted)
    assert correlation(converted, reference[5]) > 0.95


def test_palette_image_with_transparency(tmp_path, reference):
    path = tmp_path / "palette.png"
    render_digit(7).convert("P").save(path, transparency=255)
    assert Image.open(path).mode == "P"
    converted = imaging.convert(path)
    assert_mnist_like(converted)
    assert correlation(converted, reference[7]) > 0.95


def test_exif_orientation_is_applied(tmp_path, reference):
    upright = render_digit(7)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "phone.jpg"
    upright.rotate(90, expand=True).save(path, "JPEG", quality=95, exif=exif)
    converted = imaging.convert(path)
    assert correlation(converted, reference[7]) > 0.95


def test_tiny_picture_is_scaled_up(tmp_path):
    path = tmp_path / "tiny.png"
    render_digit(7, size=12, canvas=(10, 14), at=(1, 0)).save(path)
    assert_mnist_like(imaging.convert(path))


def test_sixteen_bit_grayscale(tmp_path, reference):
    path = tmp_path / "scan16.png"
    deep = (as_array(render_digit(3)) * 257).astype(np.uint16)
    Image.fromarray(deep).save(path)
    converted = imaging.convert(path)
    assert correlation(converted, reference[3]) > 0.95


def test_thin_pen_stroke_is_thickened_to_mnist_width(tmp_path):
    picture = Image.new("L", (1200, 1200), 255)
    ImageDraw.Draw(picture).line([(400, 200), (800, 200), (500, 1000)], fill=0, width=4)
    converted = imaging.to_mnist(as_array(picture))
    assert_mnist_like(converted)
    ink_per_row = (converted > 127).sum(axis=1)
    assert np.median(ink_per_row[ink_per_row > 0]) >= 2  # not a 1-pixel hairline


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"hello, not a picture", "not a readable image"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "not a readable image"),
    ],
)
def test_unreadable_files_are_named_in_the_error(tmp_path, content, reason):
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(imaging.ImageError, match=rf"^{path}: {reason}"):
        imaging.convert(path)


def test_truncated_jpeg_is_refused(tmp_path):
    buffer = io.BytesIO()
    render_digit(3).save(buffer, "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 3])
    with pytest.raises(imaging.ImageError, match="not a readable image"):
        imaging.convert(path)


def test_blank_picture_and_missing_file(tmp_path):
    blank = tmp_path / "blank.png"
    Image.new("L", (64, 64), 200).save(blank)
    with pytest.raises(imaging.ImageError, match=rf"^{blank}: no digit found"):
        imaging.convert(blank)
    with pytest.raises(imaging.ImageError, match="no such file"):
        imaging.convert(tmp_path / "missing.png")


def test_to_mnist_rejects_non_2d_input():
    with pytest.raises(ValueError, match="expected a 2-D picture"):
        imaging.to_mnist(np.zeros((4, 4, 3)))


def test_phone_sized_photo_is_quick(reference):
    picture = as_array(render_digit(7, size=2000, canvas=(4000, 3000), at=(1200, 300)))
    started = time.perf_counter()
    converted = imaging.to_mnist(picture)
    assert time.perf_counter() - started < 5.0
    assert_mnist_like(converted)
    assert correlation(converted, reference[7]) > 0.9
