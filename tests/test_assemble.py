"""Canvas and the per-process output writer."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from tilerun.assemble import Canvas, OutputWriter
from tilerun.geometry import grid


def chunk(tiles, ids, cls_img, rgb_img):
    header, arrays = {"tiles": []}, []
    for i in ids:
        t = tiles[i]
        header["tiles"].append([i, True, True])
        arrays += [cls_img[t.y0 : t.y1, t.x0 : t.x1], rgb_img[t.y0 : t.y1, t.x0 : t.x1]]
    return header, arrays


def test_canvas_fills_every_tile_in_any_order():
    tiles = grid(37, 53, tile=16, halo=4, stride=1)
    rng = np.random.default_rng(0)
    cls_img = rng.integers(0, 9, (37, 53), np.uint8)
    rgb_img = rng.integers(0, 256, (37, 53, 3), np.uint8)
    canvas = Canvas(37, 53, tiles)
    ids = list(range(len(tiles)))[::-1]
    for part in (ids[:2], ids[2:5], ids[5:]):
        canvas.add(*chunk(tiles, part, cls_img, rgb_img))
    assert canvas.filled == len(tiles) and canvas.error is None
    assert (canvas.classes == cls_img).all() and (canvas.rgb == rgb_img).all()


def test_canvas_keeps_the_first_error():
    tiles = grid(20, 20, tile=10, halo=0, stride=1)
    canvas = Canvas(20, 20, tiles)
    assert canvas.add({"error": "cannot decode", "tiles": [[0, 1, 1], [1, 1, 1]]}, []) == 2
    canvas.add({"error": "second", "tiles": [[2, 1, 1]]}, [])
    assert canvas.error == "cannot decode"


@pytest.mark.parametrize("encoders", [1, 3])
def test_writer_writes_in_order_and_counts(tmp_path, encoders):
    written = []
    lock = threading.Lock()

    def write(key, classes, rgb, strips):
        path = tmp_path / f"{key}.bin"
        path.write_bytes(classes.tobytes())
        with lock:
            written.append(key)
        return [str(path)]

    w = OutputWriter(write, encoders=encoders, max_pixels=250)
    for k in range(7):
        c = Canvas(10, 10, grid(10, 10, tile=10, halo=0, stride=1))
        c.classes = np.full((10, 10), k, np.uint8)
        w.submit(f"img{k}", c, seconds=1.0)
    results = w.close()
    assert [r[0] for r in results] == [f"img{k}" for k in range(7)]
    assert all(r[2] is None and r[3] >= 1.0 for r in results)
    assert sorted(written) == sorted(f"img{k}" for k in range(7))
    assert w.images_written == 7 and w.bytes_written == 700


def test_writer_reports_an_unwritable_output(tmp_path):
    def write(key, classes, rgb, strips):
        raise PermissionError(13, "Permission denied")

    w = OutputWriter(write)
    c = Canvas(4, 4, grid(4, 4, tile=4, halo=0, stride=1))
    w.submit("x", c)
    [(key, outputs, error, _)] = w.close()
    assert outputs is None and "cannot write output" in error and w.images_written == 0
