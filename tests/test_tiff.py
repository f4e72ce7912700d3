"""TIFF inputs through tifffile: the same arrays as Pillow's path, tile by tile, and Pillow for the rest."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

import tilerun.tiff
from tilerun.errors import InputImageError
from tilerun.images import InputItem, image_size, load_image, set_max_pixels
from tilerun.tiff import NotForTifffile, read_tiff

from cli_fixtures import model_file, run_cli  # noqa: F401  (fixtures)


def _item(path: Path) -> InputItem:
    return InputItem(path, Path(path.name))


def _pillow_load(path: Path, monkeypatch) -> tuple[np.ndarray, np.ndarray]:
    with monkeypatch.context() as mp:
        mp.setattr(tilerun.tiff, "tifffile", None)  # as without the extra
        return load_image(_item(path))


def _pixels(shape, dtype, seed=0) -> np.ndarray:
    hi = 65536 if dtype == np.uint16 else 256
    return np.random.default_rng(seed).integers(0, hi, shape, dtype=np.int64).astype(dtype)


LAYOUTS = {
    "rgb8": ((37, 53, 3), np.uint8, "rgb"),
    "rgba8": ((37, 53, 4), np.uint8, "rgb"),
    "grey8": ((37, 53), np.uint8, "minisblack"),
    "grey-alpha8": ((37, 53, 2), np.uint8, "minisblack"),
    "grey16": ((37, 53), np.uint16, "minisblack"),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("tiling", [{"tile": (16, 32)}, {"rowsperstrip": 5}], ids=["tiled", "strips"])
@pytest.mark.parametrize("compression", [None, "zlib"])
def test_same_arrays_as_pillows_path(tmp_path, monkeypatch, layout, tiling, compression):
    shape, dtype, photometric = LAYOUTS[layout]
    data = _pixels(shape, dtype)
    if len(shape) == 3 and shape[2] in (2, 4):
        data[::3, ::5, -1] = 0  # some transparent pixels: missing
    path = tmp_path / f"{layout}.tif"
    extra = {"extrasamples": ["unassalpha"]} if len(shape) == 3 and shape[2] in (2, 4) else {}
    tifffile.imwrite(path, data, photometric=photometric, compression=compression, **tiling, **extra)

    calls = []
    monkeypatch.setattr(tilerun.images, "read_tiff", lambda *a, **k: calls.append(1) or read_tiff(*a, **k))
    rgb, mask = load_image(_item(path))
    assert calls, "tifffile's path did not run"
    ref_rgb, ref_mask = _pillow_load(path, monkeypatch)
    np.testing.assert_array_equal(rgb, ref_rgb)
    np.testing.assert_array_equal(mask, ref_mask)
    assert rgb.dtype == np.uint8 and rgb.shape == (37, 53, 3) and mask.any() == bool(extra)
    assert image_size(_item(path)) == (37, 53)


@pytest.mark.parametrize("compression", ["packbits", "tiff_adobe_deflate", "raw"])
def test_tiffs_that_pillow_wrote(tmp_path, monkeypatch, compression):
    data = _pixels((41, 29, 4), np.uint8)
    data[::4, ::3, 3] = 0
    path = tmp_path / "p.tif"
    Image.fromarray(data, "RGBA").save(path, compression=compression)
    with tifffile.TiffFile(path) as tif:
        tilerun.tiff._page(tif)  # ours to read
    rgb, mask = load_image(_item(path))
    ref_rgb, ref_mask = _pillow_load(path, monkeypatch)
    np.testing.assert_array_equal(rgb, ref_rgb)
    np.testing.assert_array_equal(mask, ref_mask)
    assert mask.any()


def test_sixteen_bit_rgb_rounds_like_the_grey_path(tmp_path):
    """Pillow reads 16-bit RGB TIFFs as 8-bit by itself; ours keeps 16 bits: with --input-range 0,65535
    a value v is round(v * 255 / 65535), as for 16-bit grey."""
    from tilerun.images import set_radiometry
    from tilerun.radiometry import RadiometrySpec

    data = np.array([[[0, 128, 129], [65535, 385, 386]]], np.uint16)
    path = tmp_path / "rgb16.tif"
    tifffile.imwrite(path, data, photometric="rgb", tile=(16, 16))
    set_radiometry(RadiometrySpec(input_range=(0, 65535)))
    try:
        rgb, _ = load_image(_item(path))
    finally:
        set_radiometry(RadiometrySpec())
    np.testing.assert_array_equal(rgb, np.round(data * (255 / 65535)).astype(np.uint8))


def test_lzw_through_imagecodecs_gives_pillows_pixels(tmp_path, monkeypatch):
    data = _pixels((20, 30, 3), np.uint8)
    Image.fromarray(data).save(tmp_path / "lzw.tif", compression="tiff_lzw")
    with tifffile.TiffFile(tmp_path / "lzw.tif") as tif:
        tilerun.tiff._page(tif)  # ours to read: tifffile decodes LZW with imagecodecs
    np.testing.assert_array_equal(load_image(_item(tmp_path / "lzw.tif"))[0], data)
    np.testing.assert_array_equal(_pillow_load(tmp_path / "lzw.tif", monkeypatch)[0], data)


@pytest.mark.parametrize("kind", ["orientation", "cmyk"])
def test_other_tiffs_go_to_pillow(tmp_path, monkeypatch, kind):
    data = _pixels((20, 30, 3), np.uint8)
    path = tmp_path / f"{kind}.tif"
    if kind == "orientation":  # 6: rotated 90 degrees; Pillow applies it
        tifffile.imwrite(path, data, photometric="rgb", extratags=[(274, "H", 1, 6, True)])
        shape = (30, 20)
    else:
        Image.fromarray(data).convert("CMYK").save(path)
        shape = (20, 30)
    with tifffile.TiffFile(path) as tif, pytest.raises(NotForTifffile):
        tilerun.tiff._page(tif)
    rgb, mask = load_image(_item(path))
    assert rgb.shape == (*shape, 3) and not mask.any()
    assert image_size(_item(path)) == shape
    np.testing.assert_array_equal(rgb, _pillow_load(path, monkeypatch)[0])


def test_the_pixel_limit_holds_before_any_pixel_is_read(tmp_path):
    path = tmp_path / "big.tif"
    tifffile.imwrite(path, _pixels((40, 50, 3), np.uint8), photometric="rgb", tile=(16, 16))
    before = Image.MAX_IMAGE_PIXELS
    try:
        set_max_pixels(1999)
        with pytest.raises(InputImageError, match=r"2,000 pixels.*limit of 1,999.*--max-pixels"):
            load_image(_item(path))
        set_max_pixels(2000)
        assert load_image(_item(path))[0].shape == (40, 50, 3)
    finally:
        Image.MAX_IMAGE_PIXELS = before


def test_a_truncated_tiff_is_one_reason(tmp_path):
    path = tmp_path / "cut.tif"
    tifffile.imwrite(path, _pixels((64, 64, 3), np.uint8), photometric="rgb", compression="zlib", tile=(16, 16))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(InputImageError):
        load_image(_item(path))


def test_the_cli_writes_for_a_tiled_tiff_what_it_writes_for_the_same_png(tmp_path, run_cli):
    data = _pixels((150, 130, 4), np.uint8, seed=5)
    data[40:60, 30:90, 3] = 0  # a hole
    (tmp_path / "tif").mkdir()
    (tmp_path / "png").mkdir()
    tifffile.imwrite(tmp_path / "tif" / "x.tif", data, photometric="rgb", extrasamples=["unassalpha"],
                     tile=(64, 48), compression="zlib")
    Image.fromarray(data, "RGBA").save(tmp_path / "png" / "x.png")
    for kind in ("tif", "png"):
        r = run_cli(tmp_path / kind, tmp_path / f"out-{kind}")
        assert r.exit_code == 0, r.output
    for name in ("x.pred.png", "x.inpainted.png"):
        a, b = (np.asarray(Image.open(tmp_path / f"out-{k}" / name)) for k in ("tif", "png"))
        np.testing.assert_array_equal(a, b)



# -- outputs ------------------------------------------------------------------------------------------


def test_format_tiff_writes_the_same_pixels_and_palette_as_png_and_resumes(tmp_path, run_cli):
    root = tmp_path / "in"
    root.mkdir()
    for i, (h, w) in enumerate([(150, 130), (64, 77)]):
        data = _pixels((h, w, 3), np.uint8, seed=i)
        Image.fromarray(data).save(root / f"x{i}.png")
        Image.fromarray(((np.arange(h * w).reshape(h, w) % 7 == 0) * 255).astype(np.uint8)).save(root / f"x{i}.mask.png")
    assert run_cli(root, tmp_path / "png").exit_code == 0
    r = run_cli(root, tmp_path / "tif", "--format", "tiff", "--preview")
    assert r.exit_code == 0, r.output
    for i in range(2):
        for kind in ("pred", "inpainted"):
            with Image.open(tmp_path / "png" / f"x{i}.{kind}.png") as p, Image.open(tmp_path / "tif" / f"x{i}.{kind}.tif") as t:
                assert t.mode == p.mode  # P for the class map, RGB for the inpainting
                np.testing.assert_array_equal(np.asarray(t), np.asarray(p))
                if kind == "pred":
                    assert t.getpalette()[:48] == p.getpalette()[:48]
            with tifffile.TiffFile(tmp_path / "tif" / f"x{i}.{kind}.tif") as tif:
                assert tif.pages.first.is_tiled
        assert (tmp_path / "tif" / f"x{i}.preview.png").exists()
    # Resumed from the stamps in the TIFFs; and never read back as inputs.
    again = run_cli(root, tmp_path / "tif", "--format", "tiff")
    assert again.exit_code == 0 and "2 skipped" in again.output, again.output
    from tilerun.images import find_inputs

    assert find_inputs(tmp_path / "tif") == []


def test_write_tiff_atomic_round_trip_with_text(tmp_path):
    from tilerun.images import read_output_text, write_tiff_atomic

    classes = _pixels((600, 530), np.uint8) % 3  # past one 512 tile both ways
    write_tiff_atomic(classes, tmp_path / "c.pred.tif", palette=[(255, 0, 0), (0, 255, 0), (0, 0, 255)],
                      text={"tilerun": '{"digest": "x"}'}, threads=2)
    with Image.open(tmp_path / "c.pred.tif") as im:
        np.testing.assert_array_equal(np.asarray(im), classes)
        np.testing.assert_array_equal(np.asarray(im.convert("RGB"))[0, 0], [[255, 0, 0], [0, 255, 0], [0, 0, 255]][classes[0, 0]])
    assert read_output_text(tmp_path / "c.pred.tif", "tilerun") == '{"digest": "x"}'
    assert read_output_text(tmp_path / "c.pred.tif", "other") is None


def test_format_tiff_without_tifffile_is_a_usage_error(tmp_path, run_cli, monkeypatch):
    Image.fromarray(_pixels((20, 20, 3), np.uint8)).save(tmp_path / "a.png")
    monkeypatch.setattr(tilerun.tiff, "tifffile", None)
    r = run_cli(tmp_path / "a.png", tmp_path / "out", "--format", "tiff")
    assert r.exit_code == 2 and "pip install tilerun[tiff]" in r.output
