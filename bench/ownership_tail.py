"""Tail idle of the ownership rule (`tilerun.owners.assign`): list scheduling simulated in tile units.

Usage: python bench/ownership_tail.py

Every process claims the next task of one list when it is free (the c10d counter). A whole
image is one task of ``tiles * (1 + g)`` (both passes in one process); a spread image is
``tiles`` pass-1 tasks of ``g`` each, then ``tiles`` pass-2 tasks of 1 each, a pass-2 task
waiting (idle) until the image's last pass-1 task is done. ``g`` is pass 1's cost relative to
pass 2 (0: a model without global features). Tail idle = 1 - work / (world * makespan).
Host costs (decode, encode, the finisher's assembly) are left out: they run beside the device.
"""

from __future__ import annotations

import heapq
import random

from tilerun.owners import assign, claim_order


def simulate(tiles: list[int], world: int, *, g: float, factor: int | None) -> float:
    if factor is None:  # today: every image spread, tile by tile
        order = [("spread", i) for i in range(len(tiles))]
    else:
        order = claim_order(assign(tiles, world, spread_factor=factor))
    tasks: list[tuple[str, int, float]] = []  # (kind, image, cost)
    spread = [i for kind, i in order if kind == "spread"]
    # As the scheduler orders them: pass 1 of spread image k+1 before pass 2 of image k.
    for k, i in enumerate(spread):
        if g and k == 0:
            tasks += [("p1", i, g)] * tiles[i]
        if g and k + 1 < len(spread):
            tasks += [("p1", spread[k + 1], g)] * tiles[spread[k + 1]]
        tasks += [("p2", i, 1.0)] * tiles[i]
    tasks += [("whole", i, tiles[i] * (1 + g)) for kind, i in order if kind == "whole"]
    free = [(0.0, r) for r in range(world)]
    heapq.heapify(free)
    pending_p1_end: dict[int, float] = {}
    for kind, i, cost in tasks:
        t, r = heapq.heappop(free)
        if kind == "p2" and g:
            # Pass-1 tasks of this image were all claimed earlier; it is ready when the last ends.
            t = max(t, pending_p1_end[i])
        end = t + cost
        if kind == "p1":
            pending_p1_end[i] = max(pending_p1_end.get(i, 0.0), end)
        heapq.heappush(free, (end, r))
    makespan = max(t for t, _ in free)
    work = sum(tiles) * (1 + g)
    return 1 - work / (world * makespan)


def workloads() -> dict[str, list[int]]:
    rng = random.Random(0)
    return {
        "16 x 1024^2 (4 tiles)": [4] * 16,
        "one 8192^2 (256 tiles)": [256],
        "16 x 1024^2 + one 8192^2": [4] * 16 + [256],
        "5 x 2048^2 (16 tiles)": [16] * 5,
        "100 photos, 1-36 tiles": [rng.randint(1, 36) for _ in range(100)],
        "40 photos, log-normal": [max(1, int(rng.lognormvariate(2.0, 1.0))) for _ in range(40)],
        "1000 x 512^2 (1 tile)": [1] * 1000,
    }


def main() -> None:
    worlds = (2, 4, 8, 16)
    for g in (0.0, 0.5):
        print(f"\npass-1 cost g = {g}: tail idle % (all whole = spread only when images < processes; factor 2 / 4 / 8; today = every image spread)")
        print("| workload | " + " | ".join(f"{w} procs: all whole / f2 / f4 / f8 / today" for w in worlds) + " |")
        print("|---|" + "---|" * len(worlds))
        for name, tiles in workloads().items():
            cells = []
            for w in worlds:
                # factor 1e-9: a big image is never spread (only when images < processes)
                figs = [simulate(tiles, w, g=g, factor=f) for f in (1e-9, 2, 4, 8, None)]
                cells.append(" / ".join(f"{100 * x:.0f}" for x in figs))
            print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
