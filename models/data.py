"""Datasets for training: the built-in digits, image folders, CIFAR-10 and (Fashion-)MNIST files.

Every source becomes uint8 images (N, H, W, C) at the model's input size, resized with
`convserve.contract` (the very code the server runs on a client's PNG), and integer labels.
Normalisation statistics come from the training split and travel in model.json.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from convserve.contract import InkSpec, PreprocessSpec, normalize, resize_image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
FASHION_LABELS = [
    "t-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
]
DATASET_KINDS = ("digits", "imagefolder", "cifar10", "mnist", "fashion-mnist")


class DataError(ValueError):
    """A dataset that cannot be read: the message says which file and why."""


@dataclass
class Dataset:
    name: str  # the --dataset argument
    labels: list[str]
    train_images: np.ndarray  # uint8 (N, H, W, C)
    train_labels: np.ndarray  # int64 (N,)
    test_images: np.ndarray
    test_labels: np.ndarray
    spec: PreprocessSpec  # with the training split's mean and std
    typed: int = 0  # of the training images, how many are typed digits (digits only; see typed_digits)

    def train_inputs(self) -> np.ndarray:
        return normalize(self.train_images, self.spec)  # float32 (N, C, H, W)

    def test_inputs(self) -> np.ndarray:
        return normalize(self.test_images, self.spec)


def seeded_split(count: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Index arrays (train, test): a fixed permutation for a given seed, stratification left aside."""
    order = np.random.default_rng(seed).permutation(count)
    n_test = max(1, round(count * test_fraction))
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def load_dataset(
    spec: str,
    *,
    size: tuple[int, int] = (32, 32),
    channels: int | None = None,
    seed: int = 0,
    test_fraction: float = 0.2,
    resize: str = "bilinear",
    typed_digits: bool = True,
) -> Dataset:
    """Read `digits`, `imagefolder:PATH`, `cifar10:PATH`, `mnist:PATH` or `fashion-mnist:PATH`.

    `size` is (H, W) of the model input; `channels` forces 1 or 3 (default: the source's own);
    `typed_digits` adds typed digits to the digits' training split (see typed_digits()).
    """
    kind, _, path = spec.partition(":")
    if kind not in DATASET_KINDS:
        raise DataError(
            f"unknown dataset {spec!r}; use digits, imagefolder:PATH, cifar10:PATH, mnist:PATH or fashion-mnist:PATH"
        )
    if kind != "digits":
        if not path:
            raise DataError(f"{kind} needs a folder: --dataset {kind}:PATH")
        if not os.path.isdir(path):
            raise DataError(f"dataset folder {path!r} does not exist")
    typed = 0
    if kind == "digits":
        labels, (x_train, y_train), (x_test, y_test), typed = _digits(seed, test_fraction, typed_digits)
    elif kind == "imagefolder":
        labels, (x_train, y_train), (x_test, y_test) = _image_folder(path, seed, test_fraction)
    elif kind == "cifar10":
        labels, (x_train, y_train), (x_test, y_test) = _cifar10(path)
    else:
        labels, (x_train, y_train), (x_test, y_test) = _mnist(path, fashion=kind == "fashion-mnist")
    if len(x_train) == 0 or len(x_test) == 0:
        raise DataError(f"dataset {spec!r} has no images in its train or test split")
    source_channels = x_train[0].shape[-1] if isinstance(x_train, np.ndarray) else _channels_of(x_train)
    channels = channels or source_channels
    # handwritten digits: a user's drawing is made to look like them, and so are they (InkSpec)
    ink = ink_of(x_train) if kind in ("digits", "mnist") else None
    provisional = PreprocessSpec(size[0], size[1], channels, resize, (0.0,) * channels, (1.0,) * channels, ink=ink)
    train = _resize_all(x_train, provisional)
    test = _resize_all(x_test, provisional)
    # mean and std per channel over the training split, in the [0, 1] scale
    scaled = train.astype(np.float64) * provisional.scale
    mean = tuple(float(m) for m in scaled.mean(axis=(0, 1, 2)))
    std = tuple(float(max(s, 1e-6)) for s in scaled.std(axis=(0, 1, 2)))
    final = PreprocessSpec(size[0], size[1], channels, resize, mean, std, ink=ink)
    return Dataset(
        spec,
        labels,
        train,
        np.asarray(y_train, dtype=np.int64),
        test,
        np.asarray(y_test, dtype=np.int64),
        final,
        typed,
    )


def ink_of(images: np.ndarray) -> InkSpec:
    """The InkSpec of a set of light-on-dark drawings, uint8 (N, H, W, 1): their size, and the margin
    their ink's bounding box leaves (the median over the set; half the peak is ink)."""
    peaks = images.max(axis=(1, 2, 3), keepdims=True).astype(np.float32)
    ink = images > 0.5 * peaks  # (N, H, W, 1)
    height, width = images.shape[1:3]
    rows, cols = ink.any(axis=(2, 3)), ink.any(axis=(1, 3))  # (N, H), (N, W)
    extent_y = height - rows.argmax(axis=1) - rows[:, ::-1].argmax(axis=1)
    extent_x = width - cols.argmax(axis=1) - cols[:, ::-1].argmax(axis=1)
    side = np.maximum(extent_y / height, extent_x / width)
    margin = max(0.0, float(1.0 - np.median(side)) / 2.0)
    return InkSpec(paper="dark", margin=round(margin, 4), native=(int(height), int(width)))


def _channels_of(images) -> int:
    return 1 if all(img.mode in ("L", "1", "I;16", "I") for img in images) else 3


def _resize_all(images, spec: PreprocessSpec) -> np.ndarray:
    """uint8 arrays (N, h, w, c) or PIL images -> uint8 (N, H, W, C) at the spec's size and mode."""
    out = np.empty((len(images), spec.height, spec.width, spec.channels), dtype=np.uint8)
    for i, image in enumerate(images):
        if isinstance(image, np.ndarray):
            image = Image.fromarray(image[:, :, 0] if image.shape[-1] == 1 else image)
        out[i] = resize_image(image, spec)
    return out


def digits_as_uint8() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 handwritten digits: uint8 (N, 8, 8, 1) scaled from 0..16 to 0..255, labels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, :, :, None]
    return images, bunch.target.astype(np.int64)


def _digits(seed: int, test_fraction: float, typed: bool):
    """As the other readers, and how many typed digits joined the training split."""
    images, targets = digits_as_uint8()
    train, test = seeded_split(len(images), test_fraction, seed)
    train_images, train_labels = images[train], targets[train]
    extra_images, extra_labels = typed_digits() if typed else (train_images[:0], train_labels[:0])
    train_images = np.concatenate([train_images, extra_images])
    train_labels = np.concatenate([train_labels, extra_labels])
    labels = [str(d) for d in range(10)]
    return labels, (train_images, train_labels), (images[test], targets[test]), len(extra_images)


# DejaVu's faces that scripts/make_drawn_digits.py (the drawn-digits check) does not type in
TYPED_FACES = [
    "DejaVuSans-Oblique",
    "DejaVuSans-BoldOblique",
    "DejaVuSans-ExtraLight",
    "DejaVuSansCondensed",
    "DejaVuSansCondensed-Bold",
    "DejaVuSansCondensed-Oblique",
    "DejaVuSansCondensed-BoldOblique",
    "DejaVuSansMono-Bold",
    "DejaVuSansMono-Oblique",
    "DejaVuSansMono-BoldOblique",
    "DejaVuSerif-Bold",
    "DejaVuSerif-Italic",
    "DejaVuSerif-BoldItalic",
    "DejaVuSerifCondensed",
    "DejaVuSerifCondensed-Bold",
    "DejaVuSerifCondensed-Italic",
    "DejaVuSerifCondensed-BoldItalic",
]
FONT_FOLDER = "/usr/share/fonts/truetype/dejavu"


def typed_digits(folder: str = FONT_FOLDER) -> tuple[np.ndarray, np.ndarray]:
    """Digits typed in the DejaVu faces found in `folder` (TYPED_FACES), white on black, through the
    ink step at scikit-learn's 8x8: uint8 (N, 8, 8, 1) and labels. Typed digits teach the model the
    printed shapes (a '1' with a foot, a '7' with a serif) that 1,797 handwritten ones lack.
    None found: empty arrays."""
    from PIL import ImageDraw, ImageFont

    from convserve.contract import fit_ink

    ink = InkSpec(paper="dark", margin=0.0, native=(8, 8))
    images, labels = [], []
    for face in TYPED_FACES:
        path = os.path.join(folder, face + ".ttf")
        if not os.path.exists(path):
            continue
        for size in (32, 48):
            font = ImageFont.truetype(path, size)
            for digit in range(10):
                canvas = Image.new("L", (64, 64), 0)
                ImageDraw.Draw(canvas).text((8, 0), str(digit), fill=255, font=font)
                images.append(np.asarray(fit_ink(canvas, ink), dtype=np.uint8)[:, :, None])
                labels.append(digit)
    if not images:
        return np.zeros((0, 8, 8, 1), dtype=np.uint8), np.zeros((0,), dtype=np.int64)
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def _image_folder(path: str, seed: int, test_fraction: float):
    def read_split(root: str, classes: list[str]):
        images, labels = [], []
        for index, cls in enumerate(classes):
            folder = os.path.join(root, cls)
            files = (
                sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
                if os.path.isdir(folder)
                else []
            )
            if not files:
                raise DataError(f"class folder {folder!r} has no images")
            for name in files:
                file = os.path.join(folder, name)
                try:
                    with Image.open(file) as image:
                        image.load()
                        images.append(image.copy())
                except (UnidentifiedImageError, OSError) as exc:
                    raise DataError(f"{file} does not decode as an image ({type(exc).__name__})") from None
                labels.append(index)
        return images, labels

    split_dirs = [os.path.join(path, "train"), os.path.join(path, "val")]
    if all(os.path.isdir(d) for d in split_dirs):
        classes = sorted(d for d in os.listdir(split_dirs[0]) if os.path.isdir(os.path.join(split_dirs[0], d)))
        if not classes:
            raise DataError(f"{split_dirs[0]!r} has no class folders")
        return classes, read_split(split_dirs[0], classes), read_split(split_dirs[1], classes)
    classes = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
    if not classes:
        raise DataError(f"{path!r} has no class folders (expected one sub-folder of images per class)")
    images, labels = read_split(path, classes)
    train, test = seeded_split(len(images), test_fraction, seed)
    return (
        classes,
        ([images[i] for i in train], [labels[i] for i in train]),
        ([images[i] for i in test], [labels[i] for i in test]),
    )


def _cifar10(path: str):
    root = (
        os.path.join(path, "cifar-10-batches-py") if os.path.isdir(os.path.join(path, "cifar-10-batches-py")) else path
    )

    def read_batch(name: str):
        file = os.path.join(root, name)
        try:
            with open(file, "rb") as handle:
                batch = pickle.load(handle, encoding="bytes")
            data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            return data, np.asarray(batch[b"labels"], dtype=np.int64)
        except FileNotFoundError:
            raise DataError(f"CIFAR-10 file {file} is missing") from None
        except Exception as exc:
            raise DataError(f"CIFAR-10 file {file} is corrupt ({type(exc).__name__})") from None

    train_files = sorted(f for f in os.listdir(root) if f.startswith("data_batch_"))
    if not train_files:
        raise DataError(f"no CIFAR-10 data_batch_* files in {root!r}")
    parts = [read_batch(f) for f in train_files]
    test = read_batch("test_batch")
    labels = [f"class_{i}" for i in range(10)]
    meta = os.path.join(root, "batches.meta")
    if os.path.exists(meta):
        try:
            with open(meta, "rb") as handle:
                labels = [n.decode() for n in pickle.load(handle, encoding="bytes")[b"label_names"]]
        except Exception as exc:
            raise DataError(f"CIFAR-10 file {meta} is corrupt ({type(exc).__name__})") from None
    return labels, (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])), test


def read_idx(file: str) -> np.ndarray:
    """An IDX file (MNIST's format), gzipped or not, as a uint8 array."""
    opener = gzip.open if file.endswith(".gz") else open
    try:
        with opener(file, "rb") as handle:
            header = handle.read(4)
            if len(header) != 4 or header[:2] != b"\x00\x00" or header[2] != 0x08:
                raise DataError(f"{file} is not an IDX file of unsigned bytes")
            ndim = header[3]
            dims = struct.unpack(f">{ndim}I", handle.read(4 * ndim))
            data = np.frombuffer(handle.read(), dtype=np.uint8)
    except (OSError, EOFError, struct.error) as exc:
        raise DataError(f"{file} is corrupt ({type(exc).__name__})") from None
    expected = int(np.prod(dims))
    if data.size != expected:
        raise DataError(f"{file} is truncated: {data.size} of {expected} bytes")
    return data.reshape(dims)


def _mnist(path: str, fashion: bool):
    def find(stem: str) -> str:
        for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
            if os.path.exists(os.path.join(path, name)):
                return os.path.join(path, name)
        raise DataError(f"{stem}[.gz] is missing from {path!r}")

    x_train = read_idx(find("train-images-idx3-ubyte"))[:, :, :, None]
    y_train = read_idx(find("train-labels-idx1-ubyte")).astype(np.int64)
    x_test = read_idx(find("t10k-images-idx3-ubyte"))[:, :, :, None]
    y_test = read_idx(find("t10k-labels-idx1-ubyte")).astype(np.int64)
    if len(x_train) != len(y_train) or len(x_test) != len(y_test):
        raise DataError(f"image and label counts differ in {path!r}")
    labels = FASHION_LABELS if fashion else [str(d) for d in range(10)]
    return labels, (x_train, y_train), (x_test, y_test)
