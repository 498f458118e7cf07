"""How well a served digits version reads drawn digits: accuracy on examples/drawn/ (made by
scripts/make_drawn_digits.py, never trained on) and on its own held-out scikit-learn digits, through
the preprocessing its model.json records (the functions the server runs) and onnxruntime.

    .venv/bin/python scripts/drawn_accuracy.py model_repository/digits/1 [more versions...]
"""

from __future__ import annotations

import os
import sys

import numpy as np
from PIL import Image

from convserve.contract import ModelCard, normalize, resize_image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRAWN = os.path.join(ROOT, "examples", "drawn")


def drawn_set(folder: str = DRAWN) -> tuple[list[str], np.ndarray]:
    """(file names, labels) of the drawn digits; a name starts with its digit."""
    names = sorted(f for f in os.listdir(folder) if f.endswith(".png"))
    return names, np.array([int(name.split("-", 1)[0]) for name in names])


def predict(version_dir: str, images: list[Image.Image]) -> np.ndarray:
    """The version's top-1 class index for each image, preprocessed as its card says."""
    import onnxruntime

    card = ModelCard.read(version_dir)
    batch = normalize(np.stack([resize_image(image, card.preprocess) for image in images]), card.preprocess)
    session = onnxruntime.InferenceSession(os.path.join(version_dir, "model.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"input": batch})
    return logits.argmax(axis=1)


def drawn_accuracy(version_dir: str, folder: str = DRAWN) -> float:
    names, labels = drawn_set(folder)
    images = []
    for name in names:
        with Image.open(os.path.join(folder, name)) as image:
            images.append(image.copy())
    return float((predict(version_dir, images) == labels).mean())


def held_out_accuracy(version_dir: str) -> float:
    """On the scikit-learn digits the training run held out (its seed and test fraction)."""
    from convserve.models.data import digits_as_uint8, seeded_split

    card = ModelCard.read(version_dir)
    images, labels = digits_as_uint8()
    config = card.training.get("config", {})
    _, test = seeded_split(len(images), float(config.get("test_fraction", 0.2)), int(config.get("seed", 0)))
    pictures = [Image.fromarray(images[i, :, :, 0]) for i in test]
    return float((predict(version_dir, pictures) == labels[test]).mean())


def main() -> None:
    for version_dir in sys.argv[1:]:
        drawn, held_out = drawn_accuracy(version_dir), held_out_accuracy(version_dir)
        print(f"{version_dir}: drawn digits {drawn:.1%}, held-out scikit-learn digits {held_out:.1%}")


if __name__ == "__main__":
    main()
