"""TIFF through tifffile (the ``tiff`` extra): inputs decoded tile by tile as stored (any dtype,
any number of bands), outputs (`run --format tiff`) written as tiled, deflate-compressed TIFFs.

Pillow holds an RGB image at 4 bytes a pixel and `np.asarray` copies it out: a large
TIFF costs ~2.3x its uint8 pixels on the way in. tifffile decodes each tile (or strip)
of the file on a few threads straight into the pixel array and the missing mask, so
reading costs the arrays the engine needs and a tile: memory grows with the image only
through its pixels (python bench/tiff_memory.py). `radiometry` then maps them to uint8.

Layouts read here: grey or bands (MINISBLACK, 1 or more samples; GDAL's multi-band
files) or RGB, with or without an alpha sample (extra sample "associated" or
"unassociated" alpha; alpha == 0 is missing, as for every input), 8 to 64 bits,
unsigned, signed or float, interleaved or planar, with any compression tifffile (with
imagecodecs) decodes, no orientation tag (or "top-left"). The file's GDAL_NODATA tag is
returned as its nodata. Anything else (CMYK, YCbCr, palettes, 1-bit, rotated files) goes
to Pillow, which reads all of them; so does every TIFF when tifffile is not installed.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputImageError, too_many_pixels

try:
    import tifffile
except ImportError:  # the optional extra: pip install tilerun[tiff]
    tifffile = None

__all__ = ["TIFF_EXTENSIONS", "NotForTifffile", "TiffPixels", "tiff_size", "read_tiff", "file_nodata", "write_tiff",
           "TILE"]

TIFF_EXTENSIONS = (".tif", ".tiff")
#: Threads decoding one file's tiles (zlib lets go of the GIL).
DECODE_THREADS = min(4, os.cpu_count() or 1)
#: Tile side of the TIFFs tilerun writes: viewers and GIS tools read a region by its tiles.
TILE = 512


class NotForTifffile(Exception):
    """This file is for Pillow: tifffile is missing or does not read its layout here."""


@dataclass(frozen=True)
class _Layout:
    samples: int
    alpha: int | None  # the sample that is alpha (extra sample 1 or 2: associated, unassociated)

    @property
    def bands(self) -> int:
        return self.samples - (self.alpha is not None)


def _layout(page) -> _Layout:
    """The layout of the first page, if `read_tiff` reads it; else NotForTifffile."""
    try:
        samples = page.samplesperpixel
        colour = {1: 1, 2: 3}.get(int(page.photometric))  # MINISBLACK: grey or bands; RGB
        extras = tuple(page.extrasamples or ())
        readable = (
            colour is not None
            and samples >= colour
            and page.dtype is not None
            and page.dtype.kind in "uif"
            and page.imagedepth == 1
            and int(page.tags.valueof(274, 1)) == 1  # orientation: Pillow applies it
        )
    except (tifffile.TiffFileError, ValueError, TypeError, KeyError, IndexError) as e:
        raise NotForTifffile(str(e)) from e
    if not readable:
        raise NotForTifffile(f"layout {page.photometric!r} x{samples} {page.dtype}")
    try:
        tifffile.TIFF.DECOMPRESSORS[page.compression]
    except KeyError as e:  # a codec neither tifffile nor imagecodecs has; Pillow may
        raise NotForTifffile(f"compression {page.compression.name}") from e
    # The first extra sample is alpha when the file says so (1, 2). GDAL marks other bands
    # (near-infrared, ...) as unspecified (0): they are bands.
    alpha = colour if samples > colour and extras and int(extras[0]) in (1, 2) else None
    return _Layout(samples, alpha)


def _page(tif):
    page = tif.pages.first
    _layout(page)
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


def file_nodata(page) -> float | None:
    """The GDAL_NODATA tag (42113, ASCII) as a number; None without one."""
    text = page.tags.valueof(42113)
    if text is None:
        return None
    try:
        return float(str(text).strip().strip("\x00"))
    except ValueError:
        return None


@dataclass
class TiffPixels:
    """A TIFF's pixels as stored: ``pixels`` (h, w, bands) in the file's dtype, alpha taken out;
    ``missing`` where alpha == 0 (None without alpha); ``nodata`` the file's GDAL_NODATA."""

    pixels: np.ndarray
    missing: np.ndarray | None
    nodata: float | None


def read_tiff(path: Path, *, max_pixels: int | None) -> TiffPixels:
    """The first page's pixels, decoded tile by tile (or strip by strip) into their arrays.

    Over ``max_pixels`` (the decompression-bomb limit; None: none) the image is refused
    before any pixel is read. NotForTifffile: read it with Pillow instead. InputImageError:
    a broken file.
    """
    with _open(path) as tif:
        page = tif.pages.first
        lay = _layout(page)
        h, w = page.imagelength, page.imagewidth
        if max_pixels is not None and h * w > max_pixels:
            raise too_many_pixels(f"{h * w:,} pixels", max_pixels)
        pixels = np.zeros((h, w, lay.bands), page.dtype.newbyteorder("="))  # zeros: where a file leaves a segment out
        missing = np.zeros((h, w), bool) if lay.alpha is not None else None
        a = lay.alpha
        try:
            for data, index, _ in page.segments(maxworkers=DECODE_THREADS):
                # index: (separate sample, depth, y, x, contig sample); tiles come padded to
                # full tile size at the right and bottom edges.
                if data is None:  # a segment the file leaves out: zeros, as tifffile reads it
                    continue
                s, y, x = index[0], index[2], index[3]
                seg = data[0, : h - y, : w - x]
                sh, sw = seg.shape[:2]
                if seg.shape[2] == lay.samples:  # interleaved: every sample
                    if a is None:
                        pixels[y : y + sh, x : x + sw] = seg
                    else:
                        pixels[y : y + sh, x : x + sw, :a] = seg[..., :a]
                        pixels[y : y + sh, x : x + sw, a:] = seg[..., a + 1 :]
                        missing[y : y + sh, x : x + sw] = seg[..., a] == 0
                elif s == a:  # planar: one sample a segment
                    missing[y : y + sh, x : x + sw] = seg[..., 0] == 0
                else:
                    pixels[y : y + sh, x : x + sw, s - (a is not None and s > a)] = seg[..., 0]
        except (ValueError, IndexError, KeyError, EOFError, OSError, RuntimeError, zlib.error) as e:
            # A truncated or corrupt file; left to Pillow, it would fail the same way.
            raise InputImageError(f"cannot decode: {e}") from e
        return TiffPixels(pixels, missing, file_nodata(page))


def write_tiff(
    f,
    pixels: np.ndarray,
    *,
    palette: list[tuple[int, int, int]] | None = None,
    description: str = "",
    threads: int = 1,
    extratags: tuple = (),
) -> None:
    """Write ``pixels`` to the binary file ``f`` as a tiled TIFF (`TILE`^2 tiles, deflate level
    1, the horizontal predictor): (h, w) uint8 as greyscale, or as palette indices when
    ``palette`` is given; (h, w, 3) uint8 as RGB. ``threads`` compress tiles at once; tifffile
    writes them in order, one tile's bytes at a time. BigTIFF past 4 GB. ``extratags``: tifffile
    extratags entries (the input's GeoTIFF tags, `georef.read_georef`; GDAL_NODATA).
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
        extratags=list(extratags), **kwargs,
    )
