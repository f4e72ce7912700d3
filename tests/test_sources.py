"""Inputs read window by window (`tilerun.sources`): the same bytes as a whole decode, pyramid
levels by --level / --mpp, zarr / OME-Zarr and OpenSlide readers, under torchrun too."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli_fixtures import model_file, run_cli  # noqa: F401  (fixtures)
from test_dist import run_tilerun

tifffile = pytest.importorskip("tifffile", reason="tiled TIFF inputs need tifffile (pip install tilerun[tiff])")

from tilerun.sources import LevelChoice, WindowedImage, open_source, windowed  # noqa: E402
from tilerun.images import find_inputs, load_image  # noqa: E402


@pytest.fixture(autouse=True)
def _level_zero():
    """`run --level` / `--mpp` set the process's level (`sources.set_level`); the CLI runs in-process here."""
    yield
    import tilerun.sources

    tilerun.sources.set_level()


def _pixels(shape, dtype, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, np.iinfo(dtype).max, shape, dtype=dtype, endpoint=True)


def _write(path: Path, data: np.ndarray, **kw) -> Path:
    spp = data.shape[2]
    extra = {"extrasamples": ["unassalpha"]} if spp in (2, 4) else {}
    tifffile.imwrite(path, data if spp > 1 else data[..., 0], photometric="rgb" if spp >= 3 else "minisblack",
                     compression="zlib", **extra, **kw)
    return path


def _scene(h: int, w: int, seed: int = 0) -> np.ndarray:
    """RGBA with structure a model can see (a real photo's crop, tiled) and a hole."""
    src = np.asarray(Image.open(Path(__file__).parent.parent / "sample_images" / "chelsea.png").convert("RGB"))
    rgb = np.tile(src, (-(-h // src.shape[0]), -(-w // src.shape[1]), 1))[:h, :w]
    rgba = np.dstack([rgb, np.full((h, w), 255, np.uint8)])
    rgba[40 + seed : 70, 30:110, 3] = 0
    return rgba


@pytest.mark.parametrize("dtype,spp", [(np.uint8, 3), (np.uint8, 4), (np.uint16, 1), (np.uint16, 2),
                                       (np.float32, 1), (np.float32, 3)])
def test_windows_are_the_whole_decodes_pixels(tmp_path, dtype, spp):
    """Radiometry included: 16-bit and float windows map by the auto range a whole decode finds."""
    if np.dtype(dtype).kind == "f":
        data = np.random.default_rng(0).normal(300.0, 90.0, (300, 270, spp)).astype(dtype)
        data[100:120, 10:40, 0] = np.nan  # missing, in the histogram's eyes too
    else:
        data = _pixels((300, 270, spp), dtype)
    if spp in (2, 4):
        data[50:90, 30:100, -1] = 0
    path = _write(tmp_path / "x.tif", data, tile=(64, 48))
    assert windowed(path)
    rgb, missing = load_image(find_inputs(path)[0])
    image = WindowedImage(open_source(path))
    assert image.shape == (300, 270, 3) and image.mask.shape == (300, 270)
    rng = np.random.default_rng(1)
    for _ in range(40):
        y0, x0 = rng.integers(0, 299), rng.integers(0, 269)
        y1, x1 = rng.integers(y0 + 1, 301), rng.integers(x0 + 1, 271)
        got_rgb, got_missing = image.read_window(y0, y1, x0, x1)
        np.testing.assert_array_equal(got_rgb, rgb[y0:y1, x0:x1])
        np.testing.assert_array_equal(got_missing, missing[y0:y1, x0:x1])
    np.testing.assert_array_equal(image.mask[10:20, 5:9], missing[10:20, 5:9])


def test_which_inputs_are_read_window_by_window(tmp_path):
    data = _pixels((64, 64, 3), np.uint8)
    assert windowed(_write(tmp_path / "tiled.tif", data, tile=(32, 32)))
    assert not windowed(_write(tmp_path / "strips.tif", data))  # decoded whole, as before
    Image.fromarray(data).save(tmp_path / "x.png")
    assert not windowed(tmp_path / "x.png")


def test_the_cli_writes_the_same_bytes_window_by_window(tmp_path, run_cli, monkeypatch):
    """A tiled TIFF (windows) and the same pixels as a strip TIFF (decoded whole): equal outputs,
    and the tiled one never goes through the whole decode."""
    import tilerun.work

    data = _scene(230, 300)
    for kind, kw in (("tiled", {"tile": (48, 64)}), ("strips", {"rowsperstrip": 16})):
        (tmp_path / kind).mkdir()
        _write(tmp_path / kind / "x.tif", data, **kw)
    r = run_cli(tmp_path / "strips", tmp_path / "out-strips")
    assert r.exit_code == 0, r.output

    def no_whole_decode(item, **kw):
        raise AssertionError(f"{item.path} decoded whole")

    monkeypatch.setattr(tilerun.work, "load_image", no_whole_decode)
    r = run_cli(tmp_path / "tiled", tmp_path / "out-tiled")
    assert r.exit_code == 0, r.output
    _same_pixels(tmp_path / "out-tiled", tmp_path / "out-strips")


def _same_pixels(a: Path, b: Path) -> None:
    """The outputs' pixels and palettes (their text stamps name their own input files)."""
    for name in ("x.pred.png", "x.inpainted.png"):
        ia, ib = Image.open(a / name), Image.open(b / name)
        assert ia.getpalette() == ib.getpalette(), name
        np.testing.assert_array_equal(np.asarray(ia), np.asarray(ib), err_msg=name)


def _pyramid(path: Path, data: np.ndarray, mpp: float = 0.25) -> list[np.ndarray]:
    levels = [data, data[::2, ::2], data[::4, ::4]]
    with tifffile.TiffWriter(path) as w:
        w.write(levels[0], tile=(64, 64), subifds=2, photometric="rgb", extrasamples=["unassalpha"],
                compression="zlib", resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
        for lv in levels[1:]:
            w.write(lv, tile=(64, 64), subfiletype=1, photometric="rgb", extrasamples=["unassalpha"],
                    compression="zlib")
    return levels


def test_pyramid_levels_by_level_and_by_mpp(tmp_path):
    levels = _pyramid(tmp_path / "p.tif", _scene(400, 360))
    for choice, level in ((LevelChoice(), 0), (LevelChoice(level=2), 2), (LevelChoice(mpp=0.5), 1),
                          (LevelChoice(mpp=0.7), 1), (LevelChoice(mpp=0.1), 0), (LevelChoice(mpp=5), 2)):
        src = open_source(tmp_path / "p.tif", choice=choice)
        assert src.level == level, choice
        assert src.mpp == pytest.approx(0.25 * 2**level)
        want = levels[level]
        np.testing.assert_array_equal(src.read(0, want.shape[0], 0, want.shape[1]), want)
    assert open_source(tmp_path / "p.tif").describe() == {
        "reader": "tifffile", "level": 0, "levels": 3, "size": [360, 400], "mpp": 0.25}


def test_the_cli_reads_the_chosen_level(tmp_path, run_cli):
    """--level 1 of a pyramid gives what the level's own pixels give as a PNG; a level the
    file lacks fails that file, naming --level."""
    (tmp_path / "in").mkdir()
    (tmp_path / "png").mkdir()
    levels = _pyramid(tmp_path / "in" / "p.tif", _scene(300, 280))
    Image.fromarray(levels[1], "RGBA").save(tmp_path / "png" / "p.png")
    r = run_cli(tmp_path / "png", tmp_path / "out-png")
    assert r.exit_code == 0, r.output
    r = run_cli(tmp_path / "in", tmp_path / "out-l1", "--level", "1")
    assert r.exit_code == 0, r.output
    for name in ("p.pred.png", "p.inpainted.png"):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out-l1" / name)),
                                      np.asarray(Image.open(tmp_path / "out-png" / name)))
    report = json.loads((tmp_path / "out-l1" / "tilerun-report.json").read_text())
    assert report["files"][0]["size"] == [140, 150]
    read = {"reader": "tifffile", "level": 1, "levels": 3, "size": [140, 150], "mpp": 0.5}
    assert report["files"][0]["read"] == read  # the report and the outputs record the level and its pixel size
    assert json.loads(Image.open(tmp_path / "out-l1" / "p.pred.png").info["tilerun.read"]) == read
    r = run_cli(tmp_path / "in", tmp_path / "out-l7", "--level", "7")
    assert r.exit_code == 1
    assert "--level 7" in json.loads((tmp_path / "out-l7" / "tilerun-report.json").read_text())["files"][0]["error"]


def test_torchrun_reads_windows_and_matches_a_whole_decode(tmp_path):
    """Two processes spread a tiled TIFF (pass 1 and pass 2 from windows): the bytes of one
    process decoding the same pixels whole."""
    data = _scene(260, 300, seed=3)
    for kind, kw in (("tiled", {"tile": (64, 64)}), ("strips", {"rowsperstrip": 32})):
        (tmp_path / kind).mkdir()
        _write(tmp_path / kind / "x.tif", data, **kw)
    r = run_tilerun([str(tmp_path / "strips"), str(tmp_path / "out-whole"), "--tile", "64"])
    assert r.returncode == 0, r.stderr
    r = run_tilerun([str(tmp_path / "tiled"), str(tmp_path / "out-win"), "--tile", "64"], nproc=2)
    assert r.returncode == 0, r.stderr
    assert "spread over 2 processes" in r.stderr, r.stderr
    _same_pixels(tmp_path / "out-win", tmp_path / "out-whole")


def test_ome_zarr_input_by_level(tmp_path, run_cli, monkeypatch):
    """An OME-Zarr written by `--format ome-zarr` is an input: its level 1 gives what that
    level's pixels give as a PNG."""
    zarr = pytest.importorskip("zarr", reason="zarr inputs need zarr (pip install tilerun[ome])")
    import tilerun.omezarr as omezarr

    monkeypatch.setattr(omezarr, "CHUNK", 64)
    (tmp_path / "in").mkdir()
    Image.fromarray(_scene(200, 230)).save(tmp_path / "in" / "s.png")
    r = run_cli(tmp_path / "in", tmp_path / "oz", "--format", "ome-zarr")
    assert r.exit_code == 0, r.output
    src = tmp_path / "zin" / "s.ome.zarr"
    shutil.copytree(tmp_path / "oz" / "s.inpainted.ome.zarr", src)
    level1 = np.moveaxis(np.asarray(zarr.open_group(str(src), mode="r")["1"]), 0, -1)
    source = open_source(src, choice=LevelChoice(level=1))
    assert (source.kind, source.level, source.height, source.width) == ("zarr", 1, 100, 115)
    np.testing.assert_array_equal(source.read(0, 100, 0, 115), level1)

    (tmp_path / "png").mkdir()
    Image.fromarray(level1).save(tmp_path / "png" / "s.ome.png")
    r = run_cli(tmp_path / "png", tmp_path / "out-png")
    assert r.exit_code == 0, r.output
    r = run_cli(tmp_path / "zin", tmp_path / "out-z", "--level", "1")
    assert r.exit_code == 0, r.output
    for name in ("s.ome.pred.png", "s.ome.inpainted.png"):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out-z" / name)),
                                      np.asarray(Image.open(tmp_path / "out-png" / name)))


def test_openslide_reads_the_windows_tifffile_reads(tmp_path):
    openslide = pytest.importorskip("openslide", reason="whole-slide inputs need openslide-python + openslide-bin")
    from tilerun.sources import SlideSource, TiffSource

    data = _scene(300, 280)[..., :3]
    path = tmp_path / "slide.tif"
    tifffile.imwrite(path, data, tile=(64, 64), photometric="rgb", compression="zlib",
                     resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
    assert openslide.OpenSlide.detect_format(str(path)) == "generic-tiff"
    slide, tiff = SlideSource(path, LevelChoice()), TiffSource(path, LevelChoice())
    assert (slide.height, slide.width) == (tiff.height, tiff.width) == (300, 280)
    for y0, y1, x0, x1 in ((0, 300, 0, 280), (17, 90, 33, 250), (250, 300, 200, 280)):
        rgb, missing = slide.window(y0, y1, x0, x1)
        np.testing.assert_array_equal(rgb, tiff.window(y0, y1, x0, x1)[0])
        assert not missing.any()


def test_inspect_input_says_what_run_reads(tmp_path):
    """`tilerun inspect INPUT`: levels and pixel sizes of a pyramid; CRS, nodata, dtype and
    range of a float GeoTIFF; the model form of the command is unchanged (tests/test_ux.py)."""
    from click.testing import CliRunner

    from tilerun.cli import main

    _pyramid(tmp_path / "p.tif", _scene(400, 360))
    r = CliRunner().invoke(main, ["inspect", str(tmp_path / "p.tif"), "--mpp", "0.5"])
    assert r.exit_code == 0, r.output
    assert "window by window (tifffile), level 1 (180x200)" in r.output
    for want in ("level 0          360x400, 0.25 µm/px", "level 2          90x100, 1 µm/px", "tiles 64x64",
                 "4 (rgb, last is alpha)", "uint8"):
        assert want in r.output, (want, r.output)

    dem = np.linspace(0, 1200, 50 * 40, dtype=np.float32).reshape(50, 40)
    dem[0, 0] = np.nan
    geokeys = (1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, 32633)
    tifffile.imwrite(tmp_path / "dem.tif", dem, extratags=[
        (33550, "d", 3, (30.0, 30.0, 0.0), True), (33922, "d", 6, (0, 0, 0, 500000.0, 4100000.0, 0), True),
        (34735, "H", len(geokeys), geokeys, True), (42113, "s", 0, "-9999", True)])
    r = CliRunner().invoke(main, ["inspect", str(tmp_path / "dem.tif")])
    assert r.exit_code == 0, r.output
    for want in ("EPSG:32633 (georeferenced: tie point + pixel scale)", "nodata           -9999", "float32",
                 "(1 NaN)", "..1200.0"):
        assert want in r.output, (want, r.output)


@pytest.mark.parametrize("fmt", ["png", "ome-zarr"])
def test_a_tile_that_cannot_be_decoded_fails_its_file_only(tmp_path, run_cli, fmt):
    """A corrupt tile is found while computing (windows are read then), not while loading:
    still one failed file with the reason, the others written, no temporary output left."""
    if fmt == "ome-zarr":
        pytest.importorskip("zarr", reason="OME-Zarr outputs need zarr")
    (tmp_path / "in").mkdir()
    _write(tmp_path / "in" / "bad.tif", _scene(200, 210), tile=(64, 64))
    _write(tmp_path / "in" / "good.tif", _scene(100, 90), tile=(64, 64))
    with tifffile.TiffFile(tmp_path / "in" / "bad.tif") as tif:
        offset, count = tif.pages.first.dataoffsets[5], tif.pages.first.databytecounts[5]
    with open(tmp_path / "in" / "bad.tif", "r+b") as f:
        f.seek(offset)
        f.write(b"\xff" * count)
    r = run_cli(tmp_path / "in", tmp_path / "out", "--format", fmt)
    assert r.exit_code == 1, r.output
    files = {f["input"]: f for f in json.loads((tmp_path / "out" / "tilerun-report.json").read_text())["files"]}
    assert files["good.tif"]["status"] == "ok"
    assert files["bad.tif"]["status"] == "failed" and "cannot decode tile 5" in files["bad.tif"]["error"]
    assert not [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".bad")]
    assert not [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith("bad")]


def test_a_slide_without_openslide_names_the_extra(tmp_path, monkeypatch):
    import tilerun.sources as sources
    from tilerun.errors import InputImageError
    from tilerun.images import InputItem, find_inputs, image_size

    tifffile.imwrite(tmp_path / "s.svs", _scene(64, 64)[..., :3], tile=(32, 32), photometric="rgb")
    assert [it.key for it in find_inputs(tmp_path)] == ["s.svs"]  # a slide is an input
    monkeypatch.setattr(sources, "_openslide", lambda: None)
    with pytest.raises(InputImageError, match=r"tilerun\[slide\]"):
        image_size(InputItem(tmp_path / "s.svs", Path("s.svs")))


def test_a_level_a_single_level_input_lacks_fails_it(tmp_path, run_cli):
    (tmp_path / "in").mkdir()
    Image.fromarray(_scene(64, 64)).save(tmp_path / "in" / "x.png")
    for option, reason in ((["--level", "1"], "--level 1"), (["--mpp", "0.5"], "records no pixel size")):
        r = run_cli(tmp_path / "in", tmp_path / f"out{option[0]}", *option)
        assert r.exit_code == 1, r.output
        report = json.loads((tmp_path / f"out{option[0]}" / "tilerun-report.json").read_text())
        assert reason in report["files"][0]["error"]


def test_windows_read_from_many_threads_at_once(tmp_path, monkeypatch):
    """Engine workers read windows concurrently: every one must be the file's pixels (a file
    position shared without a lock gave other tiles' bytes)."""
    from concurrent.futures import ThreadPoolExecutor

    import tilerun.sources as sources

    monkeypatch.setattr(sources, "CACHE_BYTES", 0)  # every window from the file
    data = _pixels((512, 512, 3), np.uint8, seed=4)
    path = _write(tmp_path / "x.tif", data, tile=(32, 32))
    image = WindowedImage(open_source(path))

    def check(seed: int) -> bool:
        rng = np.random.default_rng(seed)
        for _ in range(20):
            y0, x0 = rng.integers(0, 400, 2)
            if not np.array_equal(image.read_window(y0, y0 + 100, x0, x0 + 100)[0], data[y0 : y0 + 100, x0 : x0 + 100]):
                return False
        return True

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(check, range(16)))
