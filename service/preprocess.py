"""Images to normalised tensors, exactly as model.json's `preprocess` spec says.

Training (models/data) and serving both go through these functions, so a PNG sent to the server
becomes the very tensor the model was trained on: same colour conversion, same resize filter, same
scale, mean and std.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


class ImageDecodeError(ValueError):
    """Bytes that are not a decodable image."""


@dataclass(frozen=True)
class PreprocessSpec:
    """How raw images become the model's input: decode, convert, resize, scale to [0, 1], normalise."""
    height: int
    width: int
    channels: int                 # 1: greyscale ("L"), 3: RGB, in that channel order
    resize: str = "bilinear"      # PIL filter name
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    scale: float = 1.0 / 255.0    # uint8 -> [0, 1] before the mean and std
    layout: str = "NCHW"

    def __post_init__(self):
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, not {self.channels}")
        if self.resize not in _RESAMPLE:
            raise ValueError(f"resize must be one of {sorted(_RESAMPLE)}, not {self.resize!r}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError("mean and std need one value per channel")

    @property
    def mode(self) -> str:
        return "L" if self.channels == 1 else "RGB"

    def to_dict(self) -> dict:
        data = asdict(self)
        data.update(mean=list(self.mean), std=list(self.std), color_mode=self.mode,
                    channel_order="L" if self.channels == 1 else "RGB")
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "PreprocessSpec":
        return cls(height=int(data["height"]), width=int(data["width"]), channels=int(data["channels"]),
                   resize=data.get("resize", "bilinear"), mean=tuple(data["mean"]), std=tuple(data["std"]),
                   scale=float(data.get("scale", 1 / 255)), layout=data.get("layout", "NCHW"))


def resize_image(image: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """A PIL image -> uint8 array (H, W, C) at the spec's size and colour mode."""
    if image.mode != spec.mode:
        image = image.convert(spec.mode)
    if image.size != (spec.width, spec.height):
        image = image.resize((spec.width, spec.height), _RESAMPLE[spec.resize])
    array = np.asarray(image, dtype=np.uint8)
    return array[:, :, None] if array.ndim == 2 else array


def decode_image(data: bytes, spec: PreprocessSpec) -> np.ndarray:
    """Encoded PNG/JPEG bytes -> uint8 array (H, W, C). Raises ImageDecodeError."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return resize_image(image, spec)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(f"not a decodable image ({type(exc).__name__}: {exc})".splitlines()[0]) from None


def normalize(images: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """uint8 (N, H, W, C) -> float32 (N, C, H, W): scale, subtract mean, divide by std."""
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(spec.std, dtype=np.float32).reshape(1, -1, 1, 1)
    batch = images.transpose(0, 3, 1, 2).astype(np.float32) * np.float32(spec.scale)
    return np.ascontiguousarray((batch - mean) / std)


def preprocess_encoded(images: list[bytes], spec: PreprocessSpec) -> np.ndarray:
    """A list of encoded images -> the model's float32 input (N, C, H, W)."""
    decoded = np.stack([decode_image(data, spec) for data in images])
    return normalize(decoded, spec)
