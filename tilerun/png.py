"""A PNG encoder for tilerun's outputs: numpy filters, the standard library's zlib, in strips.

Pillow's encoder tries all five PNG filters on every row and compresses the whole image in
one zlib stream on one thread: 1.1-1.4 s for a 4096^2 RGB output on this project's CPU, and
on a GPU host the encoders, not the card, set the pace (bench/end_to_end.py --device cuda). Here every row
gets the "up" filter (one numpy subtraction: a photo's rows resemble the row above), and
the image is compressed in strips that threads compress at once (zlib lets go of the
GIL). Each strip but the last ends in a full flush, on a byte boundary with no history,
so the strips' raw deflate streams concatenate into one valid stream, as pigz does; the
adler32 checksums combine by arithmetic. One thread: 0.3-0.6 s for that image; files 0-9%
larger than Pillow's on photos (python bench/host_probe.py).

An image of one strip (up to STRIP_BYTES, e.g. 1024^2 RGB) has nothing to split: it is
compressed in one call of libdeflate (through imagecodecs, when installed), which at level 1
takes 14 vs 32 ms for a 1024^2 photo, files 6% larger (python bench/png_codecs.py). libdeflate
ends its stream, so it cannot make the strips that concatenate.

Lossless like any PNG: every decoder reads back the exact pixels (tests).
"""

from __future__ import annotations

import struct
import zlib
from collections import deque
from concurrent.futures import Executor, Future
from typing import BinaryIO, Callable, Iterator

import numpy as np

__all__ = ["write_png"]

try:  # libdeflate, for images of one strip (see above)
    from imagecodecs import deflate_encode as _libdeflate
except ImportError:  # pragma: no cover - imagecodecs is a dependency; the stdlib path stays complete
    _libdeflate = None

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: Raw bytes a strip holds at most: the work unit of a thread, and the memory each holds.
STRIP_BYTES = 8 * 2**20
_ADLER_BASE = 65521


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(tag)))


def _adler32_combine(a1: int, a2: int, len2: int) -> int:
    """adler32 of A + B from adler32(A), adler32(B) and len(B) (zlib's adler32_combine)."""
    rem = len2 % _ADLER_BASE
    s1 = a1 & 0xFFFF
    s2 = (rem * s1) % _ADLER_BASE
    s1 = (s1 + (a2 & 0xFFFF) + _ADLER_BASE - 1) % _ADLER_BASE
    s2 = (s2 + (a1 >> 16) + (a2 >> 16) + _ADLER_BASE - rem) % _ADLER_BASE
    return s1 | (s2 << 16)


def _filtered(rows: np.ndarray, above: np.ndarray | None) -> np.ndarray:
    """Rows (h, w*c) filtered "up" against the row ``above`` them (None: the image's first
    row, filtered against zeros), each led by its filter type byte."""
    h, n = rows.shape
    filtered = np.empty((h, n + 1), np.uint8)
    filtered[:, 0] = 2  # PNG filter type 2, "up": each byte minus the one above it, mod 256
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])
    if above is None:
        filtered[0, 1:] = rows[0]
    else:
        np.subtract(rows[0], above, out=filtered[0, 1:])
    return filtered


def _rows_per_strip(rows: np.ndarray) -> int:
    return max(1, STRIP_BYTES // rows.shape[1])


def _strip(rows: np.ndarray, above: np.ndarray | None, level: int, last: bool) -> tuple[bytes, int, int]:
    """Rows (h, w*c) filtered (`_filtered`) and compressed; with the filtered bytes' adler32 and length."""
    filtered = _filtered(rows, above)
    # zlib's run-length strategy: fewer bytes and faster than the default strategy (a 4096^2
    # photo filtered "up": 6.29 vs 7.51 MB, 0.35 vs 0.45 s on this project's CPU).
    z = zlib.compressobj(level, zlib.DEFLATED, -15, 9, zlib.Z_RLE)
    data = z.compress(filtered) + z.flush(zlib.Z_FINISH if last else zlib.Z_FULL_FLUSH)
    return data, zlib.adler32(filtered), filtered.size


def write_png(
    f: BinaryIO,
    pixels: np.ndarray,
    *,
    palette: list[tuple[int, int, int]] | None = None,
    text: dict[str, str] | None = None,
    level: int = 1,
    pool: Executor | None = None,
    ready: Callable[[int], None] | None = None,
) -> None:
    """Write ``pixels`` to ``f`` as a PNG: (h, w) uint8 as greyscale, or as palette indices
    when ``palette`` is given (RGB triples, at most 256); (h, w, 3) uint8 as RGB.

    ``text`` becomes tEXt chunks (Latin-1) before the image data, where a reader that stops at
    the header finds them. With ``pool``, strips are compressed on its threads; the output
    bytes are the same either way. ``ready(y)``: blocks until rows [0, y) of ``pixels`` are
    final (an image still being computed); each strip is compressed once its rows are.
    """
    if pixels.dtype != np.uint8 or not (pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[2] == 3)):
        raise ValueError(f"write_png takes uint8 (h, w) or (h, w, 3) pixels, got {pixels.dtype} {pixels.shape}")
    h, w = pixels.shape[:2]
    if h == 0 or w == 0:
        raise ValueError(f"a PNG needs at least one pixel, got {w}x{h}")
    colour = 2 if pixels.ndim == 3 else (3 if palette is not None else 0)
    f.write(_SIGNATURE)
    f.write(_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, colour, 0, 0, 0)))
    if palette is not None:
        if len(palette) > 256:
            raise ValueError(f"a PNG palette holds at most 256 colours, got {len(palette)}")
        # All 256 entries, as Pillow writes them: every index a decoder may meet has a colour.
        flat = bytes(c for rgb in palette for c in rgb)
        f.write(_chunk(b"PLTE", flat + bytes(768 - len(flat))))
    for key, value in (text or {}).items():
        f.write(_chunk(b"tEXt", key.encode("latin-1") + b"\0" + value.encode("latin-1")))
    rows = pixels.reshape(h, -1)
    if h <= _rows_per_strip(rows) and _libdeflate is not None:
        if ready is not None:
            ready(h)
        f.write(_chunk(b"IDAT", bytes(_libdeflate(_filtered(rows, None), level=level))))  # a whole zlib stream
    else:
        f.write(_chunk(b"IDAT", b"\x78\x01"))  # zlib header: deflate, 32 KiB window; data follows in more IDATs
        for data in _compressed_strips(rows, level, pool, ready):
            f.write(_chunk(b"IDAT", data))
    f.write(_chunk(b"IEND", b""))


def _compressed_strips(rows: np.ndarray, level: int, pool: Executor | None,
                       ready: Callable[[int], None] | None = None) -> Iterator[bytes]:
    """The image's deflate data, strip by strip, and last the zlib trailer (adler32).

    With ``pool``, up to twice its threads' strips are in flight; the waiting for rows
    (``ready``) happens here, never on the pool's threads, which another image may share.
    """
    h = rows.shape[0]
    per_strip = _rows_per_strip(rows)

    def job(y: int) -> tuple[bytes, int, int]:
        return _strip(rows[y : y + per_strip], rows[y - 1] if y else None, level, y + per_strip >= h)

    def results() -> Iterator[tuple[bytes, int, int]]:
        ahead: deque[Future] = deque()
        depth = 2 * getattr(pool, "_max_workers", 1)
        for y in range(0, h, per_strip):
            if ready is not None:
                ready(min(h, y + per_strip))
            if pool is None:
                yield job(y)
                continue
            ahead.append(pool.submit(job, y))
            while ahead and (ahead[0].done() or len(ahead) >= depth):
                yield ahead.popleft().result()
        while ahead:
            yield ahead.popleft().result()

    adler = 1
    for data, a, n in results():
        adler = _adler32_combine(adler, a, n)
        yield data
    yield struct.pack(">I", adler)
