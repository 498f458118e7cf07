"""Encoded images to normalised tensors, exactly as model.json's `preprocess` spec says.

Decoding is the serving half's own; the resize and normalisation are the contract's
(`convserve.contract`), the very functions training ran, so a PNG sent to the server becomes the
tensor the model was trained on: same orientation, bit depth, colour conversion, resize filter,
scale, mean and std.

Every image is checked from its header before any pixel is decoded: its bytes, its format (PNG and
JPEG by default), its pixel count. An image bomb (a few KB that decode to gigabytes) is refused
for what its header claims, in microseconds.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from convserve.contract import PreprocessSpec, normalize, resize_image


class ImageDecodeError(ValueError):
    """Bytes that are not an acceptable, decodable image; the message says which limit or why."""

    def __init__(self, message: str, limit: str = "") -> None:
        super().__init__(message)
        self.limit = limit  # image_bytes, image_format, image_pixels; empty: undecodable


@dataclass(frozen=True)
class ImageLimits:
    formats: tuple[str, ...] = ("PNG", "JPEG")
    max_bytes: int = 16 * 1024 * 1024
    max_pixels: int = 4096 * 4096


def open_checked(data: bytes, limits: ImageLimits) -> Image.Image:
    """Read only the header; raise ImageDecodeError for the wrong format, too many bytes or pixels."""
    if len(data) > limits.max_bytes:
        raise ImageDecodeError(f"{len(data)} bytes; the limit is {limits.max_bytes}", "image_bytes")
    try:
        image = Image.open(io.BytesIO(data), formats=list(limits.formats))
    except UnidentifiedImageError:
        raise ImageDecodeError(f"not a {' or '.join(limits.formats)} image", "image_format") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise ImageDecodeError("not a decodable image (corrupt header)") from None
    width, height = image.size
    if width * height > limits.max_pixels:
        image.close()
        raise ImageDecodeError(f"{width}x{height} pixels; the limit is {limits.max_pixels} pixels", "image_pixels")
    return image


def decode_opened(image: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """An image whose header passed open_checked -> uint8 array (H, W, C). Raises ImageDecodeError."""
    try:
        with image:
            image.load()
            return resize_image(image, spec)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else "corrupt data"
        raise ImageDecodeError(f"not a decodable image ({reason})") from None


def decode_image(data: bytes, spec: PreprocessSpec, limits: ImageLimits = ImageLimits()) -> np.ndarray:
    """Encoded PNG/JPEG bytes -> uint8 array (H, W, C). Raises ImageDecodeError."""
    return decode_opened(open_checked(data, limits), spec)


def decode_all(images: Sequence[Image.Image], spec: PreprocessSpec) -> np.ndarray:
    """Opened images (open_checked) -> the model's float32 input (N, C, H, W)."""
    return normalize(np.stack([decode_opened(image, spec) for image in images]), spec)


def preprocess_encoded(images: list[bytes], spec: PreprocessSpec, limits: ImageLimits = ImageLimits()) -> np.ndarray:
    """A list of encoded images -> the model's float32 input (N, C, H, W)."""
    return decode_all([open_checked(data, limits) for data in images], spec)


def blank_png(spec: PreprocessSpec) -> bytes:
    """A black PNG of the spec's size and mode (warms up the decoder at model load)."""
    buffer = io.BytesIO()
    Image.new(spec.mode, (spec.width, spec.height)).save(buffer, format="PNG")
    return buffer.getvalue()


def preprocessed_png(data: bytes, spec: PreprocessSpec, limits: ImageLimits) -> bytes:
    """An image as its model sees it, before the mean and std: a PNG of the decoded pixels (the page's
    preview of what inference decodes)."""
    pixels = decode_image(data, spec, limits)  # uint8 (H, W, C)
    buffer = io.BytesIO()
    Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels).save(buffer, format="PNG")
    return buffer.getvalue()
