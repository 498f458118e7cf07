"""The contract between the halves: the model repository's layout, model.json, the preprocessing spec.

The training half writes what this module describes and the serving half reads it; neither imports
the other. Pure Python with numpy and Pillow (no torch, no onnxruntime), so both containers have it.

    REPO/<name>/<version>/model.onnx     the graph: input `input` (N, C, H, W) FP32, outputs below
    REPO/<name>/<version>/model.json     a ModelCard: labels, preprocessing, outputs, provenance, sha256

A name is letters, digits, '_', '-' and '.', not starting with '.' and without '..' (it stays inside
the repository); a version is a folder named by a positive integer in ASCII digits, highest newest.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import numpy as np
from PIL import Image, ImageOps

MODEL_FILE = "model.onnx"
CARD_FILE = "model.json"
# the convolution kernels behind the feature maps (numpy .npz, one FP32 array per feature-map name,
# (out, in, kh, kw)), for pictures of what each layer looks for; optional
FILTERS_FILE = "filters.npz"
INPUT_NAME = "input"  # the graph's one input: an already normalised FP32 batch
PLATFORM = "onnxruntime_onnx"
IMAGE_INPUT_NAME = "image"  # the server's second input: encoded PNG/JPEG, decoded as `preprocess` says
DEFAULT_OUTPUTS = ("logits", "probabilities")  # what a request that names no outputs gets back

_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_VERSION_PATTERN = re.compile(r"^[1-9][0-9]{0,17}$")  # ASCII only: str.isdigit() accepts '²' and '١'


class ContractError(ValueError):
    """A name, a version or a model.json that breaks the contract; the message says how."""


# ---- the repository's layout -------------------------------------------------------------------


def is_valid_name(name: str) -> bool:
    """A model name that stays inside the repository: letters, digits, '_', '-', '.'; no '..'."""
    return bool(name) and _NAME_PATTERN.match(name) is not None and ".." not in name


def check_name(name: str) -> str:
    """`name` itself when is_valid_name, else ContractError."""
    if not is_valid_name(name):
        raise ContractError(f"model name {name!r} must be letters, digits, '_', '-' or '.', not starting with '.'")
    return name


def parse_version(text: str) -> Optional[int]:
    """A version folder's (or a request's) version: '3' -> 3; anything but ASCII digits from 1 -> None."""
    return int(text) if _VERSION_PATTERN.match(text) else None


def versions(model_dir: str) -> list[int]:
    """The integer versions present under REPO/NAME, ascending (other entries are ignored)."""
    try:
        entries = os.listdir(model_dir)
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = ((parse_version(entry), entry) for entry in entries)
    return sorted(v for v, entry in found if v is not None and os.path.isdir(os.path.join(model_dir, entry)))


def model_names(repository: str) -> list[str]:
    """The model folders in a repository, sorted; entries that are not valid names are ignored."""
    try:
        entries = os.listdir(repository)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(n for n in entries if is_valid_name(n) and os.path.isdir(os.path.join(repository, n)))


def ignored_entries(repository: str) -> list[str]:
    """Folders a scan skips (relative paths): model folders with invalid names and version folders
    that are not ASCII digits. Hidden ones (an exporter's `.tmp-…` staging) are skipped silently."""
    try:
        names = os.listdir(repository)
    except (FileNotFoundError, NotADirectoryError):
        return []
    ignored = []
    for name in sorted(names):
        path = os.path.join(repository, name)
        if name.startswith(".") or not os.path.isdir(path):
            continue
        if not is_valid_name(name):
            ignored.append(name)
            continue
        try:
            entries = sorted(os.listdir(path))
        except OSError:
            continue
        for entry in entries:
            if not entry.startswith(".") and parse_version(entry) is None and os.path.isdir(os.path.join(path, entry)):
                ignored.append(os.path.join(name, entry))
    return ignored


def version_dir(repository: str, name: str, version: int) -> str:
    return os.path.join(repository, check_name(name), str(version))


# ---- preprocessing: the same pixels in training and in serving ------------------------------------

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


@dataclass(frozen=True)
class InkSpec:
    """How a drawing is made to look like a model's training data before the resize, for models
    trained on strokes filling the frame (scikit-learn's digits, MNIST): the same steps run on the
    training images, so training and serving see one distribution.

    1. polarity, read from the border: paper darker or lighter than the strokes; a drawing whose
       paper is the opposite of the training data's is inverted;
    2. paper to black and the brightest ink to white (a thin or grey stroke counts as a full one);
    3. the ink's bounding box, squared about its centre and widened by `margin` on each side (the
       training data's own margin, measured at training), is cropped;
    4. that square is area-averaged to `native` (H, W), the training data's own size, so strokes
       blur as the training data's did, then stretched to full range again.
    """

    paper: str = "dark"  # the training data's: "dark" (light strokes on dark) or "light"
    margin: float = 0.0  # share of the side left empty around the ink's box, per side
    native: tuple[int, int] = (0, 0)  # the training images' own (H, W); (0, 0): no such step

    def __post_init__(self) -> None:
        if self.paper not in ("dark", "light"):
            raise ContractError(f"ink paper must be dark or light, not {self.paper!r}")
        if not 0.0 <= self.margin < 0.5:
            raise ContractError(f"ink margin must be in [0, 0.5), not {self.margin}")

    @classmethod
    def from_dict(cls, data: dict) -> InkSpec:
        native = data.get("native") or (0, 0)
        return cls(
            paper=str(data.get("paper", "dark")),
            margin=float(data.get("margin", 0.0)),
            native=(int(native[0]), int(native[1])),
        )


# Ink fainter than this above the paper (of 255) is no drawing: the image is left as it is.
_FAINTEST_INK = 24


def _stretched(grey: np.ndarray, paper: float) -> np.ndarray:
    """Paper -> 0, the brightest ink -> 255 (float32 in, uint8 out)."""
    peak = float(grey.max())
    scale = 255.0 / max(peak - paper, 1.0)
    return np.clip(np.rint((grey - paper) * scale), 0, 255).astype(np.uint8)


def fit_ink(image: Image.Image, ink: InkSpec) -> Image.Image:
    """A drawing as the training data looks (see InkSpec): greyscale, paper as the training data's,
    the ink cropped with the training data's margin, at its native size. An image with no visible
    ink comes back unchanged."""
    grey = np.asarray(image.convert("L"), dtype=np.float32)
    paper = float(np.median(np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])))  # the border's
    if paper > 127.5:  # light paper: work on dark paper, light strokes
        grey, paper = 255.0 - grey, 255.0 - paper
    peak = float(grey.max())
    if peak - paper < _FAINTEST_INK:
        return image
    ink_mask = grey > paper + 0.5 * (peak - paper)
    rows, cols = np.nonzero(ink_mask.any(axis=1))[0], np.nonzero(ink_mask.any(axis=0))[0]
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    half = max(bottom - top, right - left) / (1.0 - 2.0 * ink.margin) / 2.0
    centre_y, centre_x = (top + bottom) / 2.0, (left + right) / 2.0
    x0, y0 = round(float(centre_x) - half), round(float(centre_y) - half)
    side = max(1, round(2.0 * half))
    out = Image.new("L", (side, side), 0)  # what lies beyond the drawing is paper
    out.paste(Image.fromarray(_stretched(grey, paper), mode="L"), (-x0, -y0))
    if ink.native != (0, 0):
        out = out.resize((ink.native[1], ink.native[0]), Image.Resampling.BOX)
        out = Image.fromarray(_stretched(np.asarray(out, dtype=np.float32), 0.0), mode="L")
    if ink.paper == "light":
        out = ImageOps.invert(out)
    return out.convert(image.mode) if image.mode != "L" else out


@dataclass(frozen=True)
class PreprocessSpec:
    """How raw images become the model's input: (fit the ink,) convert, resize, scale to [0, 1],
    normalise."""

    height: int
    width: int
    channels: int  # 1: greyscale ("L"), 3: RGB, in that channel order
    resize: str = "bilinear"  # PIL filter name
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    scale: float = 1.0 / 255.0  # uint8 -> [0, 1] before the mean and std
    layout: str = "NCHW"
    ink: Optional[InkSpec] = None  # a drawing made to look like the training data first (InkSpec)

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ContractError(f"channels must be 1 or 3, not {self.channels}")
        if self.resize not in _RESAMPLE:
            raise ContractError(f"resize must be one of {sorted(_RESAMPLE)}, not {self.resize!r}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ContractError("mean and std need one value per channel")
        if self.height < 1 or self.width < 1:
            raise ContractError("height and width must be positive")

    @property
    def mode(self) -> str:
        """PIL's colour mode for this spec."""
        return "L" if self.channels == 1 else "RGB"

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image as the model takes it."""
        return (self.channels, self.height, self.width)

    def to_dict(self) -> dict:
        data = asdict(self)
        data.update(
            mean=list(self.mean), std=list(self.std), color_mode=self.mode, channel_order=self.mode, decoding=DECODING
        )
        return data

    @classmethod
    def from_dict(cls, data: dict) -> PreprocessSpec:
        return cls(
            height=int(data["height"]),
            width=int(data["width"]),
            channels=int(data["channels"]),
            resize=data.get("resize", "bilinear"),
            mean=tuple(data["mean"]),
            std=tuple(data["std"]),
            scale=float(data.get("scale", 1 / 255)),
            layout=data.get("layout", "NCHW"),
            ink=InkSpec.from_dict(data["ink"]) if data.get("ink") else None,
        )


# What happens to an image before the spec's resize, recorded in model.json with the spec.
DECODING = {
    "exif_orientation": "applied (a photo is classified upright, as it is shown)",
    "16_bit": "scaled to 8 bits (value >> 8), not clipped",
    "palette": "expanded to its colours",
    "alpha": "dropped (the colour channels are kept as stored)",
}
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def upright_8bit(image: Image.Image) -> Image.Image:
    """An image as it is shown, at 8 bits per channel: EXIF orientation applied, 16-bit greyscale
    scaled down (PIL's own conversion would clip every value above 255 to white)."""
    image = ImageOps.exif_transpose(image) or image
    if image.mode in _WIDE_MODES:
        wide = np.asarray(image).astype(np.uint32)
        image = Image.fromarray((np.clip(wide, 0, 65535) >> 8).astype(np.uint8), mode="L")
    elif image.mode in ("P", "PA"):
        image = image.convert("RGBA")
    return image


def resize_image(image: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """A PIL image -> uint8 array (H, W, C) at the spec's size and colour mode (after upright_8bit)."""
    image = upright_8bit(image)
    if image.mode != spec.mode:
        image = image.convert(spec.mode)
    if spec.ink is not None:
        image = fit_ink(image, spec.ink)
    if image.size != (spec.width, spec.height):
        image = image.resize((spec.width, spec.height), _RESAMPLE[spec.resize])
    array = np.asarray(image, dtype=np.uint8)
    return array[:, :, None] if array.ndim == 2 else array


def normalize(images: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """uint8 (N, H, W, C) -> float32 (N, C, H, W): scale, subtract mean, divide by std."""
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(spec.std, dtype=np.float32).reshape(1, -1, 1, 1)
    batch = images.transpose(0, 3, 1, 2).astype(np.float32) * np.float32(spec.scale)
    return np.ascontiguousarray((batch - mean) / std)


# ---- model.json ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    """One output of the graph: name, V2 datatype, shape with -1 for the batch."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass
class ModelCard:
    """model.json: everything the server needs to serve a version, and where the version came from."""

    name: str
    version: int
    labels: list[str]
    preprocess: PreprocessSpec
    outputs: list[TensorSpec]  # logits, probabilities, then one per feature map
    feature_maps: list[dict]  # {"name": "conv1", "layer": "features.1", "shape": [-1, C, H, W]}
    sha256: str  # of model.onnx
    onnx_bytes: int = 0
    external_data: dict[str, str] = field(default_factory=dict)  # file beside model.onnx -> its sha256
    arithmetic: dict = field(default_factory=dict)  # the arithmetic table (convserve.models.arithmetic)
    training: dict = field(default_factory=dict)  # provenance: dataset, epochs, accuracy, seed, date
    export: dict = field(default_factory=dict)  # opset, parity, versions
    # the model's own interface (an imported model keeps its names; convserve's exports use these)
    input_name: str = INPUT_NAME  # its FP32 (N, C, H, W) input
    default_outputs: tuple[str, ...] = DEFAULT_OUTPUTS  # what a request that names no outputs gets
    image_input: bool = True  # encoded images are accepted (`image`): its preprocessing is known

    @property
    def feature_map_names(self) -> list[str]:
        return [f["name"] for f in self.feature_maps]

    @property
    def precision(self) -> str:
        """fp32, fp16 or int8, as exported (a card from before precisions were recorded: fp32)."""
        return str(self.export.get("precision", "fp32"))

    def to_dict(self) -> dict:
        c, h, w = self.preprocess.input_shape
        return {
            "name": self.name,
            "version": self.version,
            "platform": PLATFORM,
            "labels": self.labels,
            "preprocess": self.preprocess.to_dict(),
            "inputs": [{"name": self.input_name, "datatype": "FP32", "shape": [-1, c, h, w]}],
            "default_outputs": list(self.default_outputs),
            "image_input": self.image_input,
            "outputs": [{"name": o.name, "datatype": o.datatype, "shape": list(o.shape)} for o in self.outputs],
            "feature_maps": self.feature_maps,
            "arithmetic": self.arithmetic,
            "training": self.training,
            "export": self.export,
            "onnx": {
                "file": MODEL_FILE,
                "sha256": self.sha256,
                "bytes": self.onnx_bytes,
                **({"external_data": self.external_data} if self.external_data else {}),
            },
        }

    def to_json(self) -> bytes:
        return (json.dumps(self.to_dict(), indent=2) + "\n").encode()

    @classmethod
    def from_dict(cls, data: Any) -> ModelCard:
        """Parse and check a model.json document; ContractError says what is wrong."""
        if not isinstance(data, dict):
            raise ContractError("model.json is not an object")
        for key in ("labels", "preprocess", "outputs", "onnx"):
            if key not in data:
                raise ContractError(f"model.json has no {key!r}")
        try:
            card = cls(
                name=str(data.get("name", "")),
                version=int(data.get("version", 0)),
                labels=[str(label) for label in data["labels"]],
                preprocess=PreprocessSpec.from_dict(data["preprocess"]),
                outputs=[
                    TensorSpec(str(o["name"]), str(o["datatype"]), tuple(int(d) for d in o["shape"]))
                    for o in data["outputs"]
                ],
                feature_maps=_checked_feature_maps(data.get("feature_maps", [])),
                sha256=str(data["onnx"]["sha256"]),
                onnx_bytes=int(data["onnx"].get("bytes", 0)),
                external_data={str(k): str(v) for k, v in dict(data["onnx"].get("external_data") or {}).items()},
                arithmetic=_checked_arithmetic(data.get("arithmetic")),
                training=dict(data.get("training") or {}),
                export=dict(data.get("export") or {}),
                input_name=_input_name(data.get("inputs")),
                default_outputs=tuple(str(n) for n in data.get("default_outputs") or DEFAULT_OUTPUTS),
                image_input=bool(data.get("image_input", True)),
            )
        except ContractError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise ContractError(f"model.json is malformed: {exc!s}") from None
        missing = [n for n in card.default_outputs if n not in {o.name for o in card.outputs}]
        if missing:
            raise ContractError(f"model.json's default_outputs name outputs it does not have: {missing}")
        return card

    @classmethod
    def read(cls, folder: str) -> ModelCard:
        """REPO/NAME/VERSION/model.json as a ModelCard; ContractError (or OSError) when it cannot be."""
        try:
            with open(os.path.join(folder, CARD_FILE)) as handle:
                data = json.load(handle)
        except json.JSONDecodeError as exc:
            raise ContractError(f"model.json is not valid JSON ({exc.msg})") from None
        return cls.from_dict(data)


_INT64 = 1 << 63


def _input_name(inputs: Any) -> str:
    """The model's input name from model.json's `inputs` (a card without them: `input`)."""
    if not inputs:
        return INPUT_NAME
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise ContractError("model.json's inputs must be one object with a name")
    if not isinstance(inputs[0].get("name"), str):
        raise ContractError("model.json's inputs must be one object with a name")
    name = inputs[0]["name"]
    if not name or name == IMAGE_INPUT_NAME:
        raise ContractError(f"model.json's input may not be named {name!r}")
    return name


def _is_int(value: Any, low: int = -_INT64) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value < _INT64


def _checked_feature_maps(entries: Any) -> list[dict]:
    if not isinstance(entries, list) or not all(
        isinstance(e, dict) and isinstance(e.get("name"), str) for e in entries
    ):
        raise ContractError("model.json's feature_maps must be a list of objects with a name")
    return entries


def _checked_arithmetic(table: Any) -> dict:
    """The card's arithmetic table (convserve.models.arithmetic writes it), checked field by field
    against what DescribeModel sends, so a malformed one refuses the version at load instead of
    failing every DescribeModel."""
    if not table:
        return {}

    def fail(what: str) -> ContractError:
        return ContractError(f"model.json's arithmetic is malformed: {what}")

    if not isinstance(table, dict) or not isinstance(table.get("layers"), list):
        raise fail("expected an object with a list of layers")
    for key in ("total_params", "total_macs"):
        if not _is_int(table.get(key), 0):
            raise fail(f"{key} must be a non-negative integer")
    for index, layer in enumerate(table["layers"]):
        if not isinstance(layer, dict):
            raise fail(f"layer {index} is not an object")
        for key in ("name", "kind", "op"):
            if not isinstance(layer.get(key), str):
                raise fail(f"layer {index}: {key} must be a string")
        if not isinstance(layer.get("detail", ""), str):
            raise fail(f"layer {index}: detail must be a string")
        for key in ("params", "macs", "activations"):
            if not _is_int(layer.get(key), 0):
                raise fail(f"layer {index}: {key} must be a non-negative integer")
        for key, optional in (
            ("input_shape", False),
            ("output_shape", False),
            ("receptive_field", True),
            ("jump", True),
        ):
            value = layer.get(key)
            if value is None and optional:
                continue
            if not isinstance(value, list) or not all(_is_int(v) for v in value):
                raise fail(f"layer {index}: {key} must be a list of integers")
    return table
