"""tilerun's PNG encoder: exact pixels back through Pillow and through zlib's own checks."""

from __future__ import annotations

import io
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from tilerun import png
from tilerun.png import write_png


def _encode(pixels: np.ndarray, **kw) -> bytes:
    f = io.BytesIO()
    write_png(f, pixels, **kw)
    return f.getvalue()


def _chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    out, pos = [], 8
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        tag, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n : pos + 12 + n])
        assert crc == zlib.crc32(body, zlib.crc32(tag)), tag
        out.append((tag, body))
        pos += 12 + n
    return out


@pytest.fixture(params=[1, 37, 10**9], ids=["strips-of-1-byte", "strips-of-37-bytes", "one-strip"])
def strip_bytes(request, monkeypatch):
    """Strips of one row each, of a few rows, and the whole image in one."""
    monkeypatch.setattr(png, "STRIP_BYTES", request.param)
    return request.param


@pytest.mark.parametrize("shape", [(1, 1, 3), (1, 1), (2, 1, 3), (7, 13, 3), (211, 97, 3), (211, 97), (1, 509, 3)])
def test_pixels_come_back_exactly(shape, strip_bytes):
    pixels = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    im = Image.open(io.BytesIO(_encode(pixels)))
    assert im.mode == ("RGB" if len(shape) == 3 else "L")
    np.testing.assert_array_equal(np.asarray(im), pixels)


def test_a_photo_like_gradient_comes_back_and_compresses():
    y, x = np.mgrid[:300, :400]
    pixels = np.dstack([(x + y) % 256, (2 * y) % 256, np.full_like(x, 7)]).astype(np.uint8)
    data = _encode(pixels)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), pixels)
    assert len(data) < pixels.nbytes / 3  # Huffman-coded: the up filter leaves three distinct bytes


def test_the_zlib_stream_is_whole_with_its_checksum(strip_bytes):
    """zlib checks the adler32 trailer, which the strips' sums were combined into."""
    pixels = np.random.default_rng(1).integers(0, 256, (50, 31, 3), dtype=np.uint8)
    idat = b"".join(body for tag, body in _chunks(_encode(pixels)) if tag == b"IDAT")
    raw = zlib.decompress(idat)  # raises on a wrong adler32 or a broken stream
    assert len(raw) == 50 * (1 + 31 * 3)
    broken = idat[:-4] + struct.pack(">I", struct.unpack(">I", idat[-4:])[0] ^ 1)
    with pytest.raises(zlib.error):
        zlib.decompress(broken)


def test_a_pool_writes_the_same_bytes(strip_bytes):
    pixels = np.random.default_rng(2).integers(0, 256, (120, 77, 3), dtype=np.uint8)
    with ThreadPoolExecutor(3) as pool:
        assert _encode(pixels, pool=pool) == _encode(pixels)


def test_palette_and_text():
    classes = np.random.default_rng(3).integers(0, 3, (40, 29), dtype=np.uint8)
    palette = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    im = Image.open(io.BytesIO(_encode(classes, palette=palette, text={"tilerun": "stamp é"})))
    assert im.mode == "P"
    assert im.info["tilerun"] == "stamp é"
    np.testing.assert_array_equal(np.asarray(im), classes)
    np.testing.assert_array_equal(np.asarray(im.convert("RGB")), np.array(palette, np.uint8)[classes])


@pytest.mark.parametrize(
    "pixels, kw, message",
    [
        (np.zeros((4, 4), np.float32), {}, "uint8"),
        (np.zeros((4, 4, 4), np.uint8), {}, r"\(h, w, 3\)"),
        (np.zeros((0, 4, 3), np.uint8), {}, "at least one pixel"),
        (np.zeros((4, 4), np.uint8), {"palette": [(0, 0, 0)] * 257}, "256"),
    ],
)
def test_bad_input_is_refused_with_the_reason(pixels, kw, message):
    with pytest.raises(ValueError, match=message):
        _encode(pixels, **kw)


def test_one_strip_images_go_through_libdeflate_with_the_same_pixels(monkeypatch):
    """An image of one strip is one libdeflate call; without imagecodecs, the stdlib's strips."""
    pytest.importorskip("imagecodecs", reason="libdeflate comes with imagecodecs")
    rng = np.random.default_rng(3)
    pixels = np.cumsum(rng.integers(0, 3, (120, 90, 3)), 0).astype(np.uint8)
    assert 120 <= png._rows_per_strip(pixels.reshape(120, -1))
    files = {}
    for name, codec in (("libdeflate", png._libdeflate), ("stdlib", None)):
        monkeypatch.setattr(png, "_libdeflate", codec)
        buf = io.BytesIO()
        png.write_png(buf, pixels)
        files[name] = buf.getvalue()
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(files[name]))), pixels)
    assert files["libdeflate"] != files["stdlib"]  # the other path was taken
    assert files["libdeflate"].count(b"IDAT") == 1
