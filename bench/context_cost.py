"""What the whole-image coarse context costs each of N processes, on a SIZE^2 photo.

    python bench/context_cost.py [--size 8192] [--procs 1,2,4,8] [--repeats 3]

The shipped weights' context: colour cells of 16 px, filled biharmonically, and class shares in
32-px cells. Two ways to get it, interleaved, best of ``repeats``:

* ``whole image``: `TileNet.coarse_context` reads every pixel. Every process of a spread image
  did that before pass 1 carried the cell sums.
* ``cells + fill``: pass 1 adds each tile core's cell sums (`TileNet.context_cells`) to the
  window it reads anyway; every process then adds the blocks of all chunks and fills the
  context from them (`Engine.reduce_partials`, `TileNet.context_of_cells`). With N processes,
  each computes the cells of 1/N of the cores, and the fill.

Prints both, the per-process time for each N, and the bytes per tile that the store carries
for the cells (uint16). The two contexts must be equal bit for bit.

    python bench/context_cost.py --fill-only --size 40000 --holes one|scattered|none

The fill alone, from synthetic cell sums of a SIZE^2 image (no pixels are made): its time and
how far it raises the process's peak RSS. ``--holes``: one hole of 8 x 8 cells; 5% of the cells
unknown, scattered over the image; or none.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import fmt_times, holes, machine, photo  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--procs", default="1,2,4,8")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--fill-only", action="store_true")
    ap.add_argument("--holes", choices=["one", "scattered", "none"], default="one")
    args = ap.parse_args()
    if args.fill_only:
        fill_only(args)
        return

    import numpy as np
    import torch

    import tilerun
    from tilerun.engine import Engine, Partials

    print(machine())
    model = tilerun.load_model()
    engine = Engine(model)
    img, mask = photo(args.size), holes(args.size)
    tiles = engine.tiles(args.size, args.size)
    print(f"{args.size}^2, {len(tiles)} tiles of {engine.tile}^2")

    def cells() -> list[Partials]:
        out = []
        for t in tiles:
            blocks = model.context_cells(img[t.y0 : t.y1, t.x0 : t.x1], mask[t.y0 : t.y1, t.x0 : t.x1], t.y0, t.x0)
            out.append(Partials((args.size, args.size), {t.index: torch.zeros(1)},
                                [(g, r, c, a) for g, (r, c, a) in enumerate(blocks)]))
        return out

    times: dict[str, list[float]] = {"whole image": [], "cells": [], "fill": []}
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        whole = model.coarse_context(img, mask)
        times["whole image"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        parts = cells()
        times["cells"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        got = engine.context(img, mask, object(), engine.reduce_partials(parts).cells)
        times["fill"].append(time.perf_counter() - t0)
        assert all(torch.equal(a, b) for a, b in zip(whole, got)), "the contexts differ"
    for name, ts in times.items():
        print(f"{name:>12}: {fmt_times(ts)}")
    from tilerun.work import _pass1_payload

    raw = np.mean([sum(a.nbytes for *_, a in p.cells) for p in parts])
    carried = np.mean([_pass1_payload(p, [t])[1][1].nbytes for p, t in zip(parts, tiles)])
    print(f"cell sums per tile through the store: {carried / 1024:.1f} KiB compressed ({raw / 1024:.1f} KiB as uint16)")
    best = {k: min(v) for k, v in times.items()}
    for n in (int(p) for p in args.procs.split(",")):
        each = best["cells"] / n + best["fill"]
        print(f"{n} process(es): {each:.2f} s each against {best['whole image']:.2f} s reading the whole image "
              f"({each / best['whole image']:.2f}x)")


def fill_only(args: argparse.Namespace) -> None:
    import numpy as np

    import tilerun
    from bench.common import vm_mb

    model = tilerun.load_model()
    rng = np.random.default_rng(0)
    cells = []
    for i, (c, h, w) in enumerate(model.context_grids(args.size, args.size)):
        n = (model.cfg.class_scale if i else model.cfg.coarse_scale) ** 2  # pixels a cell
        a = np.zeros((c, h, w), np.uint16)
        a[-1] = n
        if i == 0:  # colours: one per cell
            a[:3] = rng.integers(0, 256, (3, h, w), dtype=np.uint16) * n
        else:  # classes: every pixel of the first
            a[0] = n
        hole = np.zeros((h, w), bool)
        if args.holes == "scattered":
            hole = rng.random((h, w)) < 0.05
        if args.holes == "one":  # 8 x 8 colour cells, and the class cells under them
            k = 8 // (model.cfg.class_cells if i else 1)
            hole[h // 3 : h // 3 + k, w // 3 : w // 3 + k] = True
        a[:, hole] = 0
        cells.append(a)
    before = vm_mb("VmRSS:")
    t0 = time.perf_counter()
    model.context_of_cells(cells, args.size, args.size)
    took = time.perf_counter() - t0
    print(f"{args.size}^2, holes {args.holes}: fill {took:.2f} s, "
          f"peak RSS {vm_mb('VmHWM:') - before:+.0f} MB over the {before:.0f} MB before it")


if __name__ == "__main__":
    main()
