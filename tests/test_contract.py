"""The ink step of the contract (InkSpec, fit_ink): a drawing made to look like the training data."""

import numpy as np
import pytest
from PIL import Image, ImageDraw

from convserve.contract import ContractError, InkSpec, PreprocessSpec, fit_ink, resize_image

DIGITS_INK = InkSpec(paper="dark", margin=0.0, native=(8, 8))


def _bar(size=64, box=(30, 10, 36, 50), ink=255, paper=0) -> Image.Image:
    """A vertical bar (a '1') on paper."""
    image = Image.new("L", (size, size), paper)
    ImageDraw.Draw(image).rectangle(box, fill=ink)
    return image


def test_dark_ink_on_light_paper_is_inverted_and_cropped_to_the_ink():
    light_on_dark = np.asarray(fit_ink(_bar(), DIGITS_INK))
    dark_on_light = np.asarray(fit_ink(_bar(ink=0, paper=255), DIGITS_INK))
    assert light_on_dark.shape == (8, 8)
    assert np.array_equal(light_on_dark, dark_on_light)
    # the bar fills the frame top to bottom, in the middle columns, at full brightness
    assert light_on_dark[:, 3].min() == 255 and light_on_dark[:, 4].min() > 150
    assert light_on_dark[:, :3].max() == 0 and light_on_dark[:, 5:].max() == 0


def test_the_same_drawing_anywhere_and_at_any_size_gives_one_input():
    small = np.asarray(fit_ink(_bar(box=(4, 4, 7, 23)), DIGITS_INK), dtype=int)
    large = np.asarray(fit_ink(_bar(box=(40, 10, 46, 50)), DIGITS_INK), dtype=int)
    assert np.abs(small - large).max() <= 64  # rounding: a 4x20 box against a 7x41 one


def test_faint_ink_is_stretched_and_a_margin_is_kept():
    faint = np.asarray(fit_ink(_bar(ink=90, paper=40), InkSpec(margin=0.25, native=(8, 8))))
    assert faint.max() == 255 and faint[0].max() == 0 and faint[-1].max() == 0  # a quarter of each side empty


def test_an_image_without_ink_is_left_as_it_is():
    blank = Image.new("L", (20, 20), 200)
    assert fit_ink(blank, DIGITS_INK) is blank


def test_the_spec_applies_the_ink_step_and_the_card_keeps_it():
    spec = PreprocessSpec(32, 32, 1, "bilinear", (0.3,), (0.3,), ink=DIGITS_INK)
    assert resize_image(_bar(ink=0, paper=255), spec).shape == (32, 32, 1)
    again = PreprocessSpec.from_dict(spec.to_dict())
    assert again == spec
    without = spec.to_dict()
    del without["ink"]
    assert PreprocessSpec.from_dict(without).ink is None  # a card from before the ink step
    with pytest.raises(ContractError):
        InkSpec(paper="grey")
