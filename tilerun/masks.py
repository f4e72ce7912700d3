"""Random hole masks for self-supervised training and the quality benchmark.

A mix like LaMa's training masks (Suvorov et al. 2022, "Resolution-robust Large Mask
Inpainting with Fourier Convolutions", section 3.2): irregular thick strokes
(polylines of varying width with round joints), thin strokes and 1-4 boxes. Sizes are
fractions of the crop side, so a 64-pixel crop and a 512-pixel photo get holes of the
same *relative* size; pass ``scale`` to draw holes sized for a crop on a bigger image. Everything is drawn from the numpy Generator passed in, so a
seeded Generator gives the same masks on every machine.

Masks are bool HxW arrays, True = missing (tilerun's convention).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["MASK_KINDS", "random_mask", "stroke_mask", "box_mask"]

MASK_KINDS = ("thick", "thin", "box")
# Training mix: thick strokes and boxes are the hard cases; thin strokes are easy for any method.
MIX = {"thick": 0.45, "thin": 0.2, "box": 0.35}


def _polyline(draw: ImageDraw.ImageDraw, rng: np.random.Generator, h: int, w: int, *, width: float, vertices: int,
              step: float, side: float) -> None:
    y, x = rng.uniform(0, h), rng.uniform(0, w)
    angle = rng.uniform(0, 2 * math.pi)
    points = [(x, y)]
    for _ in range(vertices):
        # A random walk that mostly keeps its heading: strokes look like brush strokes, not noise.
        angle += rng.normal(0, 0.9)
        length = rng.uniform(0.3, 1.0) * step * side
        x = float(np.clip(x + length * math.cos(angle), 0, w - 1))
        y = float(np.clip(y + length * math.sin(angle), 0, h - 1))
        points.append((x, y))
    lw = max(1, int(round(width)))
    draw.line(points, fill=1, width=lw)
    r = lw / 2
    for px, py in points:  # round joints and caps
        draw.ellipse((px - r, py - r, px + r, py + r), fill=1)


def _repeats(height: int, width: int, scale: float) -> int:
    """How many scale x scale squares the image holds: shapes are drawn per square, so coverage keeps."""
    return max(1, round(height * width / scale**2))


def stroke_mask(rng: np.random.Generator, height: int, width: int, *, thick: bool = True,
                scale: float | None = None) -> np.ndarray:
    """Irregular strokes: thick (width 6-18% of ``scale``) or thin (1-4%); ``scale`` defaults to the short side."""
    im = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(im)
    side = float(scale or min(height, width))
    n = sum(int(rng.integers(1, 5)) if thick else int(rng.integers(2, 7)) for _ in range(_repeats(height, width, side)))
    for _ in range(n):
        frac = rng.uniform(0.06, 0.18) if thick else rng.uniform(0.01, 0.04)
        _polyline(draw, rng, height, width, width=max(1.0, frac * side), vertices=int(rng.integers(2, 7)),
                  step=0.35 if thick else 0.45, side=side)
    return np.asarray(im, dtype=bool)


def box_mask(rng: np.random.Generator, height: int, width: int, *, scale: float | None = None) -> np.ndarray:
    """1-4 axis-aligned boxes (per scale x scale square), each side 10-45% of ``scale`` (default: the short side)."""
    mask = np.zeros((height, width), dtype=bool)
    side = float(scale or min(height, width))
    for _ in range(sum(int(rng.integers(1, 5)) for _ in range(_repeats(height, width, side)))):
        bh = min(height, max(1, int(rng.uniform(0.1, 0.45) * side)))
        bw = min(width, max(1, int(rng.uniform(0.1, 0.45) * side)))
        y0 = int(rng.integers(0, height - bh + 1))
        x0 = int(rng.integers(0, width - bw + 1))
        mask[y0 : y0 + bh, x0 : x0 + bw] = True
    return mask


def random_mask(rng: np.random.Generator, height: int, width: int, *, kind: str | None = None,
                scale: float | None = None, max_coverage: float = 0.5, tries: int = 20) -> np.ndarray:
    """One hole mask of ``kind`` (None: drawn from the training mix) covering at most ``max_coverage``.

    Hole sizes are fractions of ``scale`` pixels (default: the short side, i.e. the
    training crop); a bigger image at the same ``scale`` gets proportionally more holes.

    A draw that covers too much (or nothing) is redrawn; after ``tries`` redraws the
    last one is trimmed by dropping whole rows from the bottom, so the bound always holds.
    """
    if height < 1 or width < 1:
        raise ValueError(f"mask size must be positive, got {height}x{width}")
    if not 0 < max_coverage <= 1:
        raise ValueError(f"max_coverage must be in (0, 1], got {max_coverage}")
    if kind is None:
        kind = str(rng.choice(list(MIX), p=list(MIX.values())))
    if kind not in MASK_KINDS:
        raise ValueError(f"mask kind must be one of {MASK_KINDS}, got {kind!r}")
    mask = None
    for _ in range(tries):
        if kind == "box":
            mask = box_mask(rng, height, width, scale=scale)
        else:
            mask = stroke_mask(rng, height, width, thick=kind == "thick", scale=scale)
        cov = mask.mean()
        if 0 < cov <= max_coverage:
            return mask
    limit = int(max_coverage * mask.size)
    while mask.sum() > limit:
        rows = np.nonzero(mask.any(axis=1))[0]
        mask[rows[-1]] = False
    return mask
