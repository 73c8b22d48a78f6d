"""The shared test helpers of normlayers.testing that are not exercised by failing elsewhere."""

from __future__ import annotations

import pytest
import torch

from normlayers.testing import NCHW_LAYOUTS, nchw_input


@pytest.mark.parametrize("layout", NCHW_LAYOUTS)
def test_nchw_input_layouts_hold_the_same_values(layout):
    x = nchw_input(2, 3, 4, 5, torch.float32, layout, seed=1, plane_offset=3.0)
    assert x.shape == (2, 3, 4, 5)
    assert x.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
    assert x.is_contiguous() == (layout == "contiguous")
    reference = nchw_input(2, 3, 4, 5, torch.float32, "contiguous", seed=1, plane_offset=3.0)
    if layout != "channel_slice":  # a slice holds channels 1..C of the same draw, the others channels 0..C-1
        assert torch.equal(x, reference)


def test_nchw_input_rejects_an_unknown_layout():
    with pytest.raises(ValueError, match="layout must be one of"):
        nchw_input(1, 1, 1, 1, torch.float32, "nhwc")
