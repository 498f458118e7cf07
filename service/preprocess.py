"""Encoded images to normalised tensors, exactly as model.json's `preprocess` spec says.

Decoding is the serving half's own; the resize and normalisation are the contract's
(`convserve.contract`), the very functions training ran, so a PNG sent to the server becomes the
tensor the model was trained on: same colour conversion, same resize filter, same scale, mean, std.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from convserve.contract import PreprocessSpec, normalize, resize_image


class ImageDecodeError(ValueError):
    """Bytes that are not a decodable image."""


def decode_image(data: bytes, spec: PreprocessSpec) -> np.ndarray:
    """Encoded PNG/JPEG bytes -> uint8 array (H, W, C). Raises ImageDecodeError."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return resize_image(image, spec)
    except UnidentifiedImageError:
        raise ImageDecodeError("not a decodable image (unknown format)") from None
    except Image.DecompressionBombError:
        raise ImageDecodeError("image too large to decode") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageDecodeError(
            f"not a decodable image ({str(exc).splitlines()[0] if str(exc) else 'corrupt'})"
        ) from None


def preprocess_encoded(images: list[bytes], spec: PreprocessSpec) -> np.ndarray:
    """A list of encoded images -> the model's float32 input (N, C, H, W)."""
    decoded = np.stack([decode_image(data, spec) for data in images])
    return normalize(decoded, spec)


def blank_png(spec: PreprocessSpec) -> bytes:
    """A black PNG of the spec's size and mode (warms up the decoder at model load)."""
    buffer = io.BytesIO()
    Image.new(spec.mode, (spec.width, spec.height)).save(buffer, format="PNG")
    return buffer.getvalue()
