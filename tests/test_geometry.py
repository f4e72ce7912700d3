"""Tile geometry as pure functions: the three facts exactness rests on (cores partition the
image once, windows are stride-aligned, windows hold core + halo clipped to the image)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from math import ceil

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tilerun.geometry import Tile, balanced_cuts, grid, round_up

# Odd sizes on purpose (MONAI tests 511x237): 1x1, primes, just above a tile multiple.
SIZES = [(1, 1), (1, 300), (7, 300), (333, 517), (65, 129), (257, 256), (509, 1021), (1000, 999)]


def check_grid(tiles: list[Tile], h: int, w: int, tile: int, halo: int, stride: int) -> None:
    """Every invariant the engine relies on; shared by the example and property tests."""
    cover = np.zeros((h, w), np.int32)
    for i, t in enumerate(tiles):
        assert t.index == i
        # core inside the image, non-empty, at most `tile` on a side (unless one tile)
        assert 0 <= t.y0 < t.y1 <= h and 0 <= t.x0 < t.x1 <= w
        if tile:
            assert t.y1 - t.y0 <= tile and t.x1 - t.x0 <= tile
        # core starts on the stride grid; it ends on it too, or at the image edge
        assert t.y0 % stride == 0 and t.x0 % stride == 0
        assert t.y1 % stride == 0 or t.y1 == h
        assert t.x1 % stride == 0 or t.x1 == w
        # window = core + halo on every side, clipped to the image
        assert (t.wy0, t.wy1, t.wx0, t.wx1) == (max(0, t.y0 - halo), min(h, t.y1 + halo), max(0, t.x0 - halo), min(w, t.x1 + halo))
        # the window origin is stride-aligned: the tile's pooling grid is the image's grid
        assert t.wy0 % stride == 0 and t.wx0 % stride == 0
        assert t.window_shape == (t.wy1 - t.wy0, t.wx1 - t.wx0)
        assert t.core_shape == (t.y1 - t.y0, t.x1 - t.x0)
        cover[t.y0 : t.y1, t.x0 : t.x1] += 1
    # the cores partition the image: every pixel exactly once
    assert cover.min() == 1 and cover.max() == 1
    # row-major order
    assert [(t.y0, t.x0) for t in tiles] == sorted((t.y0, t.x0) for t in tiles)


GRID_CASES = [
    (h, w, tile, halo, stride)
    for (h, w) in SIZES
    for (tile, halo, stride) in [(64, 40, 4), (128, 8, 8), (4, 4, 4), (5, 3, 1), (0, 12, 4), (512, 40, 4)]
    if tile >= 8 or h * w < 200_000  # tens of thousands of tiny tiles: slow, and the small sizes cover it
]


@pytest.mark.parametrize("h,w,tile,halo,stride", GRID_CASES)
def test_grid_invariants_on_odd_sizes(h, w, tile, halo, stride):
    check_grid(grid(h, w, tile=tile, halo=halo, stride=stride), h, w, tile, halo, stride)


@given(
    h=st.integers(1, 300),
    w=st.integers(1, 300),
    stride=st.sampled_from([1, 2, 4, 8]),
    tile_cells=st.integers(0, 40),
    halo_cells=st.integers(0, 12),
)
@settings(max_examples=300, deadline=None)
def test_grid_invariants_property(h, w, stride, tile_cells, halo_cells):
    tile, halo = tile_cells * stride, halo_cells * stride
    check_grid(grid(h, w, tile=tile, halo=halo, stride=stride), h, w, tile, halo, stride)


def test_core_in_window_cuts_the_core_out_of_the_window():
    # A coordinate image: cutting the window then the core must give the core's coordinates.
    h, w = 37, 53
    ys, xs = np.mgrid[0:h, 0:w]
    for t in grid(h, w, tile=8, halo=4, stride=4):
        window = ys[t.wy0 : t.wy1, t.wx0 : t.wx1], xs[t.wy0 : t.wy1, t.wx0 : t.wx1]
        sy, sx = t.core_in_window()
        assert np.array_equal(window[0][sy, sx], ys[t.y0 : t.y1, t.x0 : t.x1])
        assert np.array_equal(window[1][sy, sx], xs[t.y0 : t.y1, t.x0 : t.x1])


@pytest.mark.parametrize("h,w", [(1, 1), (7, 300), (37, 53), (333, 517)])
@pytest.mark.parametrize("stride", [2, 4])
def test_core_cells_partition_the_feature_map(h, w, stride):
    # Pass 1 sums global terms over each core's feature cells: those cells must partition the
    # whole image's (padded) feature map, the last partial cell included, exactly once.
    ch, cw = ceil(h / stride), ceil(w / stride)
    cover = np.zeros((ch, cw), np.int32)
    for t in grid(h, w, tile=4 * stride, halo=2 * stride, stride=stride):
        sy, sx = t.core_in_window_at(stride)
        cy0, cx0 = t.wy0 // stride, t.wx0 // stride  # window origin in cells (it is aligned)
        cover[cy0 + sy.start : cy0 + sy.stop, cx0 + sx.start : cx0 + sx.stop] += 1
        # and the slice stays inside the window's feature map
        assert sy.stop <= ceil((t.wy1 - t.wy0) / stride) and sx.stop <= ceil((t.wx1 - t.wx0) / stride)
    assert cover.min() == 1 and cover.max() == 1


def test_tile_zero_is_one_tile_of_the_whole_image():
    (t,) = grid(333, 517, tile=0, halo=40, stride=4)
    assert (t.y0, t.y1, t.x0, t.x1) == (0, 333, 0, 517)
    assert (t.wy0, t.wy1, t.wx0, t.wx1) == (0, 333, 0, 517)


def test_tile_larger_than_the_image_is_one_tile():
    assert len(grid(100, 60, tile=128, halo=8, stride=4)) == 1
    assert len(grid(1, 1, tile=4, halo=4, stride=4)) == 1


def test_cores_are_balanced_not_a_sliver_at_the_end():
    # 520 = 512 + 8: naive cutting gives a 512 core and an 8-px sliver paying a full halo.
    cuts = balanced_cuts(520, 512, 4)
    assert cuts == [0, 260, 520]
    # Never more cores than the fewest possible: each one pays a full halo.
    for length, tile, stride in [(1000, 64, 4), (1001, 8, 4), (999, 512, 4), (517, 64, 1), (300, 128, 8)]:
        sizes = np.diff(balanced_cuts(length, tile, stride))
        assert len(sizes) == ceil(length / tile) and sizes.max() <= tile


def test_balanced_cuts_basic():
    assert balanced_cuts(10, 0, 1) == [0, 10]
    assert balanced_cuts(10, 10, 2) == [0, 10]
    assert balanced_cuts(10, 4, 1) == [0, 4, 8, 10]  # ceil(10/3)=4: three cores
    assert balanced_cuts(9, 4, 4) == [0, 4, 8, 9]  # stride forces the last partial one
    with pytest.raises(ValueError, match="length"):
        balanced_cuts(0, 4, 1)


def test_round_up():
    assert [round_up(v, 4) for v in (0, 1, 3, 4, 5, 39, 40)] == [0, 4, 4, 4, 8, 40, 40]
    with pytest.raises(ValueError, match="multiple"):
        round_up(3, 0)


@pytest.mark.parametrize(
    "kwargs,words",
    [
        (dict(height=10, width=10, tile=6, halo=0, stride=4), ["tile", "stride 4", "6"]),
        (dict(height=10, width=10, tile=-4, halo=0, stride=4), ["tile", "-4"]),
        (dict(height=10, width=10, tile=8, halo=3, stride=4), ["halo", "stride 4", "3"]),
        (dict(height=10, width=10, tile=8, halo=-4, stride=4), ["halo", "-4"]),
        (dict(height=0, width=10, tile=8, halo=0, stride=4), ["0x10"]),
        (dict(height=10, width=-1, tile=8, halo=0, stride=4), ["10x-1"]),
        (dict(height=10, width=10, tile=8, halo=0, stride=0), ["stride", "0"]),
    ],
)
def test_validation_names_the_parameter_and_echoes_the_value(kwargs, words):
    h, w = kwargs.pop("height"), kwargs.pop("width")
    with pytest.raises(ValueError) as e:
        grid(h, w, **kwargs)
    for word in words:
        assert word in str(e.value)


def test_tile_is_a_frozen_value():
    t = grid(8, 8, tile=4, halo=0, stride=4)[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.y0 = 1  # type: ignore[misc]
    assert t == Tile(0, 0, 4, 0, 4, 0, 4, 0, 4)


def test_geometry_imports_no_torch():
    code = "import sys, tilerun.geometry; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
