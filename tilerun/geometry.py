"""Pure tile geometry: no torch, no I/O.

A tile is a *core* (the pixels it is responsible for in the output) plus a *halo*
of context on every side, clipped to the image. Exactness rests on three facts
this module guarantees:

* every window origin is a multiple of the model's stride, so the tile's
  downsampling grid coincides with the whole image's grid;
* every window extends ``halo`` pixels past its core (or to the image edge,
  where the whole-image forward sees the same border), and ``halo`` is at least
  the model's receptive-field radius;
* the cores partition the image exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import ceil

__all__ = ["Tile", "grid", "round_up", "balanced_cuts"]


def round_up(value: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is >= ``value``."""
    if multiple <= 0:
        raise ValueError(f"multiple must be positive, got {multiple}")
    return -(-value // multiple) * multiple


@dataclass(frozen=True)
class Tile:
    """One tile of an image, all coordinates in image pixels, end-exclusive.

    ``y0:y1, x0:x1`` is the core, ``wy0:wy1, wx0:wx1`` the window fed to the model.
    """

    index: int
    y0: int
    y1: int
    x0: int
    x1: int
    wy0: int
    wy1: int
    wx0: int
    wx1: int

    @property
    def window_shape(self) -> tuple[int, int]:
        return (self.wy1 - self.wy0, self.wx1 - self.wx0)

    @property
    def core_shape(self) -> tuple[int, int]:
        return (self.y1 - self.y0, self.x1 - self.x0)

    def core_in_window(self) -> tuple[slice, slice]:
        """Slices that cut the core out of the window's output."""
        return (
            slice(self.y0 - self.wy0, self.y1 - self.wy0),
            slice(self.x0 - self.wx0, self.x1 - self.wx0),
        )

    def core_in_window_at(self, stride: int) -> tuple[slice, slice]:
        """The core's slices in a stride-``stride`` feature map of the window.

        The window origin is stride-aligned, so the core starts on a feature cell;
        a core ending on the image edge covers the last, partial cell.
        """
        oy, ox = self.y0 - self.wy0, self.x0 - self.wx0
        return (
            slice(oy // stride, ceil((self.y1 - self.wy0) / stride)),
            slice(ox // stride, ceil((self.x1 - self.wx0) / stride)),
        )


def balanced_cuts(length: int, tile: int, stride: int) -> list[int]:
    """Core boundaries along one axis: stride-aligned, as even as possible.

    ``tile <= 0`` or ``tile >= length`` gives one core. Evening out the cores
    avoids a sliver tile at the end that would pay a full halo for a few pixels.
    """
    if length <= 0:
        raise ValueError(f"length must be positive, got {length}")
    if tile <= 0 or tile >= length:
        return [0, length]
    n = ceil(length / tile)
    step = round_up(ceil(length / n), stride)
    cuts = list(range(0, length, step)) + [length]
    return cuts


def grid(height: int, width: int, *, tile: int, halo: int, stride: int = 1) -> list[Tile]:
    """Cover a ``height`` x ``width`` image with tiles, row-major.

    ``tile`` is the largest core side (0 = the whole image), ``halo`` the context
    on each side. Both must be multiples of ``stride``.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image must be at least 1x1, got {height}x{width}")
    if stride <= 0:
        raise ValueError(f"stride must be positive, got {stride}")
    if tile < 0 or tile % stride:
        raise ValueError(f"tile must be 0 or a positive multiple of the model stride {stride}, got {tile}")
    if halo < 0 or halo % stride:
        raise ValueError(f"halo must be a non-negative multiple of the model stride {stride}, got {halo}")
    ys = balanced_cuts(height, tile, stride)
    xs = balanced_cuts(width, tile, stride)
    tiles = []
    for y0, y1 in zip(ys, ys[1:]):
        for x0, x1 in zip(xs, xs[1:]):
            tiles.append(
                Tile(
                    index=len(tiles),
                    y0=y0,
                    y1=y1,
                    x0=x0,
                    x1=x1,
                    wy0=max(0, y0 - halo),
                    wy1=min(height, y1 + halo),
                    wx0=max(0, x0 - halo),
                    wx1=min(width, x1 + halo),
                )
            )
    return tiles
