"""Part store layout: one file per chunk (`tilerun.parts`) vs one preallocated tiled file (np.memmap).

Usage: python bench/part_store_layout.py [--size 8192] [--tile 512] [--procs 4] [--repeats 3] [--dir DIR]

An image of size^2 in tiles of tile^2; ``procs`` processes each write every procs-th tile's
uint8 cores (class index + RGB: 4 bytes a pixel) into the store, at once; then one process
(the finisher) assembles the (h, w) and (h, w, 3) arrays the PNG encoder takes. Interleaved,
best of ``repeats``; the page cache is warm (what a finisher on the same node sees).

* chunk files: `PartStore.put` per tile (temporary name + rename), `PartStore.get` per tile;
* memmap: one file of tiles * tile^2 * 4 bytes, truncated to size by the finisher, each tile
  at its own offset (tile-major, so no two processes write one page), plus a marker file
  per tile (renamed into place) so that a rerun knows which tiles are complete.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from tilerun.parts import PartStore


def _cores(tile: int, i: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(i)
    return rng.integers(0, 16, (tile, tile), np.uint8), rng.integers(0, 256, (tile, tile, 3), np.uint8)


def write_chunks(root: Path, rank: int, procs: int, n: int, tile: int, start) -> None:
    store = PartStore.open(root, "big.png", digest="d")
    data = _cores(tile, rank)
    start.wait()
    for i in range(rank, n, procs):
        store.put(2, i, {"tiles": [[i, True, True]]}, data)


def write_memmap(root: Path, rank: int, procs: int, n: int, tile: int, start) -> None:
    per = tile * tile * 4
    mm = np.memmap(root / "big.tiles", np.uint8, "r+", shape=(n, per))
    cls, rgb = _cores(tile, rank)
    start.wait()
    for i in range(rank, n, procs):
        mm[i, : tile * tile] = cls.reshape(-1)
        mm[i, tile * tile :] = rgb.reshape(-1)
        marker = root / f".done-{i}.tmp"
        marker.write_bytes(b"")
        os.replace(marker, root / f"done-{i}")
    mm.flush()


def run(kind: str, root: Path, size: int, tile: int, procs: int) -> tuple[float, float, int]:
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    g = size // tile
    n = g * g
    if kind == "chunks":
        PartStore.prepare(root, "big.png", digest="d")
        target = write_chunks
    else:
        with open(root / "big.tiles", "wb") as f:
            f.truncate(n * tile * tile * 4)
        target = write_memmap
    ctx = mp.get_context("fork")
    start = ctx.Barrier(procs + 1)
    ps = [ctx.Process(target=target, args=(root, r, procs, n, tile, start)) for r in range(procs)]
    for p in ps:
        p.start()
    start.wait()
    t0 = time.perf_counter()
    for p in ps:
        p.join()
        assert p.exitcode == 0
    write_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    classes = np.empty((size, size), np.uint8)
    rgb = np.empty((size, size, 3), np.uint8)
    if kind == "chunks":
        store = PartStore.open(root, "big.png", digest="d")
        assert store.inventory() == {2: set(range(n))}
        for i in range(n):
            _, (c, r) = store.get(2, i)
            y, x = divmod(i, g)
            classes[y * tile : (y + 1) * tile, x * tile : (x + 1) * tile] = c
            rgb[y * tile : (y + 1) * tile, x * tile : (x + 1) * tile] = r
    else:
        assert len(list(root.glob("done-*"))) == n
        mm = np.memmap(root / "big.tiles", np.uint8, "r", shape=(n, tile * tile * 4))
        for i in range(n):
            y, x = divmod(i, g)
            classes[y * tile : (y + 1) * tile, x * tile : (x + 1) * tile] = mm[i, : tile * tile].reshape(tile, tile)
            rgb[y * tile : (y + 1) * tile, x * tile : (x + 1) * tile] = mm[i, tile * tile :].reshape(tile, tile, 3)
    assemble_s = time.perf_counter() - t0
    disk = sum(p.stat().st_blocks * 512 for p in root.rglob("*") if p.is_file())
    return write_s, assemble_s, disk


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--procs", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=a.dir) as td:
        best: dict[str, list[tuple[float, float, int]]] = {"chunks": [], "memmap": []}
        for _ in range(a.repeats):
            for kind in best:  # interleaved
                best[kind].append(run(kind, Path(td) / kind, a.size, a.tile, a.procs))
        mb = a.size * a.size * 4 / 1e6
        print(f"{a.size}^2 at tile {a.tile}, {a.procs} writers, {mb:.0f} MB of cores; best of {a.repeats}")
        print("| layout | write s (all writers) | write MB/s | assemble s | disk MB |")
        print("|---|---|---|---|---|")
        for kind, runs in best.items():
            w = min(r[0] for r in runs)
            s = min(r[1] for r in runs)
            print(f"| {kind} | {w:.2f} | {mb / w:.0f} | {s:.2f} | {runs[0][2] / 1e6:.0f} |")


if __name__ == "__main__":
    main()
