"""Draw the sample pictures in examples/: digits as a camera or a paint program gives them.

    python examples/make_examples.py                 # rewrites examples/*.png and *.jpg
    python examples/make_examples.py --out /tmp/x    # elsewhere

Each picture is made from a fixed seed with Pillow's built-in font or pen strokes, so a rerun
gives the same pictures. They are what `mnist-predict` is for, not MNIST images: dark ink on
light paper with uneven light, blur, noise and a tilt; a JPEG from a phone with a shadow at
its edge; a drawing with a transparent background; chalk on a board (light on dark, JPEG); a thin
pencil line, scanned in grayscale. `mnist-predict examples/*` should name the digit in each
file's name.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

HERE = Path(__file__).resolve().parent
SIZE = 200  # pixels on each side: small files, still far larger than MNIST's 28


def glyph(
    digit: int,
    *,
    paper: int,
    ink: int,
    size: int = 150,
    angle: float = 0.0,
    offset: tuple[int, int] = (0, 0),
) -> Image.Image:
    """`digit` in Pillow's built-in font, centred (plus `offset`) on a square canvas."""
    image = Image.new("L", (SIZE, SIZE), paper)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=size)
    left, top, right, bottom = draw.textbbox((0, 0), str(digit), font=font)
    at = (
        (SIZE - (right - left)) // 2 - left + offset[0],
        (SIZE - (bottom - top)) // 2 - top + offset[1],
    )
    draw.text(at, str(digit), fill=ink, font=font)
    return image.rotate(angle, resample=Image.Resampling.BICUBIC, fillcolor=paper)


def photographed(
    image: Image.Image,
    rng: np.random.Generator,
    *,
    light: tuple[float, float],
    blur: float,
    noise: float,
    tint: tuple[float, float, float],
) -> Image.Image:
    """`image` as a camera sees it: light falling off across the page, blur, sensor noise,
    and the colour of the paper and the light."""
    pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(blur)), dtype=np.float32)
    ramp = np.linspace(light[0], light[1], SIZE, dtype=np.float32)
    pixels = pixels * (ramp[None, :] + ramp[:, None]) / 2  # brighter towards one corner
    rgb = np.stack([pixels * channel for channel in tint], axis=-1)
    rgb += rng.normal(0.0, noise, rgb.shape)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")


def three(rng: np.random.Generator) -> Image.Image:
    """A photo of a printed 3: dark ink on light paper, tilted, soft, noisy."""
    digit = glyph(3, paper=225, ink=45, angle=-7, offset=(6, -4))
    return photographed(digit, rng, light=(0.82, 1.05), blur=1.4, noise=4.0, tint=(1.0, 0.97, 0.9))


def seven(rng: np.random.Generator) -> Image.Image:
    """A phone photo of a 7, saved as JPEG, with the shadow of the phone along one edge."""
    digit = glyph(7, paper=215, ink=60, size=140, angle=9, offset=(-8, 4))
    shadow = np.asarray(digit, dtype=np.float32)
    shadow[:, :18] *= 0.45
    return photographed(
        Image.fromarray(shadow.astype(np.uint8)),
        rng,
        light=(1.05, 0.85),
        blur=1.0,
        noise=5.0,
        tint=(0.95, 0.97, 1.0),
    )


def four_drawn(rng: np.random.Generator) -> Image.Image:
    """A 4 drawn with a round pen in a paint program: black strokes, transparent canvas."""
    image = Image.new("RGBA", (SIZE, SIZE), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    jitter = lambda: rng.normal(0.0, 2.0, 2)  # noqa: E731 - a hand is never quite steady
    strokes = [[(120, 30), (45, 125), (160, 125)], [(125, 70), (122, 178)]]
    for stroke in strokes:
        points = [tuple(np.add(point, jitter())) for point in stroke]
        draw.line(points, fill=(0, 0, 0, 255), width=14, joint="curve")
        for x, y in (points[0], points[-1]):  # round pen ends
            draw.ellipse((x - 7, y - 7, x + 7, y + 7), fill=(0, 0, 0, 255))
    return image


def five_inverted(rng: np.random.Generator) -> Image.Image:
    """A 5 in chalk on a blackboard: light strokes on a dark, noisy background."""
    digit = glyph(5, paper=40, ink=215, size=145, angle=4, offset=(-3, 2))
    return photographed(digit, rng, light=(0.9, 1.0), blur=1.2, noise=9.0, tint=(0.85, 1.0, 0.9))


def two_pencil(rng: np.random.Generator) -> Image.Image:
    """A 2 in thin pencil on white paper: a gray line a few pixels wide."""
    image = Image.new("L", (SIZE, SIZE), 245)
    draw = ImageDraw.Draw(image)
    draw.arc((55, 28, 145, 112), start=190, end=40, fill=105, width=4)
    draw.line([(139, 92), (58, 170), (150, 168)], fill=105, width=4, joint="curve")
    scan = photographed(image, rng, light=(0.95, 1.02), blur=0.7, noise=4.0, tint=(1.0, 1.0, 1.0))
    return scan.convert("L")  # a grayscale scan


PICTURES = {
    "three.png": three,
    "seven.jpg": seven,
    "four-drawn.png": four_drawn,
    "five-inverted.jpg": five_inverted,
    "two-pencil.png": two_pencil,
}


def write_all(folder: Path) -> list[Path]:
    """Draw every picture into `folder`; the same files on every run."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for seed, (name, draw) in enumerate(PICTURES.items()):
        picture = draw(np.random.default_rng(seed))
        options = {"quality": 85} if name.endswith(".jpg") else {"optimize": True}
        picture.save(folder / name, **options)
        written.append(folder / name)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="default: examples/")
    for path in write_all(parser.parse_args().out):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
