"""Write examples/drawn/: digits as people draw them, for checking the digits model on inputs unlike
its training data (never trained on). 64x64 greyscale PNGs, named `DIGIT-STYLE-NNN.png`.

scikit-learn's digits are light strokes on dark, filling an 8x8 frame. These are not: typed in
fonts (DejaVu's, where installed, and Pillow's own) and drawn as pen strokes of several widths, at
several sizes and places with margins around them, half dark on light paper and half light on dark.
Seeded: the same files every run.

    .venv/bin/python scripts/make_drawn_digits.py [FOLDER]
"""

from __future__ import annotations

import os
import sys

import numpy as np
from PIL import Image, ImageDraw, ImageFont

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 64
FONT_FILES = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf",
    "/usr/share/fonts/truetype/dejavu/DejaVuSerif.ttf",
    "/usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf",
]
# Pen strokes per digit in a unit box (x right, y down): polylines, or ("ellipse", box)
STROKES: dict[int, list] = {
    0: [("ellipse", (0.2, 0.06, 0.8, 0.94))],
    1: [[(0.32, 0.28), (0.55, 0.06), (0.55, 0.94)]],
    2: [[(0.2, 0.3), (0.3, 0.12), (0.5, 0.06), (0.7, 0.12), (0.78, 0.3), (0.7, 0.48), (0.2, 0.92), (0.82, 0.92)]],
    3: [
        [
            (0.2, 0.14),
            (0.5, 0.06),
            (0.75, 0.18),
            (0.72, 0.38),
            (0.45, 0.48),
            (0.72, 0.56),
            (0.8, 0.76),
            (0.55, 0.93),
            (0.2, 0.86),
        ]
    ],
    4: [[(0.66, 0.94), (0.66, 0.06), (0.15, 0.66), (0.86, 0.66)]],
    5: [[(0.78, 0.08), (0.3, 0.08), (0.25, 0.45), (0.55, 0.4), (0.76, 0.55), (0.76, 0.76), (0.5, 0.93), (0.2, 0.85)]],
    6: [
        [
            (0.72, 0.08),
            (0.42, 0.28),
            (0.26, 0.58),
            (0.3, 0.84),
            (0.5, 0.93),
            (0.72, 0.8),
            (0.72, 0.6),
            (0.5, 0.5),
            (0.27, 0.62),
        ]
    ],
    7: [[(0.18, 0.08), (0.82, 0.08), (0.42, 0.94)]],
    8: [("ellipse", (0.28, 0.06, 0.72, 0.48)), ("ellipse", (0.22, 0.48, 0.78, 0.94))],
    9: [("ellipse", (0.24, 0.06, 0.76, 0.5)), [(0.76, 0.28), (0.7, 0.62), (0.55, 0.94)]],
}


def fonts() -> list[tuple[str, object]]:
    """(style name, a function size -> font): DejaVu's where installed, and Pillow's built-in."""
    found = [
        (os.path.splitext(os.path.basename(f))[0].lower(), lambda size, f=f: ImageFont.truetype(f, size))
        for f in FONT_FILES
        if os.path.exists(f)
    ]
    return [*found, ("pillow", lambda size: ImageFont.load_default(size))]


def typed(digit: int, font, height: int, rng: np.random.Generator) -> Image.Image:
    """White ink on black: the digit in a font, its glyph about `height` pixels tall, placed at random."""
    image = Image.new("L", (SIZE, SIZE), 0)
    draw = ImageDraw.Draw(image)
    face = font(height)
    left, top, right, bottom = draw.textbbox((0, 0), str(digit), font=face)
    x = rng.integers(2, max(3, SIZE - (right - left) - 1)) - left
    y = rng.integers(2, max(3, SIZE - (bottom - top) - 1)) - top
    draw.text((x, y), str(digit), fill=255, font=face)
    return image


def stroked(digit: int, height: int, width: int, rng: np.random.Generator) -> Image.Image:
    """White ink on black: the digit as pen strokes `width` pixels wide in a box `height` tall."""
    image = Image.new("L", (SIZE, SIZE), 0)
    draw = ImageDraw.Draw(image)
    box_w = int(height * rng.uniform(0.6, 0.85))
    x0 = rng.integers(2, max(3, SIZE - box_w - 1))
    y0 = rng.integers(2, max(3, SIZE - height - 1))

    def at(u: float, v: float) -> tuple[float, float]:
        jitter = rng.normal(0, 0.02, 2)
        return (x0 + (u + jitter[0]) * box_w, y0 + (v + jitter[1]) * height)

    for stroke in STROKES[digit]:
        if stroke[0] == "ellipse":
            u0, v0, u1, v1 = stroke[1]
            (ax, ay), (bx, by) = at(u0, v0), at(u1, v1)
            draw.ellipse((min(ax, bx), min(ay, by), max(ax, bx), max(ay, by)), outline=255, width=width)
        else:
            draw.line([at(u, v) for u, v in stroke], fill=255, width=width, joint="curve")
    return image


def drawn_digits(seed: int = 2024) -> list[tuple[str, int, Image.Image]]:
    """(file name, digit, image) for 10 digits x (typed in each font at 3 sizes + stroked at 3 widths x 3
    sizes); every other image dark ink on light paper."""
    rng = np.random.default_rng(seed)
    out = []
    for digit in range(10):
        variants: list[tuple[str, Image.Image]] = []
        for style, font in fonts():
            for height in (26, 38, 52):
                variants.append((style, typed(digit, font, height, rng)))
        for width in (2, 4, 6):
            for height in (30, 42, 56):
                variants.append((f"pen{width}", stroked(digit, height, width, rng)))
        for index, (style, image) in enumerate(variants):
            if index % 2:
                image = Image.eval(image, lambda v: 255 - v)  # dark ink on light paper
            out.append((f"{digit}-{style}-{index:03d}.png", digit, image))
    return out


def main() -> None:
    folder = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "examples", "drawn")
    os.makedirs(folder, exist_ok=True)
    for name, _, image in drawn_digits():
        image.save(os.path.join(folder, name), optimize=True)
    print(f"wrote {len(drawn_digits())} images to {folder}")


if __name__ == "__main__":
    main()
