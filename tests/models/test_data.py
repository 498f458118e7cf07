"""Dataset readers on real digits and on small files generated in each distribution format."""

import gzip
import os
import pickle
import struct

import numpy as np
import pytest
from PIL import Image

from convserve.models.data import DataError, load_dataset, read_idx, typed_digits


def test_digits_split_is_fixed_and_normalised():
    first = load_dataset("digits", seed=0)
    again = load_dataset("digits", seed=0)
    typed = len(typed_digits()[0])  # added to the training split only
    assert first.train_images.shape == (1438 + typed, 32, 32, 1) and first.test_images.shape == (359, 32, 32, 1)
    assert np.array_equal(first.test_labels, again.test_labels)
    assert np.array_equal(first.test_images, again.test_images)
    other = load_dataset("digits", seed=1)
    assert not np.array_equal(first.test_labels, other.test_labels)
    x = first.train_inputs()
    assert x.shape == (1438 + typed, 1, 32, 32) and x.dtype == np.float32
    assert abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 1) < 1e-3


def test_digits_record_their_ink_step_and_typed_digits_are_only_trained_on():
    """The digits' spec makes a drawing look like them (8x8 native, no margin: the ink fills the frame),
    and the typed digits join the training split, never the test split."""
    with_typed = load_dataset("digits", seed=0)
    without = load_dataset("digits", seed=0, typed_digits=False)
    assert with_typed.spec.ink is not None and with_typed.spec.ink.native == (8, 8)
    assert with_typed.spec.ink.margin == 0.0 and with_typed.spec.ink.paper == "dark"
    assert np.array_equal(with_typed.test_images, without.test_images)
    images, labels = typed_digits()
    assert len(without.train_images) + len(images) == len(with_typed.train_images)
    if len(images):  # DejaVu's faces are installed (fonts-dejavu): each digit in each face, two sizes
        assert images.shape[1:] == (8, 8, 1) and sorted(set(labels.tolist())) == list(range(10))
        assert images.max(axis=(1, 2, 3)).min() == 255  # stretched to full range, as the digits are


def _write_pngs(folder, count, color, size=(12, 10)):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(len(str(folder)))
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).convert(color).save(
            os.path.join(folder, f"{i}.png")
        )


def test_image_folder_with_and_without_split(tmp_path):
    for cls in ("cat", "dog"):
        _write_pngs(tmp_path / "flat" / cls, 5, "RGB")
        _write_pngs(tmp_path / "split" / "train" / cls, 4, "L")
        _write_pngs(tmp_path / "split" / "val" / cls, 2, "L")
    flat = load_dataset(f"imagefolder:{tmp_path / 'flat'}", size=(16, 16))
    assert flat.labels == ["cat", "dog"] and len(flat.train_images) + len(flat.test_images) == 10
    assert flat.spec.channels == 3 and flat.train_images.shape[1:] == (16, 16, 3)
    split = load_dataset(f"imagefolder:{tmp_path / 'split'}", size=(16, 16))
    assert len(split.train_images) == 8 and len(split.test_images) == 4 and split.spec.channels == 1


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(f"imagefolder:{tmp_path / 'missing'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        load_dataset(f"imagefolder:{tmp_path / 'empty'}")
    _write_pngs(tmp_path / "noimg" / "a", 3, "RGB")
    (tmp_path / "noimg" / "b").mkdir()
    with pytest.raises(DataError, match="has no images"):
        load_dataset(f"imagefolder:{tmp_path / 'noimg'}")
    _write_pngs(tmp_path / "bad" / "a", 3, "RGB")
    (tmp_path / "bad" / "a" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match="does not decode"):
        load_dataset(f"imagefolder:{tmp_path / 'bad'}")
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("imagenet:/data")


def test_cifar10_pickles(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    for name, n in (("data_batch_1", 6), ("data_batch_2", 4), ("test_batch", 3)):
        batch = {b"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, n))}
        with open(root / name, "wb") as handle:
            pickle.dump(batch, handle)
    with open(root / "batches.meta", "wb") as handle:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, handle)
    data = load_dataset(f"cifar10:{tmp_path}")
    assert data.train_images.shape == (10, 32, 32, 3) and data.test_images.shape == (3, 32, 32, 3)
    assert data.labels[0] == "c0"
    # the channel-planar CIFAR rows become (H, W, C) pixels
    with open(root / "data_batch_1", "rb") as handle:
        raw = pickle.load(handle)[b"data"][0]
    assert np.array_equal(data.train_images[0][:, :, 0].ravel(), raw[:1024])
    (root / "test_batch").write_bytes(b"garbage")
    with pytest.raises(DataError, match="corrupt"):
        load_dataset(f"cifar10:{tmp_path}")


def _write_idx(path, array, compress):
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if compress else open
    with opener(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("kind", ["mnist", "fashion-mnist"])
def test_mnist_idx_files(tmp_path, compress, kind):
    rng = np.random.default_rng(1)
    suffix = ".gz" if compress else ""
    _write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", rng.integers(0, 255, (7, 28, 28)), compress)
    _write_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", rng.integers(0, 10, (7,)), compress)
    _write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", rng.integers(0, 255, (3, 28, 28)), compress)
    _write_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", rng.integers(0, 10, (3,)), compress)
    data = load_dataset(f"{kind}:{tmp_path}")
    assert data.train_images.shape == (7, 32, 32, 1) and len(data.test_labels) == 3
    assert data.labels[9] == ("ankle boot" if kind == "fashion-mnist" else "9")


def test_truncated_idx_is_refused(tmp_path):
    path = tmp_path / "x-idx3-ubyte"
    _write_idx(path, np.zeros((4, 5, 5)), False)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match="truncated"):
        read_idx(str(path))
