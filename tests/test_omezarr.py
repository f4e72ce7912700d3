"""`run --format ome-zarr`: NGFF 0.4 image + label image, read back by zarr and ome-zarr-py."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from cli_fixtures import model_file, run_cli  # noqa: F401  (fixtures)

zarr = pytest.importorskip("zarr", reason="OME-Zarr outputs need zarr (pip install tilerun[ome])")


@pytest.fixture(autouse=True)
def _level_zero():
    """`run --level` sets the process's level (`sources.set_level`); the CLI runs in-process here."""
    yield
    import tilerun.sources

    tilerun.sources.set_level()


def _photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rgba = np.full((h, w, 4), 255, np.uint8)
    rgba[..., :3] = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    rgba[30:50, 20:70, 3] = 0  # a hole
    return rgba


def test_ome_zarr_holds_the_png_pixels_with_pyramid_and_labels(tmp_path, run_cli, monkeypatch):
    import tilerun.omezarr as omezarr

    monkeypatch.setattr(omezarr, "CHUNK", 64)  # a pyramid on a small image: levels down to one 64^2 chunk
    (tmp_path / "in").mkdir()
    Image.fromarray(_photo(150, 200), "RGBA").save(tmp_path / "in" / "x.png")
    r = run_cli(tmp_path / "in", tmp_path / "png")
    assert r.exit_code == 0, r.output
    r = run_cli(tmp_path / "in", tmp_path / "oz", "--format", "ome-zarr")
    assert r.exit_code == 0, r.output
    out = tmp_path / "oz" / "x.inpainted.ome.zarr"
    assert not [p for p in (tmp_path / "oz").iterdir() if p.name.startswith(".x")]  # no temporary folder left

    root = zarr.open_group(str(out), mode="r")
    ms = root.attrs["multiscales"][0]
    assert ms["version"] == "0.4" and [a["name"] for a in ms["axes"]] == ["c", "y", "x"]
    assert [d["path"] for d in ms["datasets"]] == ["0", "1", "2"]  # 200 -> 100 -> 50 px
    rgb = np.moveaxis(np.asarray(root["0"]), 0, -1)
    pred = np.asarray(root["labels/pred/0"])
    np.testing.assert_array_equal(rgb, np.asarray(Image.open(tmp_path / "png" / "x.inpainted.png")))
    png_pred = Image.open(tmp_path / "png" / "x.pred.png")
    np.testing.assert_array_equal(pred, np.asarray(png_pred))
    assert root["1"].shape == (3, 75, 100) and root["labels/pred/2"].shape == (38, 50)
    np.testing.assert_array_equal(root["labels/pred/1"], pred[::2, ::2])  # nearest: classes stay classes
    lab = root["labels/pred"].attrs["image-label"]
    palette = np.asarray(png_pred.getpalette()).reshape(-1, 3)
    assert [c["rgba"][:3] for c in lab["colors"]] == palette[: len(lab["colors"])].tolist()
    assert root["labels"].attrs["labels"] == ["pred"]

    # ome-zarr-py, as napari's plugin reads it: the image's pyramid and its label.
    ome_zarr = pytest.importorskip("ome_zarr.reader", reason="ome-zarr-py reads the output as napari does")
    from ome_zarr.io import parse_url

    nodes = list(ome_zarr.Reader(parse_url(str(out)))())
    image = nodes[0]
    assert [tuple(d.shape) for d in image.data] == [(3, 150, 200), (3, 75, 100), (3, 38, 50)]
    np.testing.assert_array_equal(np.asarray(image.data[0]), np.moveaxis(rgb, -1, 0))
    label = [n for n in nodes if n.load(ome_zarr.Label)]
    assert label and np.array_equal(np.asarray(label[0].data[0]), pred)

    # Resume: the stamp in the groups' attributes says it is done.
    r = run_cli(tmp_path / "in", tmp_path / "oz", "--format", "ome-zarr")
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "oz" / "tilerun-report.json").read_text())
    assert [f["status"] for f in report["files"]] == ["skipped"]


def test_ome_zarr_output_is_written_without_a_full_size_array(tmp_path, monkeypatch):
    """The canvas's two outputs are zarr arrays written core by core, never numpy arrays of the image's size."""
    from tilerun.geometry import grid
    from tilerun.omezarr import OmeZarrCanvas, Plane, finish

    tiles = grid(300, 260, tile=64, halo=8)
    canvas = OmeZarrCanvas(300, 260, tiles, path=tmp_path / "y.inpainted.ome.zarr", chunk=64)
    assert isinstance(canvas.rgb, Plane) and isinstance(canvas.classes, Plane)
    want = np.random.default_rng(1).integers(0, 256, (300, 260, 3), dtype=np.uint8)
    header = {"tiles": [[t.index, True, True] for t in tiles]}
    arrays = []
    for t in tiles:
        arrays += [want[t.y0 : t.y1, t.x0 : t.x1, 0] % 7, want[t.y0 : t.y1, t.x0 : t.x1]]
    canvas.add(header, arrays)
    written = finish(canvas, palette=[(0, 0, 0)] * 7)
    assert written == [str(tmp_path / "y.inpainted.ome.zarr"), str(tmp_path / "y.inpainted.ome.zarr/labels/pred")]
    root = zarr.open_group(written[0], mode="r")
    np.testing.assert_array_equal(np.moveaxis(np.asarray(root["0"]), 0, -1), want)
    np.testing.assert_array_equal(np.asarray(root["labels/pred/0"]), want[..., 0] % 7)
    # Level 1 is the 2x2 mean of level 0, rounded.
    s = want[:300, :260].astype(np.uint16).reshape(150, 2, 130, 2, 3).sum((1, 3))
    np.testing.assert_array_equal(np.moveaxis(np.asarray(root["1"]), 0, -1), ((s + 2) // 4).astype(np.uint8))


def test_ome_zarr_scale_is_the_input_levels_pixel_size(tmp_path, run_cli):
    """A pyramidal TIFF read at --level 1 (0.5 µm/px there): the output's scales are in µm from 0.5."""
    tifffile = pytest.importorskip("tifffile", reason="pyramidal TIFF inputs need tifffile")
    (tmp_path / "in").mkdir()
    data = _photo(260, 240)
    with tifffile.TiffWriter(tmp_path / "in" / "p.tif") as w:
        w.write(data, tile=(64, 64), subifds=1, photometric="rgb", extrasamples=["unassalpha"],
                resolution=(1e4 / 0.25, 1e4 / 0.25), resolutionunit="CENTIMETER")
        w.write(data[::2, ::2], tile=(64, 64), subfiletype=1, photometric="rgb", extrasamples=["unassalpha"])
    r = run_cli(tmp_path / "in", tmp_path / "oz", "--format", "ome-zarr", "--level", "1")
    assert r.exit_code == 0, r.output
    root = zarr.open_group(str(tmp_path / "oz" / "p.inpainted.ome.zarr"), mode="r")
    ms = root.attrs["multiscales"][0]
    assert ms["axes"][1] == {"name": "y", "type": "space", "unit": "micrometer"}
    assert ms["datasets"][0]["coordinateTransformations"][0]["scale"] == [1.0, 0.5, 0.5]
    assert root["0"].shape == (3, 130, 120)
    label = root["labels/pred"].attrs["multiscales"][0]
    assert label["datasets"][0]["coordinateTransformations"][0]["scale"] == [0.5, 0.5]
