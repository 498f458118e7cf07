"""The pictures of filters and feature maps (convserve.pictures): numpy and Pillow only."""

import numpy as np

from convserve.pictures import FILTER_FRAME_VALUE, FILTER_GAP, FILTER_GAP_VALUE, filter_grid, panel


def test_kernels_stand_apart_white_gaps_and_a_dark_frame_each():
    weights = np.random.default_rng(0).standard_normal((5, 2, 3, 3)).astype(np.float32)
    picture, plan = filter_grid(weights)
    assert plan.border == FILTER_GAP and (plan.cols, plan.rows) == (3, 2)
    covered = np.zeros(picture.shape, dtype=bool)
    for index in range(5):
        top, left, bottom, right = plan.tile_box(index)
        frame = np.ones((bottom - top + 2, right - left + 2), dtype=bool)
        frame[1:-1, 1:-1] = False
        assert np.all(picture[top - 1 : bottom + 1, left - 1 : right + 1][frame] == FILTER_FRAME_VALUE)
        tile = picture[top:bottom, left:right]
        assert (tile.min(), tile.max()) == (0, 255)  # normalised per filter
        covered[top - 1 : bottom + 1, left - 1 : right + 1] = True
    assert np.all(picture[~covered] == FILTER_GAP_VALUE)


def test_a_panel_is_wide_enough_for_its_title():
    title = "digits conv1 = layer conv1 (3x3/1 pad 1): output 32x32x32, receptive field 3x3, stride 1 input px"
    picture = panel([title], [("small", np.zeros((10, 10), dtype=np.uint8))])
    assert picture.ndim == 3 and picture.shape[1] > 300
    text_columns = np.nonzero((picture[:30] < 128).any(axis=(0, 2)))[0]
    assert text_columns.max() < picture.shape[1] - 1  # the title ends inside the picture
