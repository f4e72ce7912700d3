"""Canvas and the per-process output writer."""

from __future__ import annotations

import threading
import time

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


def test_canvas_rows_are_final_above_the_first_open_tile():
    """Chunks come in the plan's order (grouped by window shape), not row by row."""
    tiles = grid(30, 30, tile=10, halo=3, stride=1)  # 3 bands of 3 tiles
    rng = np.random.default_rng(1)
    cls_img, rgb_img = rng.integers(0, 9, (30, 30), np.uint8), rng.integers(0, 256, (30, 30, 3), np.uint8)
    canvas = Canvas(30, 30, tiles)
    seen = []
    for part in ([8, 0], [2, 1], [4, 3, 5], [6, 7]):
        canvas.add(*chunk(tiles, part, cls_img, rgb_img))
        seen.append(canvas.rows_done)
    assert seen == [0, 10, 20, 30]


def test_canvas_wait_rows_wakes_on_rows_error_and_abort():
    from tilerun.assemble import CanvasAborted

    tiles = grid(20, 10, tile=10, halo=0, stride=1)
    cls_img, rgb_img = np.ones((20, 10), np.uint8), np.ones((20, 10, 3), np.uint8)
    canvas = Canvas(20, 10, tiles)
    got = []
    waiter = threading.Thread(target=lambda: (canvas.wait_rows(10), got.append(canvas.rows_done)))
    waiter.start()
    canvas.add(*chunk(tiles, [0], cls_img, rgb_img))
    waiter.join(5)
    assert got == [10]
    failed = Canvas(20, 10, tiles)
    failed.add({"error": "cannot decode", "tiles": [[0, 1, 1]]}, [])
    with pytest.raises(CanvasAborted, match="cannot decode"):
        failed.wait_rows(1)
    stopped = Canvas(20, 10, tiles)
    threading.Timer(0.05, stopped.abort).start()
    with pytest.raises(CanvasAborted):
        stopped.wait_started()


def test_streaming_png_equals_a_complete_one(tmp_path):
    """An image encoded while its chunks arrive has the bytes of one encoded when complete."""
    from concurrent.futures import ThreadPoolExecutor

    from tilerun.images import write_png_atomic

    h, w = 700, 300  # several PNG strips (png.STRIP_BYTES is lowered below)
    tiles = grid(h, w, tile=100, halo=8, stride=1)
    rng = np.random.default_rng(2)
    cls_img = rng.integers(0, 5, (h, w), np.uint8)
    rgb_img = np.cumsum(rng.integers(0, 3, (h, w, 3)), 0).astype(np.uint8)

    def write(key, classes, rgb, strips, ready=None):
        out = []
        for kind, px in (("pred", classes), ("inpainted", rgb)):
            path = tmp_path / f"{key}.{kind}.png"
            write_png_atomic(px, path, pool=strips, ready=ready)
            out.append(str(path))
        return out

    import tilerun.png as png

    keep, png.STRIP_BYTES = png.STRIP_BYTES, 20_000
    try:
        with ThreadPoolExecutor(2) as strips:
            write("whole", cls_img, rgb_img, strips)
        writer = OutputWriter(write)
        canvas = Canvas(h, w, tiles)
        writer.submit("streamed", canvas, streaming=True, wide=True)
        order = sorted(range(len(tiles)), key=lambda i: (tiles[i].window_shape, i))  # as the plan claims them
        for k in range(0, len(order), 4):
            canvas.add(*chunk(tiles, order[k : k + 4], cls_img, rgb_img))
            time.sleep(0.02)  # the encoder runs meanwhile, on the rows final so far
        [(key, outputs, error, _)] = writer.close()
    finally:
        png.STRIP_BYTES = keep
    assert error is None and key == "streamed"
    for kind in ("pred", "inpainted"):
        assert (tmp_path / f"streamed.{kind}.png").read_bytes() == (tmp_path / f"whole.{kind}.png").read_bytes()


def test_streaming_write_of_a_failed_image_leaves_nothing(tmp_path):
    from tilerun.images import write_png_atomic

    tiles = grid(40, 10, tile=10, halo=0, stride=1)
    cls_img, rgb_img = np.ones((40, 10), np.uint8), np.ones((40, 10, 3), np.uint8)

    def write(key, classes, rgb, strips, ready=None):
        write_png_atomic(rgb, tmp_path / f"{key}.png", ready=ready)
        return [str(tmp_path / f"{key}.png")]

    writer = OutputWriter(write)
    canvas = Canvas(40, 10, tiles)
    writer.submit("broken", canvas, streaming=True)
    canvas.add(*chunk(tiles, [0, 1], cls_img, rgb_img))
    canvas.add({"error": "rank 1 could not decode it", "tiles": [[2, 1, 1]]}, [])
    assert writer.close() == []  # its finisher reports the failure, not the writer
    assert list(tmp_path.iterdir()) == [] and writer.images_written == 0
