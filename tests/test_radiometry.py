"""Radiometry: the auto range is the same for any tiling, values map as documented, 16-bit PNGs keep 16 bits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from tilerun.errors import InputImageError
from tilerun.images import InputItem, load_image, set_max_pixels, set_radiometry
from tilerun.radiometry import (
    Histogram,
    Radiometry,
    RadiometrySpec,
    finish,
    histogram_for,
    resolve,
    to_uint8,
)


def _item(path: Path) -> InputItem:
    return InputItem(path, Path(path.name))


@pytest.fixture
def spec():
    """set_radiometry for one test, the defaults again after it."""
    yield set_radiometry
    set_radiometry(RadiometrySpec())


def _data(kind: str, shape, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "uint16":
        return rng.integers(0, 4096, shape).astype(np.uint16)
    if kind == "int16":
        return rng.integers(-3000, 3000, shape).astype(np.int16)
    if kind == "uint8":
        return rng.integers(0, 256, shape).astype(np.uint8)
    v = (rng.normal(300, 200, shape)).astype(np.float32 if kind == "float32" else np.float64)
    v[rng.random(shape) < 0.05] = np.nan
    v.flat[0] = -np.inf
    return v


def _cuts(draw, n: int) -> list[int]:
    inner = sorted(set(draw(st.lists(st.integers(1, n - 1), max_size=4))))
    return [0, *inner, n]


@settings(max_examples=25, deadline=None)
@given(data=st.data(), kind=st.sampled_from(["uint16", "int16", "float32", "float64", "uint8"]),
       bands=st.sampled_from([1, 3, 4]), seed=st.integers(0, 10))
def test_window_histograms_sum_to_the_whole_images_and_give_its_range(data, kind, bands, seed):
    h, w = 37, 29
    native = _data(kind, (h, w, bands) if bands > 1 else (h, w), seed)
    missing = np.random.default_rng(seed + 1).random((h, w)) < 0.1  # alpha / sidecar: not counted
    user = RadiometrySpec(input_range=(10, 3000) if kind == "uint8" else None, nodata=7.0)
    whole = histogram_for(user, dtype=native.dtype, n_bands=bands).add(native, missing)
    rows, cols = _cuts(data.draw, h), _cuts(data.draw, w)
    parts = []
    for y0, y1 in zip(rows, rows[1:]):
        for x0, x1 in zip(cols, cols[1:]):
            part = histogram_for(user, dtype=native.dtype, n_bands=bands)
            parts.append(part.add(native[y0:y1, x0:x1], missing[y0:y1, x0:x1]))
    summed = histogram_for(user, dtype=native.dtype, n_bands=bands)
    for part in reversed(parts):  # any order
        summed.merge(part)
    np.testing.assert_array_equal(summed.counts, whole.counts)
    a = finish(user, dtype=native.dtype, n_bands=bands, histogram=summed)
    b = resolve(user, native, missing=missing)
    assert a == b
    # Mapping is value by value: a window maps as the same pixels of the whole image.
    rgb, known = to_uint8(native, a[0])
    y0, y1, x0, x1 = rows[0], rows[1], cols[-2], cols[-1]
    wrgb, wknown = to_uint8(native[y0:y1, x0:x1], a[0])
    np.testing.assert_array_equal(wrgb, rgb[y0:y1, x0:x1])
    np.testing.assert_array_equal(wknown, known[y0:y1, x0:x1])


def test_integer_percentiles_are_exact_order_statistics():
    v = np.random.default_rng(0).integers(0, 65536, (101, 99)).astype(np.uint16)
    (r, note) = resolve(RadiometrySpec(), v)
    n = v.size
    s = np.sort(v.ravel())
    assert (r.low, r.high) == (s[int(np.floor(0.005 * (n - 1)))], s[int(np.ceil(0.995 * (n - 1)))])
    assert note["range_from"] == "auto 0.5-99.5%" and note["warnings"] == []


def test_float_range_ends_hold_the_true_percentiles_within_their_bin():
    v = np.random.default_rng(1).gamma(2.0, 150.0, (120, 130)).astype(np.float32)
    r, _ = resolve(RadiometrySpec(), v)
    s = np.sort(v.ravel()).astype(np.float64)
    lo, hi = s[int(np.floor(0.005 * (s.size - 1)))], s[int(np.ceil(0.995 * (s.size - 1)))]
    assert r.low <= lo <= r.low * (1 + 2**-11) and r.high * (1 - 2**-11) <= hi <= r.high


def test_values_map_by_the_range_and_missing_pixels_are_zero():
    v = np.array([[[0, 100, 200], [50, 50, 50]], [[np.nan, 1, 1], [-5, -5, -5]]], np.float32)
    rgb, known = to_uint8(v, Radiometry((1, 2, 3), 0.0, 200.0, nodata=-5))
    np.testing.assert_array_equal(rgb[0, 0], [0, 128, 255])  # round(100 * 255 / 200) = round(127.5): up
    np.testing.assert_array_equal(known, [[True, True], [False, False]])
    assert not rgb[1].any()
    grey, _ = to_uint8(np.array([[300, 5000]], np.uint16), Radiometry((1,), 300, 4395))
    np.testing.assert_array_equal(grey, [[[0, 0, 0], [255, 255, 255]]])
    picked, _ = to_uint8(np.arange(8, dtype=np.uint8).reshape(1, 2, 4), Radiometry((4, 3, 2), 0, 255))
    np.testing.assert_array_equal(picked, [[[3, 2, 1], [7, 6, 5]]])


def test_eight_bit_rgb_is_taken_as_it_is_without_a_copy():
    u8 = np.random.default_rng(2).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    r, note = resolve(RadiometrySpec(), u8)
    assert (r.low, r.high) == (0, 255) and note["range_from"] == "8-bit as is"
    rgb, known = to_uint8(u8, r)
    assert rgb is u8 and known.all()


def test_warnings_name_clipping_collapse_and_unused_bands():
    v = np.random.default_rng(3).integers(0, 4096, (50, 50, 4)).astype(np.uint16)
    _, note = resolve(RadiometrySpec(input_range=(0, 65535)), v)
    assert any(w.startswith("collapses: ") for w in note["warnings"])
    assert any("band 4 unused" in w and "--bands" in w for w in note["warnings"])
    _, note = resolve(RadiometrySpec(input_range=(1000, 2000), bands=(4, 3, 2)), v)
    assert [w[:6] for w in note["warnings"]] == ["clips:"]
    _, note = resolve(RadiometrySpec(), v[..., :3])
    assert note["warnings"] == []


# -- decoding -------------------------------------------------------------------------------------


def test_sixteen_bit_rgb_png_keeps_its_sixteen_bits(tmp_path, spec):
    import imagecodecs

    v = np.array([[[511, 0, 65535], [300, 1000, 40000]]], np.uint16)  # 511: Pillow's 8 bits say 1, ours 2
    (tmp_path / "rgb16.png").write_bytes(imagecodecs.png_encode(v))
    spec(RadiometrySpec(input_range=(0, 65535)))
    rgb, mask = load_image(_item(tmp_path / "rgb16.png"))
    np.testing.assert_array_equal(rgb, np.floor(v * (255 / 65535) + 0.5).astype(np.uint8))
    assert rgb[0, 0, 0] == 2 and not mask.any()


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA"])
def test_eight_bit_pngs_decode_to_pillows_bytes(tmp_path, mode, monkeypatch):
    import tilerun.images

    a = np.random.default_rng(4).integers(0, 256, (23, 17, len(mode)), dtype=np.uint8)
    if "A" in mode:
        a[::3, ::2, -1] = 0
    Image.fromarray(a.squeeze(), mode).save(tmp_path / "x.png")
    rgb, mask = load_image(_item(tmp_path / "x.png"))
    assert tilerun.images._read_png(tmp_path / "x.png") is not None  # imagecodecs' path
    monkeypatch.setattr(tilerun.images, "imagecodecs", None)  # Pillow's path, as before
    ref_rgb, ref_mask = load_image(_item(tmp_path / "x.png"))
    np.testing.assert_array_equal(rgb, ref_rgb)
    np.testing.assert_array_equal(mask, ref_mask)


def test_the_pixel_limit_holds_on_the_png_path(tmp_path):
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(tmp_path / "big.png")
    before = Image.MAX_IMAGE_PIXELS
    try:
        set_max_pixels(1999)
        with pytest.raises(InputImageError, match=r"2,000 pixels.*limit of 1,999"):
            load_image(_item(tmp_path / "big.png"))
    finally:
        Image.MAX_IMAGE_PIXELS = before


def test_multi_band_float_tiff_by_bands(tmp_path, spec):
    tifffile = pytest.importorskip("tifffile")
    rng = np.random.default_rng(5)
    v = rng.random((30, 40, 5)).astype(np.float32) * 1000
    tifffile.imwrite(tmp_path / "five.tif", v.transpose(2, 0, 1), photometric="minisblack", planarconfig="separate",
                     tile=(16, 16), compression="zlib")
    spec(RadiometrySpec(input_range=(0, 1000), bands=(5, 1, 3)))
    rgb, _ = load_image(_item(tmp_path / "five.tif"))
    want, _ = to_uint8(v, Radiometry((5, 1, 3), 0, 1000))
    np.testing.assert_array_equal(rgb, want)
    spec(RadiometrySpec(bands=(6,)))
    with pytest.raises(InputImageError, match="--bands 6: the image has 5 bands"):
        load_image(_item(tmp_path / "five.tif"))


def test_histogram_refuses_mixed_dtypes():
    h = Histogram(np.uint16)
    with pytest.raises(ValueError):
        h.add(np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError):
        h.merge(Histogram(np.int16))
