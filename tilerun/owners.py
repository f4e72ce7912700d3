"""Who computes and who finishes each image of a job: the ownership rule. Pure: no torch, no I/O.

The data road of a job is plan -> claim -> compute -> assemble -> write. This module is the
part of the plan that decides where an image's bytes go:

* **Whole** images: one task is the whole image (pass 1 and pass 2 in one process). The
  process that claims it decodes, computes, stitches, encodes and writes it itself, so no
  byte of it leaves that process.
* **Spread** images: their tiles are claimed chunk by chunk by every process, as a lone big
  image needs. Each has one *finishing* rank, fixed here, before any claim; the cores
  computed elsewhere reach it through a part store beside the output (shared filesystem,
  `parts`) or over the process group (`transport`), never through the c10d store.

The rule (`assign`): with one process, every image is whole, in input order. With at
least as many images as processes, every image is whole when a largest-first schedule of
whole images leaves at most WHOLE_IDLE of the processes' time idle (four equal photos on
two processes: none). Otherwise an image is spread when there are fewer images than
processes, or when it holds more than ``total_tiles / (world_size * SPREAD_FACTOR)`` tiles.

Why: whole-image tasks are claimed from one counter (list scheduling), and a greedy list
schedule ends within one task of the average load: makespan <= total/world + largest task.
Capping a whole task at 1/SPREAD_FACTOR of a process's average share bounds the tail idle
at 1/(SPREAD_FACTOR + 1) in the worst order, and in practice far less, because the small
tasks claimed last fill the gaps. `bench/ownership_tail.py` simulates it on seven
workloads: with SPREAD_FACTOR = 4 the tail idle is 0-2% up to 8 processes and 0-7% at 16
(where today's every-image-spread is 0-19%, its pass 2 waiting for pass 1); never
spreading a big image costs up to 92% (a folder plus one 8192^2 photo), and a factor of 2
leaves 17% idle on five 2048^2 photos over 2 processes. A larger factor spreads more images, which
costs bytes moved and a finisher's assembly for each; a smaller one leaves a process alone
with an image that is a third or more of its share. Spread images are claimed before whole
ones: every process starts on the big images together (their finishers then assemble and
encode while the others go on with whole images), and the whole images, largest first,
fill the end of the job where one task decides how long the others wait.

Finishers: spread images, largest first, each go to the rank with the fewest spread pixels
to finish so far, ties to the highest rank: rank 0 also writes the report and runs the
progress bar, so it takes a big image only when every rank already has one.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Sequence

__all__ = ["SPREAD_FACTOR", "WHOLE_IDLE", "Ownership", "assign", "claim_order", "schedule_idle"]

#: A whole-image task holds at most 1/SPREAD_FACTOR of a process's average share of the job.
SPREAD_FACTOR = 4
#: Idle share of a largest-first schedule of whole images below which no image is spread.
WHOLE_IDLE = 0.02


@dataclass(frozen=True)
class Ownership:
    """``whole``: indices of images claimed whole, in claim order; ``spread``: image index ->
    its finishing rank, in claim order."""

    whole: tuple[int, ...]
    spread: dict[int, int]

    def finisher(self, image: int) -> int | None:
        """The rank that assembles and writes a spread image; None for a whole image (its claimer)."""
        return self.spread.get(image)


def assign(tile_counts: Sequence[int], world_size: int, *, pixels: Sequence[int] | None = None,
           spread_factor: int = SPREAD_FACTOR) -> Ownership:
    """Whole or spread for each image (by its tile count), and each spread image's finisher.

    ``pixels``: the images' sizes, to balance the finishers' writing (default: tile counts).
    Deterministic: every process computes the same answer from the same plan.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    n = len(tile_counts)
    if world_size == 1:  # nobody to balance with: input order, the outputs appear as listed
        return Ownership(tuple(range(n)), {})
    total = sum(tile_counts)
    limit = total / (world_size * spread_factor)
    # A one-tile image cannot be spread: one claim computes it whoever holds it.
    can_spread = [i for i in range(n) if tile_counts[i] > 1]
    if n < world_size:
        spread = can_spread
    elif schedule_idle(tile_counts, world_size) <= WHOLE_IDLE:
        spread = []
    else:
        spread = [i for i in can_spread if tile_counts[i] > limit]
    whole = [i for i in range(n) if i not in set(spread)]
    weight = list(pixels) if pixels is not None else list(tile_counts)
    load = [0] * world_size
    finishers: dict[int, int] = {}
    for i in _largest_first(spread, weight):
        # Fewest pixels to finish so far; ties to the highest rank (rank 0 has the report).
        r = min(range(world_size), key=lambda k: (load[k], -k))
        finishers[i] = r
        load[r] += weight[i]
    return Ownership(tuple(_largest_first(whole, tile_counts)), finishers)


def schedule_idle(tile_counts: Sequence[int], world_size: int) -> float:
    """Idle share of the processes' time when whole images are claimed largest first (tiles as time)."""
    total = sum(tile_counts)
    if not total:
        return 0.0
    loads = [0] * world_size
    for t in sorted(tile_counts, reverse=True):
        heapq.heapreplace(loads, loads[0] + t)  # the next free process takes the next image
    return 1 - total / (world_size * max(loads))


def _largest_first(indices, sizes: Sequence[int]) -> list[int]:
    """Largest first (LPT order), ties in input order: a stable, deterministic order."""
    return sorted(indices, key=lambda i: (-sizes[i], i))


def claim_order(own: Ownership) -> list[tuple[str, int]]:
    """The order images enter the claim list: ``("spread", i)`` first, then ``("whole", i)``."""
    return [("spread", i) for i in own.spread] + [("whole", i) for i in own.whole]
