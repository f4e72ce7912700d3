"""The plan of a job: every image cut into tiles and chunks, the same on every process.

The road of a job is plan -> claim -> compute -> assemble -> write, one room a step:

* **plan** (here): every process lists the inputs (`images`), reads their sizes from the
  headers and cuts them into tiles (`geometry`) and *chunks*: up to ``batch_size`` tiles of
  one window shape make an engine batch, whole batches make a chunk, the unit of a claim.
  The batches, hence the bits, do not depend on how many go to a chunk (`_chunks`), so
  any world size and any claim order give the same outputs. `owners` then decides which
  images are claimed whole and which are spread over the processes, and who finishes those;
* **claim -> compute** (`work`): one counter in the c10d store hands out tasks; the
  engine computes them;
* **assemble -> write** (`assemble`, `parts`, `transport`): every process writes the images
  it finishes; a spread image's cores reach its finisher through a part store on a shared
  OUTPUT or over the process group, never through the store or rank 0;
* `runner` runs that road for one job, `report` records it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .engine import Engine
from .errors import InputImageError
from .geometry import Tile
from .images import InputItem, image_size

__all__ = ["PASS_GLOBAL", "PASS_MAIN", "ImagePlan", "plan_images", "CLAIM_BATCHES_ALONE"]

log = logging.getLogger("tilerun")

PASS_GLOBAL, PASS_MAIN = 1, 2


@dataclass
class ImagePlan:
    index: int
    item: InputItem
    height: int
    width: int
    tiles: list[Tile]
    chunks: dict[int, list[list[int]]]  # pass -> chunks of tile indices

    @property
    def key(self) -> str:
        return self.item.key


def _chunks(tiles: list[Tile], batch: int, per_claim: int) -> list[list[int]]:
    """Tiles in batches of one window shape (up to ``batch``), ``per_claim`` batches to a chunk.

    The batches are the same whatever ``per_claim`` (hence the world size) is, so are the
    bits; a chunk may span window shapes (the engine runs each batch on its own).
    """
    order = sorted(tiles, key=lambda t: (t.window_shape, t.index))
    batches: list[list[int]] = []
    for t in order:
        if batches and len(batches[-1]) < batch and tiles[batches[-1][0]].window_shape == t.window_shape:
            batches[-1].append(t.index)
        else:
            batches.append([t.index])
    return [[i for b in batches[k : k + per_claim] for i in b] for k in range(0, len(batches), per_claim)]


# Batches per engine worker in one claim when a single process runs the job. Each claim
# ends with the workers waiting for the slowest window; 2048^2 through the engine a claim
# of 2 tiles at a time vs all at once (interleaved, 5 each): best 8.11 vs 6.82 s, median
# 8.63 vs 7.79 s. 8 keeps a claim's results (4 bytes a pixel, ~9 MB at tile 384) and the
# progress bar's steps small.
CLAIM_BATCHES_ALONE = 8


def plan_images(
    engine: Engine, items: list[InputItem], *, world_size: int = 1
) -> tuple[list[ImagePlan], list[tuple[str, str]]]:
    """The images' plans, and ``(key, error)`` for each input whose header cannot be read."""
    plans, failed = [], []
    for item in items:
        try:
            h, w = image_size(item)  # header only, EXIF rotation applied
        except InputImageError as e:
            failed.append((item.key, str(e)))
            continue
        tiles = engine.tiles(h, w)
        # A claim is one batch per engine worker (CPU: one per core this process owns),
        # so that it keeps the process busy; with several processes, fewer if that leaves
        # an image under ~4 claims a pass, so a small image still spreads over them. One
        # process balances with nobody: CLAIM_BATCHES_ALONE batches per worker, because the
        # workers wait for each other at the end of every claim (measured below).
        # Always whole batches: the batches, hence the bits, are the same for any world size.
        b = engine.batch_size
        workers = getattr(engine, "workers", 1)
        per_claim = workers * CLAIM_BATCHES_ALONE
        if world_size > 1:
            per_claim = min(workers, -(-len(tiles) // (4 * b)))
        chunks = {PASS_MAIN: _chunks(tiles, b, max(1, per_claim))}
        if engine.uses_global:
            chunks[PASS_GLOBAL] = chunks[PASS_MAIN]  # the same tiles in the same claims
        plans.append(ImagePlan(len(plans), item, h, w, tiles, chunks))
    return plans, failed
