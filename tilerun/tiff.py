"""TIFF through tifffile (the ``tiff`` extra): inputs decoded tile by tile into uint8 arrays,
outputs (`run --format tiff`) written as tiled, deflate-compressed TIFFs.

Pillow holds an RGB image at 4 bytes a pixel and `np.asarray` copies it out: a large
TIFF costs ~2.3x its uint8 pixels on the way in. tifffile decodes each tile (or strip)
of the file on a few threads straight into the uint8 RGB array and the missing mask,
so reading costs the arrays the engine needs and a tile: memory grows with the image
only through its uint8 pixels (python bench/tiff_memory.py).

Layouts read here: 8- or 16-bit grey or RGB, with or without an alpha channel
(alpha == 0 is missing, as for every input), pixels interleaved, uncompressed or
compressed with deflate or PackBits, no orientation tag (or "top-left"). Anything else
(LZW, JPEG, CMYK, palettes, 1-bit, floats, planar files, rotated ones) goes to Pillow,
which reads all of them; so does every TIFF when tifffile is not installed.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np

from .errors import InputImageError, too_many_pixels

try:
    import tifffile
except ImportError:  # the optional extra: pip install tilerun[tiff]
    tifffile = None

__all__ = ["TIFF_EXTENSIONS", "NotForTifffile", "tiff_size", "read_tiff", "write_tiff", "TILE"]

TIFF_EXTENSIONS = (".tif", ".tiff")
#: Threads decoding one file's tiles (zlib lets go of the GIL).
DECODE_THREADS = min(4, os.cpu_count() or 1)
#: Tile side of the TIFFs tilerun writes: viewers and GIS tools read a region by its tiles.
TILE = 512


class NotForTifffile(Exception):
    """This file is for Pillow: tifffile is missing or does not read its layout here."""


def _page(tif):
    """The first page, if its layout is one `read_tiff` handles; else NotForTifffile."""
    try:
        page = tif.pages.first
        samples = page.samplesperpixel
        colour = {1: (1, 2), 2: (3, 4)}.get(int(page.photometric))  # MINISBLACK: grey (+alpha), RGB (+alpha)
        readable = (
            colour is not None
            and samples in colour
            and page.dtype in (np.uint8, np.uint16)
            and page.imagedepth == 1
            and (samples == 1 or int(page.planarconfig) == 1)  # 1: CONTIG (interleaved)
            and int(page.tags.valueof(274, 1)) == 1  # orientation: Pillow applies it
        )
    except (tifffile.TiffFileError, ValueError, TypeError, KeyError, IndexError) as e:
        raise NotForTifffile(str(e)) from e
    if not readable:
        raise NotForTifffile(f"layout {page.photometric!r} x{samples} {page.dtype}")
    try:
        tifffile.TIFF.DECOMPRESSORS[page.compression]
    except KeyError as e:  # LZW, JPEG, ... need imagecodecs; Pillow has them
        raise NotForTifffile(f"compression {page.compression.name}") from e
    return page


def _open(path: Path):
    if tifffile is None:
        raise NotForTifffile("tifffile is not installed")
    try:
        return tifffile.TiffFile(path)
    except (tifffile.TiffFileError, ValueError, OSError) as e:
        # Not a TIFF tifffile can parse, or unreadable: Pillow's path names the reason.
        raise NotForTifffile(str(e)) from e


def tiff_size(path: Path) -> tuple[int, int]:
    """(height, width) from the header; NotForTifffile if `read_tiff` would not read it."""
    with _open(path) as tif:
        page = _page(tif)
        return page.imagelength, page.imagewidth


def read_tiff(path: Path, *, max_pixels: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 HxWx3, bool HxW where alpha == 0), decoded tile by tile.

    16-bit values v become round(v * 255 / 65535), as Pillow's path does. Over ``max_pixels``
    (the decompression-bomb limit; None: none) the image is refused before any pixel is read.
    NotForTifffile: read it with Pillow instead. InputImageError: a broken file.
    """
    with _open(path) as tif:
        page = _page(tif)
        h, w = page.imagelength, page.imagewidth
        if max_pixels is not None and h * w > max_pixels:
            raise too_many_pixels(f"{h * w:,} pixels", max_pixels)
        rgb = np.zeros((h, w, 3), np.uint8)  # zeros: where a file leaves a segment out
        missing = np.zeros((h, w), bool)
        alpha = page.samplesperpixel in (2, 4)
        try:
            for data, index, _ in page.segments(maxworkers=DECODE_THREADS):
                # index: (separate sample, depth, y, x, contig sample); tiles come padded to
                # full tile size at the right and bottom edges.
                y, x = index[2], index[3]
                if data is None:  # a segment the file leaves out: zeros, as tifffile reads it
                    continue
                seg = data[0, : h - y, : w - x]
                if seg.dtype == np.uint16:
                    seg = ((seg.astype(np.uint32) + 128) // 257).astype(np.uint8)  # round(v / 257)
                sh, sw = seg.shape[:2]
                colour = seg[..., : 3 if seg.shape[2] >= 3 else 1]
                rgb[y : y + sh, x : x + sw] = colour  # grey broadcasts to the three channels
                if alpha:
                    missing[y : y + sh, x : x + sw] = seg[..., -1] == 0
        except (ValueError, IndexError, KeyError, EOFError, OSError, RuntimeError, zlib.error) as e:
            # A truncated or corrupt file; left to Pillow, it would fail the same way.
            raise InputImageError(f"cannot decode: {e}") from e
        return rgb, missing


def write_tiff(
    f,
    pixels: np.ndarray,
    *,
    palette: list[tuple[int, int, int]] | None = None,
    description: str = "",
    threads: int = 1,
) -> None:
    """Write ``pixels`` to the binary file ``f`` as a tiled TIFF (`TILE`^2 tiles, deflate level
    1, the horizontal predictor): (h, w) uint8 as greyscale, or as palette indices when
    ``palette`` is given; (h, w, 3) uint8 as RGB. ``threads`` compress tiles at once; tifffile
    writes them in order, one tile's bytes at a time. BigTIFF past 4 GB.
    """
    if tifffile is None:
        raise RuntimeError("TIFF outputs need tifffile: pip install tilerun[tiff] (or run with --format png)")
    if pixels.dtype != np.uint8 or not (pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[2] == 3)):
        raise ValueError(f"write_tiff takes uint8 (h, w) or (h, w, 3) pixels, got {pixels.dtype} {pixels.shape}")
    kwargs = {}
    if pixels.ndim == 3:
        kwargs["photometric"] = "rgb"
    elif palette is not None:
        if len(palette) > 256:
            raise ValueError(f"a TIFF palette holds at most 256 colours, got {len(palette)}")
        colormap = np.zeros((3, 256), np.uint16)
        if palette:
            colormap[:, : len(palette)] = np.asarray(palette, np.uint16).T * 257  # 8 -> 16 bits
        kwargs.update(photometric="palette", colormap=colormap)
    else:
        kwargs["photometric"] = "minisblack"
    tifffile.imwrite(
        f, pixels, tile=(TILE, TILE), compression="zlib", compressionargs={"level": 1}, predictor=pixels.ndim == 3,
        description=description, metadata=None, bigtiff=pixels.nbytes > 2**32 - 2**25, maxworkers=threads,
        **kwargs,
    )
