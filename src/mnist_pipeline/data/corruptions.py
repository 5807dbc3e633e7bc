"""The MNIST-C corrupted test suite: the benchmark's 15 corruptions, written with NumPy and SciPy.

MNIST-C (Mu & Gilmer 2019, google-research/mnist-c `corruptions.py`) applies each corruption
at one fixed severity to the official test images. The parameters below are the benchmark's;
the code is ours, vectorised over a batch of images, so the whole suite (15 x 10,000 images)
takes seconds instead of the reference's image-at-a-time loop (which also needs ImageMagick
for motion blur and scikit-image for the rest).

Determinism: each chunk of `CHUNK` images of each corruption draws from its own generator,
seeded by (seed, the corruption's place in `CORRUPTIONS`, the chunk's index), so the output
does not depend on how many processes made it, in what order, or on which corruptions were
selected. The floating-point work is element-wise IEEE arithmetic, SciPy's compiled filters
and NumPy's functions that both CPU kinds we run on dispatch to the same AVX-512 code; no
BLAS call (its kernels are chosen per CPU). Images go out as uint8, rounded to nearest.

Where ours differs from the reference (documented in docs/reliability.md): motion blur is a
one-sided Gaussian smear along the angle with edge-replicating whole-pixel shifts (the
ImageMagick algorithm, without its PNG round trip); the glass-blur swaps are drawn for every
pixel rather than only where a swap happens; affine warps use SciPy's bilinear interpolation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import get_args

import numpy as np
from scipy import ndimage

from ..config.schema import CorruptionName

# The benchmark's 15 corruptions, in its order (`CORRUPTIONS` of corruptions.py, without
# `identity`), as the config names them. A corruption's place there is part of its seed.
CORRUPTIONS: tuple[str, ...] = get_args(CorruptionName)
CHUNK = 500  # images per seeded generator (and per task of `generate`)
SIZE = 28
CENTRE = 13.5  # the affine corruptions keep the image centre fixed

Corruption = Callable[[np.ndarray, np.random.Generator], np.ndarray]


# --- helpers -------------------------------------------------------------------------------


def gaussian(x: np.ndarray, sigma: float, mode: str = "nearest") -> np.ndarray:
    """A Gaussian blur of each image of a (N, 28, 28) batch (scikit-image's `gaussian`:
    truncated at 4 sigma, edges repeated unless `mode` says otherwise)."""
    return ndimage.gaussian_filter(x, sigma=(0, sigma, sigma), mode=mode, truncate=4.0)


def warp(x: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Each image sampled bilinearly at `matrix` @ (col, row, 1) of every output pixel, zero
    outside (scikit-image's `warp(x, inverse_map=AffineTransform)` with order 1, constant 0).

    `matrix` is (N, 2, 3), one inverse map per image. Written out element by element: a
    matrix product would go through BLAS, whose kernels differ between CPUs.
    """
    n = x.shape[0]
    rows, cols = np.meshgrid(
        np.arange(SIZE, dtype=np.float64), np.arange(SIZE, dtype=np.float64), indexing="ij"
    )
    a = matrix[:, :, :, None, None]
    src_col = a[:, 0, 0] * cols + a[:, 0, 1] * rows + a[:, 0, 2]
    src_row = a[:, 1, 0] * cols + a[:, 1, 1] * rows + a[:, 1, 2]
    batch = np.broadcast_to(np.arange(n, dtype=np.float64)[:, None, None], src_row.shape)
    return ndimage.map_coordinates(
        x, [batch, src_row, src_col], order=1, mode="grid-constant", cval=0.0
    )


def centred(linear: np.ndarray) -> np.ndarray:
    """(N, 2, 2) linear parts -> (N, 2, 3) maps that keep the centre (13.5, 13.5) fixed."""
    shift = CENTRE * (1 - linear[:, :, 0] - linear[:, :, 1])
    return np.concatenate([linear, shift[:, :, None]], axis=2)


def random_sign(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.choice(np.array([-1.0, 1.0]), size=n)


def line_from_points(c0: np.ndarray, r0: np.ndarray, c1: np.ndarray, r1: np.ndarray) -> np.ndarray:
    """The benchmark's anti-aliased line from (c0, r0) to (c1, r1), one per image: intensity
    log(1 - d/2.3) + 1 at distance d (rows) from the line, zero left of floor(c0) and right of
    ceil(c1); an all-zero image where c0 == c1. Arguments are (N,) arrays."""
    c0, r0, c1, r1 = (np.asarray(v, dtype=np.float64)[:, None, None] for v in (c0, r0, c1, r1))
    grid = np.arange(SIZE, dtype=np.float64)
    cc, rr = grid[None, None, :], grid[None, :, None]
    vertical = c1 == c0
    slope = np.divide(r1 - r0, c1 - c0, out=np.zeros_like(c0), where=~vertical)
    dist = np.clip(np.abs(rr - (slope * (cc - c0) + r0)), 0, 2.3 - 1e-10)
    line = np.clip(np.log(1 - dist / 2.3) + 1, 0, 1)
    inside = (cc >= np.floor(c0)) & (cc < np.ceil(c1))
    return np.where(inside & ~vertical, line, 0.0)


def plasma_fractal(
    rng: np.random.Generator, maps: np.ndarray, wibble_decay: float, crop: int = SIZE
) -> np.ndarray:
    """Diamond-square height maps, as the benchmark's `plasma_fractal` makes them (random
    offsets of +-wibble**2, the wibble shrinking by `wibble_decay` at each level, wrapping at
    the edges), drawn into `maps` (n, size, size) with size a power of two; returns each map's
    top-left `crop` x `crop` corner scaled by the whole map's range to [0, 1].

    `maps` is a buffer the caller reuses: a fresh 256x256 map per image costs more in page
    faults than in arithmetic."""
    n, size, _ = maps.shape
    maps[:, 0, 0] = 0
    step, wibble = size, 100.0

    def wibbled_mean(total: np.ndarray) -> np.ndarray:
        return total / 4 + wibble * rng.uniform(-wibble, wibble, total.shape)

    while step >= 2:
        half = step // 2
        corners = maps[:, 0::step, 0::step]
        squares = corners + np.roll(corners, -1, axis=1)
        squares = squares + np.roll(squares, -1, axis=2)
        maps[:, half::step, half::step] = wibbled_mean(squares)
        centres = maps[:, half::step, half::step]
        left = (centres + np.roll(centres, 1, axis=1)) + (corners + np.roll(corners, -1, axis=2))
        maps[:, 0::step, half::step] = wibbled_mean(left)
        top = (centres + np.roll(centres, 1, axis=2)) + (corners + np.roll(corners, -1, axis=1))
        maps[:, half::step, 0::step] = wibbled_mean(top)
        step = half
        wibble /= wibble_decay
    low = maps.min(axis=(1, 2), keepdims=True)
    high = maps.max(axis=(1, 2), keepdims=True)
    return (maps[:, :crop, :crop] - low) / (high - low)


# --- the corruptions: (N, 28, 28) float64 in [0, 1] -> the same, at the benchmark's severity


def shot_noise(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    c = 3  # severity 5
    return np.clip(rng.poisson(x * c) / c, 0, 1)


def impulse_noise(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    amount = 0.17  # severity 4: salt and pepper on 17% of pixels, half of each
    flipped = rng.random(x.shape) < amount
    salt = rng.random(x.shape) < 0.5
    return np.where(flipped, salt.astype(np.float64), x)


def glass_blur(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    sigma, delta, iterations = 0.7, 1, 2  # severity 1
    n = x.shape[0]
    # The benchmark goes through uint8 here (truncating). A flat 255 region blurs to 255 times
    # the kernel's sum, a hair under or over 1 depending on the last bit of exp(): the 1e-9
    # keeps such a pixel at 255 whatever that bit is.
    pixels = np.floor(gaussian(x, sigma) * 255 + 1e-9)
    positions = range(SIZE - delta, delta, -1)
    steps = iterations * len(positions) ** 2
    swap = rng.random((steps, n)) < 0.5
    offsets = rng.integers(-delta, delta, size=(steps, 2, n))  # [-delta, delta)
    index = np.arange(n)
    step = 0
    for _ in range(iterations):  # locally shuffle pixels, bottom-right to top-left
        for h in positions:
            for w in positions:
                chosen = index[swap[step]]
                dy, dx = offsets[step, 0, chosen], offsets[step, 1, chosen]
                here = pixels[chosen, h, w]
                pixels[chosen, h, w] = pixels[chosen, h + dy, w + dx]
                pixels[chosen, h + dy, w + dx] = here
                step += 1
    return np.clip(gaussian(pixels / 255, sigma), 0, 1)


def motion_blur(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    radius, sigma = 10, 3.0  # severity 1; the angle is uniform in [-45, 45) degrees
    width = 2 * radius + 1
    kernel = np.exp(-(np.arange(width, dtype=np.float64) ** 2) / (2 * sigma**2))
    kernel /= kernel.sum()
    angle = np.deg2rad(rng.uniform(-45, 45, size=x.shape[0]))
    steps = np.arange(width, dtype=np.float64)[None, :]
    dy = -np.ceil(steps * np.sin(angle)[:, None] - 0.5).astype(np.int64)  # (N, width)
    dx = -np.ceil(steps * np.cos(angle)[:, None] - 0.5).astype(np.int64)
    grid = np.arange(SIZE)
    batch = np.arange(x.shape[0])[:, None, None]
    blurred = np.zeros_like(x)
    for i in range(width):  # the image shifted i pixels along the angle, edges repeated
        rows = np.clip(grid[None, :, None] - dy[:, i, None, None], 0, SIZE - 1)
        cols = np.clip(grid[None, None, :] - dx[:, i, None, None], 0, SIZE - 1)
        blurred += kernel[i] * x[batch, rows, cols]
    return np.clip(blurred, 0, 1)


def shear(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    angle = 0.4 * random_sign(rng, x.shape[0])  # severity 2, either direction
    linear = np.zeros((x.shape[0], 2, 2))
    linear[:, 0, 0] = 1
    linear[:, 0, 1] = -np.sin(angle)
    linear[:, 1, 1] = np.cos(angle)
    return np.clip(warp(x, centred(linear)), 0, 1)


def scale(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    factor = 1 / 0.7  # severity 3: the digit shrinks to 70% about the centre
    linear = np.broadcast_to(np.eye(2) * factor, (x.shape[0], 2, 2))
    return np.clip(warp(x, centred(linear)), 0, 1)


def rotate(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    angle = 0.4 * random_sign(rng, x.shape[0])  # severity 2: 0.4 rad, either direction
    cos, sin = np.cos(angle), np.sin(angle)
    linear = np.stack([np.stack([cos, -sin], axis=1), np.stack([sin, cos], axis=1)], axis=1)
    return np.clip(warp(x, centred(linear)), 0, 1)


def brightness(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    # Severity 5: +0.5 on HSV's value channel; for a grey image that is +0.5 on every pixel.
    return np.clip(x + 0.5, 0, 1)


def translate(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    n = x.shape[0]
    shift = 3 * random_sign(rng, 2 * n).reshape(n, 2)  # severity 3: 3 pixels along each axis
    matrix = np.zeros((n, 2, 3))
    matrix[:, 0, 0] = matrix[:, 1, 1] = 1
    matrix[:, :, 2] = shift
    return np.clip(warp(x, matrix), 0, 1)


def stripe(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    out = x.copy()
    out[:, :, :7] = 1 - x[:, :, :7]  # the 7 columns at each side inverted
    out[:, :, 21:] = 1 - x[:, :, 21:]
    return out


def fog(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    strength, decay = 3.0, 1.4  # severity 5
    peak = x.max(axis=(1, 2), keepdims=True)
    out = np.empty_like(x)
    batch = 25  # maps of 256x256 at a time (13 MB): the fastest size measured
    maps = np.empty((batch, 256, 256))
    for start in range(0, x.shape[0], batch):
        part = slice(start, start + batch)
        count = x[part].shape[0]
        haze = plasma_fractal(rng, maps[:count], decay)
        out[part] = (x[part] + strength * haze) * peak[part] / (peak[part] + strength)
    return np.clip(out, 0, 1)


def spatter(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    loc, scale_, sigma, threshold, mud_sigma = 0.65, 0.3, 1.0, 0.65, 1.5  # severity 4 (mud)
    liquid = gaussian(rng.normal(loc, scale_, size=x.shape), sigma)
    liquid[liquid < threshold] = 0
    mask = gaussian((liquid > threshold).astype(np.float64), mud_sigma)
    mask[mask < 0.8] = 0
    return np.clip(x * (1 - mask) + 63 / 255 * mask, 0, 1)


def dotted_line(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    n = x.shape[0]
    r0, r1 = rng.integers(0, 27, size=(2, n))
    line = line_from_points(np.zeros(n), r0, np.full(n, 27.0), r1)
    line[:, :, (np.arange(SIZE) // 2 % 2 == 0) & (np.arange(SIZE) < 26)] = 0  # dots: 2 on, 2 off
    return np.clip(x + line, 0, 1)


def zigzag(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    n = x.shape[0]
    length, width = 2.0, 2.0  # of each zig
    c0, c1 = 2, 25
    r0 = rng.integers(0, 27, size=n).astype(np.float64)
    r1 = r0 + rng.integers(-5, 5, size=n)
    theta = np.arctan((r1 - r0) / (c1 - c0))
    d = (c1 - c0) / np.cos(theta)  # the straight line's length
    # The zigzag's corners along a horizontal line from (0, 0), as the benchmark builds them;
    # with |r1 - r0| <= 5, d is in [23, 23.6), so every image has the same number of corners.
    count = int((float(d.min()) - length) // (2 * length)) + 1
    points_c = [np.zeros(n)] + [np.full(n, (2 * i + 1) * length) for i in range(count)]
    last_r = (-1) ** (count - 1) * width
    points_r = [np.zeros(n)] + [np.full(n, (-1) ** i * width) for i in range(count)]
    max_c = 2 * length * np.floor(d / (2 * length))
    tail = d != max_c
    points_c.append(np.where(tail, d, np.nan))
    points_r.append(np.where(tail, last_r / (2 * np.where(tail, d - max_c, 1.0)), np.nan))
    cos, sin = np.cos(theta), np.sin(theta)
    total = np.zeros_like(x)
    previous = None
    for pc, pr in zip(points_c, points_r, strict=True):
        point = (cos * pc - sin * pr + c0, sin * pc + cos * pr + r0)  # rotated by theta
        if previous is not None:
            drawn = line_from_points(previous[0], previous[1], point[0], point[1])
            total += np.nan_to_num(drawn)
        previous = point
    return np.clip(x + total, 0, 1)


def canny_edges(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Canny's edge map (sigma 1, hysteresis thresholds 0.1 and 0.2), as scikit-image's
    `feature.canny` computes it for a float image: Gaussian smoothing normalised for the
    zero border, Sobel gradients, non-maximum suppression interpolated between the two
    neighbours along the gradient, then 8-connected hysteresis."""
    sigma, low, high = 1.0, 0.1, 0.2
    ones = np.ones((1, SIZE, SIZE))
    bleed = gaussian(ones, sigma, mode="constant") + np.finfo(np.float64).eps
    smooth = gaussian(x, sigma, mode="constant") / bleed
    di = ndimage.correlate1d(ndimage.correlate1d(smooth, [-1, 0, 1], axis=1), [1, 2, 1], axis=2)
    dj = ndimage.correlate1d(ndimage.correlate1d(smooth, [-1, 0, 1], axis=2), [1, 2, 1], axis=1)
    magnitude = np.sqrt(di * di + dj * dj)
    abs_i, abs_j = np.abs(di), np.abs(dj)
    padded = np.pad(magnitude, ((0, 0), (1, 1), (1, 1)))

    def at(drow: int, dcol: int) -> np.ndarray:  # each pixel's neighbour's magnitude
        return padded[:, 1 + drow : 1 + drow + SIZE, 1 + dcol : 1 + dcol + SIZE]

    inner = np.zeros((1, SIZE, SIZE), dtype=bool)
    inner[:, 1:-1, 1:-1] = True
    same_sign = ((di >= 0) & (dj >= 0), (di <= 0) & (dj <= 0))
    opposite = ((di <= 0) & (dj >= 0), (di >= 0) & (dj <= 0))
    steep, flat = abs_i >= abs_j, abs_i <= abs_j
    with np.errstate(divide="ignore", invalid="ignore"):
        w_steep, w_flat = abs_j / abs_i, abs_i / abs_j
    # (direction bin, weight, (c1, c2) ahead, (c1, c2) behind), in scikit-image's order: a
    # pixel on a boundary between bins takes the later bin's answer.
    bins = [
        ((same_sign[0] | same_sign[1]) & steep, w_steep, ((1, 0), (1, 1)), ((-1, 0), (-1, -1))),
        ((same_sign[0] | same_sign[1]) & flat, w_flat, ((0, 1), (1, 1)), ((0, -1), (-1, -1))),
        ((opposite[0] | opposite[1]) & flat, w_flat, ((0, 1), (-1, 1)), ((0, -1), (1, -1))),
        ((opposite[0] | opposite[1]) & steep, w_steep, ((-1, 0), (-1, 1)), ((1, 0), (1, -1))),
    ]
    maxima = np.zeros(x.shape, dtype=bool)
    for members, weight, ahead, behind in bins:
        members = members & inner
        with np.errstate(invalid="ignore"):  # a flat pixel (0/0 weight) is no maximum
            ok_ahead = at(*ahead[1]) * weight + at(*ahead[0]) * (1 - weight) <= magnitude
            ok_behind = at(*behind[1]) * weight + at(*behind[0]) * (1 - weight) <= magnitude
        maxima = np.where(members, ok_ahead & ok_behind, maxima)
    weak = maxima & (magnitude >= low)
    strong = maxima & (magnitude >= high)
    within_image = np.zeros((3, 3, 3), dtype=bool)
    within_image[1] = True  # 8-connected inside an image, never across images
    labels, count = ndimage.label(weak, structure=within_image)
    keep = np.zeros(count + 1, dtype=bool)
    keep[np.unique(labels[strong])] = True
    keep[0] = False
    return keep[labels].astype(np.float64)


FUNCTIONS: dict[str, Corruption] = {
    "shot_noise": shot_noise,
    "impulse_noise": impulse_noise,
    "glass_blur": glass_blur,
    "motion_blur": motion_blur,
    "shear": shear,
    "scale": scale,
    "rotate": rotate,
    "brightness": brightness,
    "translate": translate,
    "stripe": stripe,
    "fog": fog,
    "spatter": spatter,
    "dotted_line": dotted_line,
    "zigzag": zigzag,
    "canny_edges": canny_edges,
}


# --- applying them -------------------------------------------------------------------------


def generator(seed: int, name: str, chunk: int) -> np.random.Generator:
    """The generator of chunk `chunk` of corruption `name`: independent of every other."""
    return np.random.default_rng([seed, CORRUPTIONS.index(name), chunk])


def corrupt_chunk(images: np.ndarray, name: str, seed: int, chunk: int) -> np.ndarray:
    """Corruption `name` of one chunk of uint8 (n, 28, 28) images, as uint8."""
    if name not in FUNCTIONS:
        raise ValueError(f"corruption: got {name!r}, expected one of {', '.join(CORRUPTIONS)}")
    x = np.asarray(images, dtype=np.float64) / 255
    out = FUNCTIONS[name](x, generator(seed, name, chunk))
    return np.rint(np.clip(out, 0, 1) * 255).astype(np.uint8)


def corrupt(images: np.ndarray, name: str, seed: int) -> np.ndarray:
    """Corruption `name` of every image, chunk by chunk (in one process)."""
    parts = [
        corrupt_chunk(images[start : start + CHUNK], name, seed, start // CHUNK)
        for start in range(0, images.shape[0], CHUNK)
    ]
    return np.concatenate(parts) if parts else np.zeros_like(images)


def _task(args: tuple[np.ndarray, str, int, int]) -> np.ndarray:
    return corrupt_chunk(*args)


def generate(
    images: np.ndarray, names: list[str] | tuple[str, ...], seed: int, processes: int = 1
) -> dict[str, np.ndarray]:
    """Every corruption in `names` applied to all `images`; the same bytes for any
    `processes` (each chunk is seeded on its own)."""
    unknown = [name for name in names if name not in FUNCTIONS]
    if unknown:
        raise ValueError(
            f"corruptions: got {unknown}, expected names from {', '.join(CORRUPTIONS)}"
        )
    tasks = [
        (images[start : start + CHUNK], name, seed, start // CHUNK)
        for name in names
        for start in range(0, images.shape[0], CHUNK)
    ]
    if processes > 1 and len(tasks) > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(processes) as pool:
            done = pool.map(_task, tasks, chunksize=1)
    else:
        done = [_task(task) for task in tasks]
    out: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for (_, name, _, _), part in zip(tasks, done, strict=True):
        out[name].append(part)
    return {
        name: (np.concatenate(parts) if parts else np.zeros_like(images))
        for name, parts in out.items()
    }
