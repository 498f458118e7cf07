"""Feature maps and filters as pictures: numpy and Pillow only, so a client without torch draws them.

A grid puts one tile per channel, row by row, `cols = ceil(sqrt(C))` tiles wide, with a border of
BORDER pixels (colour BORDER_VALUE) around and between the tiles. Each tile is normalised to its own
range (its minimum black, its maximum white; a constant channel is black) and scaled up by a whole
factor (nearest neighbour) so that small maps stay visible. Cells past the last channel stay border.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

BORDER = 1
BORDER_VALUE = 128  # mid grey: tells the tiles apart whether they are dark or bright
MIN_TILE = 32  # pixels: a tile smaller than this is scaled up
FILTER_GAP = 4  # pixels between kernels: 3x3 kernels side by side with 1 px between read as one noise field
FILTER_GAP_VALUE = 255  # white, the panel's paper, with a dark 1 px frame round each kernel: a grey gap
FILTER_FRAME_VALUE = 64  # alone looks like one more weight, a white one merges with white weights


@dataclass(frozen=True)
class GridLayout:
    channels: int
    cols: int
    rows: int
    tile_height: int  # after scaling
    tile_width: int
    border: int = BORDER

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the whole grid."""
        return (
            self.rows * self.tile_height + (self.rows + 1) * self.border,
            self.cols * self.tile_width + (self.cols + 1) * self.border,
        )

    def tile_box(self, index: int) -> tuple[int, int, int, int]:
        """(top, left, bottom, right) of tile `index`."""
        row, col = divmod(index, self.cols)
        top = self.border + row * (self.tile_height + self.border)
        left = self.border + col * (self.tile_width + self.border)
        return top, left, top + self.tile_height, left + self.tile_width


def layout(channels: int, height: int, width: int, min_tile: int = MIN_TILE, border: int = BORDER) -> GridLayout:
    cols = math.ceil(math.sqrt(channels))
    rows = math.ceil(channels / cols)
    scale = max(1, math.ceil(min_tile / max(height, width)))
    return GridLayout(channels, cols, rows, height * scale, width * scale, border)


def to_uint8(values: np.ndarray, axes: tuple[int, ...] | None = None) -> np.ndarray:
    """Each slice normalised to its own range over `axes` (None: the whole array) -> uint8."""
    values = values.astype(np.float32, copy=False)
    low = values.min(axis=axes, keepdims=True)
    span = values.max(axis=axes, keepdims=True) - low
    scaled = np.where(span > 0, (values - low) / np.where(span > 0, span, 1), 0.0)
    return np.round(scaled * 255).astype(np.uint8)


def grid(fmap: np.ndarray, min_tile: int = MIN_TILE) -> tuple[np.ndarray, GridLayout]:
    """(C, H, W) feature map of one image -> (uint8 greyscale grid (H', W'), its layout)."""
    if fmap.ndim != 3:
        raise ValueError(f"a feature map of one image is (C, H, W), not {fmap.shape}")
    channels, height, width = fmap.shape
    plan = layout(channels, height, width, min_tile)
    tiles = to_uint8(fmap, axes=(1, 2))
    scale = plan.tile_height // height
    canvas = np.full(plan.size, BORDER_VALUE, dtype=np.uint8)
    for index in range(channels):
        top, left, bottom, right = plan.tile_box(index)
        canvas[top:bottom, left:right] = np.kron(tiles[index], np.ones((scale, scale), dtype=np.uint8))
    return canvas, plan


def filter_grid(weights: np.ndarray, min_tile: int = MIN_TILE) -> tuple[np.ndarray, GridLayout]:
    """(out, in, kh, kw) kernels -> one tile per filter. With 3 input channels a tile is the kernel
    as an RGB picture (normalised per filter over its three channels, as the lecture shows AlexNet's
    first layer); otherwise greyscale, the mean over the input channels, normalised per filter."""
    if weights.ndim != 4:
        raise ValueError(f"filters are (out, in, kh, kw), not {weights.shape}")
    out, inputs, kh, kw = weights.shape
    plan = layout(out, kh, kw, min_tile, border=FILTER_GAP)
    scale = plan.tile_height // kh
    colour = inputs == 3
    tiles = to_uint8(weights, axes=(1, 2, 3)) if colour else to_uint8(weights.mean(axis=1), axes=(1, 2))
    shape = (*plan.size, 3) if colour else plan.size
    canvas = np.full(shape, FILTER_GAP_VALUE, dtype=np.uint8)
    for index in range(out):
        top, left, bottom, right = plan.tile_box(index)
        canvas[top - 1 : bottom + 1, left - 1 : right + 1] = FILTER_FRAME_VALUE
        tile = tiles[index].transpose(1, 2, 0) if colour else tiles[index]
        block = np.ones((scale, scale, 1) if colour else (scale, scale), dtype=np.uint8)
        canvas[top:bottom, left:right] = np.kron(tile, block)
    return canvas, plan


def enlarge(image: np.ndarray, min_side: int = 128) -> np.ndarray:
    """An (H, W) or (H, W, C) uint8 image scaled up by a whole factor (nearest) to at least min_side."""
    scale = max(1, math.ceil(min_side / max(image.shape[0], image.shape[1])))
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    block = np.ones((scale, scale) if image.ndim == 2 else (scale, scale, 1), dtype=np.uint8)
    return np.kron(image, block)


def save_png(image: np.ndarray, path: str) -> None:
    Image.fromarray(image).save(path, format="PNG")


def panel(title_lines: list[str], pictures: list[tuple[str, np.ndarray]], gap: int = 12) -> np.ndarray:
    """Pictures side by side under a title (and each under its caption), on white: RGB uint8."""
    font = _font()
    font_height = 18
    rgb = [(caption, np.stack([p] * 3, axis=-1) if p.ndim == 2 else p) for caption, p in pictures]
    head = gap + font_height * len(title_lines) + gap
    height = head + font_height + max(p.shape[0] for _, p in rgb) + gap
    width = gap + sum(p.shape[1] + gap for _, p in rgb)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    width = max(width, gap + math.ceil(max(measure.textlength(line, font=font) for line in title_lines)) + gap)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(title_lines):
        draw.text((gap, gap + i * font_height), line, fill="black", font=font)
    left = gap
    for caption, picture in rgb:
        draw.text((left, head), caption, fill="black", font=font)
        canvas.paste(Image.fromarray(picture), (left, head + font_height))
        left += picture.shape[1] + gap
    return np.asarray(canvas)


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's own scalable font (FreeType, Pillow 10.1+): proportional, with real spaces, where the
    old bitmap default runs words together ("digitsconv3")."""
    try:
        return ImageFont.load_default(13)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType
        return ImageFont.load_default()
