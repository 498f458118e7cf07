"""Write examples/digits/: the first test-split image of each class of the built-in digits set
(the split `convserve train` holds out with its default seed and test fraction), as 8x8 PNGs, the
size the set has. Run: .venv/bin/python scripts/make_examples.py"""

from __future__ import annotations

import os

from PIL import Image

from convserve.models.config import TrainConfig
from convserve.models.data import digits_as_uint8, seeded_split

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "digits")


def main() -> None:
    config = TrainConfig()
    images, labels = digits_as_uint8()
    _, test = seeded_split(len(images), config.test_fraction, config.seed)
    os.makedirs(ROOT, exist_ok=True)
    for digit in range(10):
        index = next(int(i) for i in test if labels[i] == digit)
        path = os.path.join(ROOT, f"{digit}-test{index}.png")
        Image.fromarray(images[index][:, :, 0], mode="L").save(path, format="PNG")
        print(path)


if __name__ == "__main__":
    main()
