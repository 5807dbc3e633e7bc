"""A picture of one digit (a photo of paper, a drawing) -> a 28x28 MNIST image.

MNIST was made by size-normalising each digit to fit a 20x20 box (aspect ratio kept,
anti-aliased) and centring it in a 28x28 field by its centre of mass: white ink on a
black background. `to_mnist` does the same to any grayscale picture:

1. ink is made bright: the background (the median pixel: most of a digit picture is
   background) is darker than the ink in MNIST, so a lighter background is inverted;
2. the background level is subtracted and the ink contrast stretched to [0, 1];
3. ink is whatever clears a light threshold; specks much smaller than the largest stroke and
   marks touching the picture's edge (frames, shadows, a table edge) are dropped, unless
   nothing else is left; everything that is not ink or its immediate rim is set to 0;
4. the digit is cropped to its bounding box; pen strokes thinner than MNIST's (about
   2 px at 20x20) are thickened, so a fine pen on a big photo does not vanish;
5. scaled so its longer side is 20 px (Lanczos, anti-aliased), and placed in 28x28 with its
   centre of mass at (14, 14), the centre MNIST's digits have (measured: 13.99, 14.00).

`read_gray` opens PNG/JPEG/... with EXIF orientation applied, transparent pixels composited
on white and palettes resolved. Numpy, SciPy and Pillow only.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from scipy import ndimage

from ..errors import ImageError

SIZE = 28
BOX = 20
CENTRE = 14.0
# Ink is what lies above this fraction of the background-to-ink contrast (ignores paper
# texture and JPEG noise, keeps pencil).
INK_THRESHOLD = 0.35
# Below this fraction a pixel is background and becomes exactly 0, as in MNIST.
NOISE_FLOOR = 0.12
# Pieces smaller than this fraction of the largest piece of ink are specks, not strokes.
MIN_PIECE = 0.05
# Less contrast than this (in 0..255 levels) means there is no digit to see.
MIN_CONTRAST = 24.0
# MNIST's pen is about 2 px wide once the digit fits 20x20.
STROKE_PX = 2.0
# Pictures larger than this are refused before decoding (decompression bombs).
MAX_PIXELS = 64_000_000
# Bigger pictures are shrunk to this many pixels on the long side first: the digit ends up
# 20 px tall anyway, and a phone photo's 12 million pixels would only slow the filters.
WORK_SIDE = 1000


def read_gray(path: str | os.PathLike[str]) -> np.ndarray:
    """The picture at `path` as float32 grayscale (H, W) in [0, 255], upright."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if image.width * image.height > MAX_PIXELS:
                    raise ImageError(
                        f"{path}: {image.width}x{image.height} pixels is too large "
                        f"(at most {MAX_PIXELS:,})"
                    )
                upright = ImageOps.exif_transpose(image)
                upright.load()
                return flatten(upright)
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a directory") from None
    except (
        UnidentifiedImageError,
        OSError,
        ValueError,
        SyntaxError,
        EOFError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    ) as err:
        raise ImageError(
            f"{path}: not a readable image ({err.__class__.__name__}: "
            f"{str(err).splitlines()[0] if str(err) else 'no detail'})"
        ) from None


def flatten(image: Image.Image) -> np.ndarray:
    """Any Pillow image as float32 grayscale: palettes resolved, transparency on white.

    A picture whose colours say nothing (e.g. white strokes on a transparent canvas, which
    are white on white once composited) is read from its alpha channel instead.
    """
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # 16-bit / float grayscale
        values = np.asarray(image, dtype=np.float32)
        low, high = float(values.min()), float(values.max())
        return (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
    if image.mode == "P":
        image = image.convert("RGBA")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if not has_alpha:
        return np.asarray(image.convert("L"), dtype=np.float32)
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    gray = np.asarray(Image.alpha_composite(white, rgba).convert("L"), dtype=np.float32)
    alpha = np.asarray(rgba.getchannel("A"), dtype=np.float32)
    if np.ptp(gray) < MIN_CONTRAST <= np.ptp(alpha):
        return 255.0 - alpha  # opaque strokes as dark ink on a light background
    return gray


def to_mnist(gray: np.ndarray) -> np.ndarray:
    """A grayscale picture of one digit as a uint8 (28, 28) MNIST image (see module doc)."""
    image = np.asarray(gray, dtype=np.float32)
    if image.ndim != 2 or min(image.shape) < 1:
        raise ValueError(f"gray: got shape {image.shape}, expected a 2-D picture (H, W)")
    if max(image.shape) > WORK_SIDE:
        image = _shrink(image, WORK_SIDE / max(image.shape))
    if min(image.shape) >= 32:
        image = ndimage.median_filter(image, size=3)  # salt-and-pepper noise, dust
    ink = _ink(image)
    keep = _digit_mask(ink > INK_THRESHOLD)
    rows, cols = np.nonzero(keep)
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    # The rim: anti-aliased edge pixels just outside the thresholded strokes.
    rim = ndimage.binary_dilation(keep, iterations=max(1, round(max(image.shape) / 200)))
    ink = np.where(rim & (ink >= NOISE_FLOOR), ink, 0.0)
    digit = _thicken(ink[top:bottom, left:right], keep[top:bottom, left:right])
    return _centre(_resize(digit, BOX / max(digit.shape)))


def convert(path: str | os.PathLike[str]) -> np.ndarray:
    """The digit pictured in the file at `path` as a uint8 (28, 28) MNIST image."""
    try:
        return to_mnist(read_gray(path))
    except ImageError as err:
        if str(err).startswith(str(path)):
            raise
        raise ImageError(f"{path}: {err}") from None


def _ink(image: np.ndarray) -> np.ndarray:
    """Ink strength in [0, 1]: bright ink on a 0 background, whatever the picture's polarity."""
    background = float(np.median(image))
    low, high = float(image.min()), float(image.max())
    if high - low < MIN_CONTRAST:
        raise ImageError(
            f"no digit found (the picture is blank: contrast {high - low:.0f} of 255 levels)"
        )
    if background > (low + high) / 2:  # dark ink on light paper
        image, background, high = 255.0 - image, 255.0 - background, 255.0 - low
    return np.clip((image - background) / (high - background), 0.0, 1.0)


def _digit_mask(mask: np.ndarray) -> np.ndarray:
    """The pieces of `mask` that make up the digit: no specks, no marks on the edge."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if count == 0:
        raise ImageError("no digit found (no ink above the background)")
    areas = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    big = np.flatnonzero(areas >= MIN_PIECE * areas.max()) + 1
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    inner = [label for label in big if label not in edge]
    return np.isin(labels, inner if inner else big)


def _thicken(digit: np.ndarray, strokes: np.ndarray) -> np.ndarray:
    """`digit` with its strokes dilated if they would end up thinner than MNIST's pen."""
    scale = BOX / max(digit.shape)
    area = strokes.sum()
    outline = (strokes & ~ndimage.binary_erosion(strokes, border_value=0)).sum()
    width = 2.0 * area / max(outline, 1)  # a stroke of length L: area L*w, outline ~2L
    missing = STROKE_PX / scale - width
    if missing < 1.0:
        return digit
    size = int(round(missing)) | 1  # an odd window keeps the digit where it is
    padded = np.pad(digit, size // 2)  # room for strokes on the bounding box to grow
    return ndimage.grey_dilation(padded, size=(size, size))


def _shrink(image: np.ndarray, scale: float) -> np.ndarray:
    """`image` scaled by `scale` with Lanczos (anti-aliased) resampling."""
    height, width = image.shape
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    resized = Image.fromarray(image.astype(np.float32)).resize(size, Image.Resampling.LANCZOS)
    return np.asarray(resized, dtype=np.float32)


def _resize(digit: np.ndarray, scale: float) -> np.ndarray:
    out = np.clip(_shrink(digit, scale), 0.0, 1.0)
    peak = out.max()
    if peak <= 0:
        raise ImageError("no digit found (nothing left after scaling)")
    return out / peak  # MNIST's strokes reach full white


def _centre(digit: np.ndarray) -> np.ndarray:
    """`digit` in a 28x28 field, its centre of mass as close to (14, 14) as the field allows."""
    height, width = digit.shape
    com_row, com_col = ndimage.center_of_mass(digit)
    top = int(np.clip(round(CENTRE - com_row), 0, SIZE - height))
    left = int(np.clip(round(CENTRE - com_col), 0, SIZE - width))
    field = np.zeros((SIZE, SIZE), dtype=np.float32)
    field[top : top + height, left : left + width] = digit
    return np.round(field * 255.0).astype(np.uint8)
