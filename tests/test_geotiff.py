"""GeoTIFF in, georeferenced TIFF out; 12-bit, float and multi-band inputs through `tilerun run`.

Inputs are written by rasterio (GDAL's writer) and outputs reopened with it: a real GDAL
reader, as QGIS would read them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

rasterio = pytest.importorskip("rasterio", reason="GeoTIFF tests need rasterio (pip install -e .[dev])")
from rasterio.transform import Affine, from_origin  # noqa: E402

from cli_fixtures import model_file, run_cli  # noqa: E402,F401  (fixtures)

H, W = 96, 80
CRS = "EPSG:32633"


def _scene(seed: int = 0) -> np.ndarray:
    """An 8-bit picture with structure (smooth blobs), saturated at 0 and 255 on more than 0.5% of
    its pixels each: its auto range is then exactly its full range."""
    rng = np.random.default_rng(seed)
    small = rng.random((H // 8, W // 8, 3))
    big = np.kron(small, np.ones((8, 8, 1)))
    u8 = np.clip(big * 300 - 20 + rng.normal(0, 6, big.shape), 0, 255).round().astype(np.uint8)
    u8[:2, :, :] = 0
    u8[-2:, :, :] = 255
    return u8


def _write_geotiff(path: Path, bands_first: np.ndarray, *, transform, nodata=None) -> Path:
    count, h, w = bands_first.shape
    with rasterio.open(path, "w", driver="GTiff", width=w, height=h, count=count, dtype=bands_first.dtype,
                       crs=CRS, transform=transform, nodata=nodata, tiled=True, blockxsize=32,
                       blockysize=32) as dst:
        dst.write(bands_first)
    return path


def _report(out: Path) -> dict:
    return {f["input"]: f for f in json.loads((out / "tilerun-report.json").read_text())["files"]}


def _agreement(a: Path, b: Path) -> float:
    return float((np.asarray(Image.open(a)) == np.asarray(Image.open(b))).mean())


TRANSFORMS = {
    "scale+tiepoint": from_origin(500000, 4200000, 10, 10),
    "rotated (ModelTransformation)": Affine(10, 2, 500000, 1, -10, 4200000),
}


@pytest.mark.parametrize("transform", TRANSFORMS.values(), ids=TRANSFORMS)
def test_tiff_outputs_have_the_inputs_crs_and_transform(tmp_path, run_cli, transform):
    data = (_scene().transpose(2, 0, 1).astype(np.float32) * 4.7 + 100)
    data[:, 40:50, 30:45] = -9999  # nodata
    (tmp_path / "in").mkdir()
    src = _write_geotiff(tmp_path / "in" / "scene.tif", data, transform=transform, nodata=-9999)
    r = run_cli(tmp_path / "in", tmp_path / "out", "--format", "tiff")
    assert r.exit_code == 0, r.output
    with rasterio.open(src) as s:
        crs, tr = s.crs, s.transform
    assert crs is not None and crs.to_epsg() == 32633
    for kind in ("pred", "inpainted"):
        with rasterio.open(tmp_path / "out" / f"scene.{kind}.tif") as o:
            assert o.crs == crs, kind
            assert o.transform == tr, kind
            assert (o.width, o.height) == (W, H)
            if kind == "pred":
                assert o.nodata == 255
                colours = o.colormap(1)
                pal = [tuple(c[:3]) for c in list(colours.values())[:4]]
                assert len(set(pal)) > 1  # the model's palette, not a blank table
            else:
                assert o.count == 3 and o.nodata is None
    note = _report(tmp_path / "out")["scene.tif"]["radiometry"]
    assert note["dtype"] == "float32" and note["bands"] == [1, 2, 3] and note["nodata"] == -9999
    assert note["range_from"].startswith("auto") and note["range"][0] == pytest.approx(100, rel=1e-3)


def test_float_and_12_bit_inputs_have_the_contrast_of_their_8_bit_version(tmp_path, run_cli):
    u8 = _scene(1)
    for d in ("png8", "png12", "float", "fixed"):
        (tmp_path / d).mkdir()
    Image.fromarray(u8).save(tmp_path / "png8" / "x.png")
    import imagecodecs

    # 12 bits in a 16-bit PNG: v = 16 * u8, values 0..4080.
    (tmp_path / "png12" / "x.png").write_bytes(imagecodecs.png_encode(u8.astype(np.uint16) * 16))
    _write_geotiff(tmp_path / "float" / "x.tif", u8.transpose(2, 0, 1).astype(np.float32) * 4.7 + 100,
                   transform=from_origin(0, 100, 1, 1))
    for d in ("png8", "png12", "float"):
        r = run_cli(tmp_path / d, tmp_path / f"out-{d}")
        assert r.exit_code == 0, r.output
    # --input-range 0,65535 (what tilerun did before: the dtype's full range): the 12-bit frame is dark.
    (tmp_path / "fixed" / "x.png").write_bytes((tmp_path / "png12" / "x.png").read_bytes())
    assert run_cli(tmp_path / "fixed", tmp_path / "out-fixed", "--input-range", "0,65535").exit_code == 0

    ref = tmp_path / "out-png8"
    # 12-bit: its auto range is 0..4080 exactly, so the pixels are the 8-bit ones: identical outputs.
    for kind in ("pred", "inpainted"):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out-png12" / f"x.{kind}.png")),
                                      np.asarray(Image.open(ref / f"x.{kind}.png")))
    # float: the range's ends are bin edges (within 0.05%): nearly every pixel maps alike.
    assert _agreement(tmp_path / "out-float" / "x.pred.png", ref / "x.pred.png") > 0.95
    a = np.asarray(Image.open(tmp_path / "out-float" / "x.inpainted.png")).astype(float).ravel()
    b = np.asarray(Image.open(ref / "x.inpainted.png")).astype(float).ravel()
    assert np.corrcoef(a, b)[0, 1] > 0.99
    assert _agreement(tmp_path / "out-fixed" / "x.pred.png", ref / "x.pred.png") < 0.8  # 0.53 measured
    fixed = _report(tmp_path / "out-fixed")["x.png"]["radiometry"]
    assert fixed["range"] == [0, 65535] and any(w.startswith("collapses") for w in fixed["warnings"])
    assert _report(tmp_path / "out-png12")["x.png"]["radiometry"]["range"] == [0, 4080]


def test_nodata_and_nan_are_missing_like_alpha(tmp_path, run_cli):
    """Pixels at the file's nodata, at --nodata, or NaN are filled as alpha = 0 pixels are: the
    same outputs as the 8-bit RGBA picture with those pixels transparent."""
    u8 = _scene(2)
    hole = np.zeros((H, W), bool)
    hole[30:50, 20:60] = True
    nan = np.zeros((H, W), bool)
    nan[70:75, 5:70] = True
    rgba = np.dstack([u8, np.where(hole | nan, 0, 255).astype(np.uint8)])
    for d in ("rgba", "tagged", "flag"):
        (tmp_path / d).mkdir()
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba" / "x.png")
    # 12-bit data (exact mapping back to u8, as above) with nodata 4095 and NaN in float32.
    data = u8.transpose(2, 0, 1).astype(np.float32) * 16
    data[:, hole] = 4095
    data[1, nan] = np.nan  # NaN in one band is enough
    _write_geotiff(tmp_path / "tagged" / "x.tif", data, transform=from_origin(0, 100, 1, 1), nodata=4095)
    _write_geotiff(tmp_path / "flag" / "x.tif", data, transform=from_origin(0, 100, 1, 1))  # no tag: --nodata
    assert run_cli(tmp_path / "rgba", tmp_path / "out-rgba").exit_code == 0
    assert run_cli(tmp_path / "tagged", tmp_path / "out-tagged", "--input-range", "0,4080").exit_code == 0
    r = run_cli(tmp_path / "flag", tmp_path / "out-flag", "--input-range", "0,4080", "--nodata", "4095")
    assert r.exit_code == 0, r.output
    for d in ("out-tagged", "out-flag"):
        for kind in ("pred", "inpainted"):
            np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / d / f"x.{kind}.png")),
                                          np.asarray(Image.open(tmp_path / "out-rgba" / f"x.{kind}.png")),
                                          err_msg=f"{d} {kind}")


def test_bands_pick_bands_and_unused_bands_are_warned_by_name(tmp_path, run_cli):
    u8 = _scene(3)
    rng = np.random.default_rng(9)
    nir = u8[..., 0]  # band 4 carries the picture's red
    data = np.stack([rng.integers(0, 4096, (H, W)), u8[..., 2].astype(np.int64) * 16,
                     u8[..., 1].astype(np.int64) * 16, nir.astype(np.int64) * 16]).astype(np.uint16)
    (tmp_path / "in").mkdir()
    (tmp_path / "ref").mkdir()
    _write_geotiff(tmp_path / "in" / "four.tif", data, transform=from_origin(0, 100, 1, 1))
    Image.fromarray(u8).save(tmp_path / "ref" / "four.png")

    plain = run_cli(tmp_path / "in", tmp_path / "out-plain")
    assert plain.exit_code == 0, plain.output
    assert "four.tif: 4 bands: using bands 1,2,3 as R,G,B; band 4 unused" in plain.output
    note = _report(tmp_path / "out-plain")["four.tif"]["radiometry"]
    assert note["bands"] == [1, 2, 3] and note["band_count"] == 4

    picked = run_cli(tmp_path / "in", tmp_path / "out-picked", "--bands", "4,3,2")
    assert picked.exit_code == 0, picked.output
    assert "band 4 unused" not in picked.output
    assert _report(tmp_path / "out-picked")["four.tif"]["radiometry"]["bands"] == [4, 3, 2]
    assert run_cli(tmp_path / "ref", tmp_path / "out-ref").exit_code == 0
    for kind in ("pred", "inpainted"):  # bands 4,3,2 are the picture's R, G, B times 16
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out-picked" / f"four.{kind}.png")),
                                      np.asarray(Image.open(tmp_path / "out-ref" / f"four.{kind}.png")))

    missing = run_cli(tmp_path / "in", tmp_path / "out-five", "--bands", "5,3,2")
    assert missing.exit_code == 1
    assert "four.tif" in missing.output and "--bands 5,3,2: the image has 4 bands" in missing.output


def test_bad_radiometry_flags_are_usage_errors(tmp_path, run_cli):
    Image.fromarray(_scene()).save(tmp_path / "a.png")
    for flags, says in ((["--input-range", "5"], "auto or MIN,MAX"), (["--input-range", "9,3"], "MIN < MAX"),
                        (["--bands", "1,2"], "one band (grey) or three"), (["--bands", "0,1,2"], "numbered from 1")):
        r = run_cli(tmp_path / "a.png", tmp_path / "out", *flags)
        assert r.exit_code == 2 and says in r.output, (flags, r.output)


def test_a_changed_input_range_is_not_resumed(tmp_path, run_cli):
    (tmp_path / "in").mkdir()
    Image.fromarray(_scene()).save(tmp_path / "in" / "a.png")
    assert run_cli(tmp_path / "in", tmp_path / "out").exit_code == 0
    again = run_cli(tmp_path / "in", tmp_path / "out", "--input-range", "10,200")
    assert again.exit_code == 2, again.output  # other settings: refused, naming them
    assert "radiometry" in again.output


def test_two_processes_give_one_process_bytes_ranges_and_warnings(tmp_path):
    """Real torchrun, 2 processes (the shipped model): the same auto ranges and output bytes as one
    process, whichever rank decoded an image; its radiometry and warnings reach rank 0's report."""
    import subprocess
    import sys

    from test_dist import _env

    u8 = _scene(4)
    (tmp_path / "in").mkdir()
    four = np.concatenate([u8.transpose(2, 0, 1).astype(np.uint16) * 16 + 7,
                           np.full((1, H, W), 1000, np.uint16)])
    _write_geotiff(tmp_path / "in" / "four.tif", four, transform=from_origin(500000, 4200000, 10, 10))
    _write_geotiff(tmp_path / "in" / "dem.tif", u8[None, :, :, 0].astype(np.float32) * 3.3 - 50,
                   transform=from_origin(500000, 4200000, 10, 10), nodata=-9999)
    outs = {}
    for nproc in (None, 2):
        out = tmp_path / f"out-{nproc}"
        launch = ([sys.executable, "-m", "tilerun"] if nproc is None else
                  [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                   "-m", "tilerun"])
        r = subprocess.run([*launch, "run", str(tmp_path / "in"), str(out), "--tile", "64", "--format", "tiff"],
                           capture_output=True, text=True, timeout=300, env=_env())
        assert r.returncode == 0, r.stderr
        assert r.stderr.count("four.tif: 4 bands: using bands 1,2,3") == 1, r.stderr
        outs[nproc] = out
    for name in ("four.pred.tif", "four.inpainted.tif", "dem.pred.tif", "dem.inpainted.tif"):
        assert (outs[None] / name).read_bytes() == (outs[2] / name).read_bytes(), name
    one, two = _report(outs[None]), _report(outs[2])
    for name in ("four.tif", "dem.tif"):
        assert two[name]["radiometry"] == one[name]["radiometry"] and one[name]["radiometry"]["range"]
    assert one["four.tif"]["radiometry"]["range"] == [7, 4087]
