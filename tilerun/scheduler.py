"""The plan of a job: every image cut into tiles and chunks, the same on every process.

The road of a job is plan -> claim -> compute -> assemble -> write, one room a step:

* **plan** (here): every process checks that it runs with rank 0's model, options and
  inputs (`job_settings`); rank 0 alone reads the inputs' sizes from their headers and
  plans the job (`JobPlan`: geometry, per image its size and claim size), and every
  process cuts tiles (`geometry`) and *chunks* from that one plan, so a task number means
  the same work everywhere. Up to ``batch_size`` tiles of one window shape make an engine
  batch, whole batches make a chunk, the unit of a claim; the batches, hence the bits, do
  not depend on how many go to a chunk (`_chunks`), so any world size and any claim order
  give the same outputs. `owners` then decides, from the plan alone, which images are
  claimed whole and which are spread over the processes, and who finishes those;
* **claim -> compute** (`work`): one counter in the c10d store hands out tasks; the
  engine computes them;
* **assemble -> write** (`assemble`, `parts`, `transport`): every process writes the images
  it finishes; a spread image's cores reach its finisher through a part store on a shared
  OUTPUT or over the process group, never through the store or rank 0;
* `runner` runs that road for one job, `report` records it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from typing import Any, Callable

from .engine import Engine
from .errors import InputImageError
from .geometry import Tile, grid
from .images import InputItem, image_size

__all__ = ["PASS_GLOBAL", "PASS_MAIN", "ImagePlan", "JobPlan", "PlannedImage", "plan_job",
           "job_settings", "CLAIM_BATCHES_ALONE"]

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


def _core_box(t: Tile) -> tuple[int, int, int, int]:
    ys, xs = t.core_in_window()
    return (ys.start, ys.stop, xs.start, xs.stop)


def _chunks(tiles: list[Tile], batch: int, per_claim: int, *, cores: bool = False,
            global_tiles: list[Tile] | None = None, global_cores: bool = False) -> list[list[int]]:
    """Tile indices in claims of about ``per_claim`` engine batches, in the order the engine runs them.

    The engine batches a call's tiles as `Engine._batches` does: runs of consecutive tiles
    with one key (pass 2: the window shape, and the core's place in it with ``cores``;
    pass 1: the same of ``global_tiles``, the pass-1 windows, with ``global_cores``), each
    run cut every ``batch`` tiles. A batch's members change its float bits, so a claim
    starts only where both passes' batches over the whole image end: the batches, hence
    the bits, are the same whatever ``per_claim`` (rank 0's choice, from its core count).
    """
    def pass2(t: Tile) -> tuple:
        return (t.window_shape, _core_box(t) if cores else ())

    def pass1(t: Tile) -> tuple:
        if global_tiles is None:
            return ()
        g = global_tiles[t.index]
        return (g.window_shape, _core_box(g) if global_cores else ())

    order = sorted(tiles, key=lambda t: (pass2(t), pass1(t), t.index))

    def batch_starts(key: Callable[[Tile], tuple]) -> set[int]:
        starts, run = set(), 0
        for i, t in enumerate(order):
            run = 0 if i == 0 or key(t) != key(order[i - 1]) else run
            if run % batch == 0:
                starts.add(i)
            run += 1
        return starts

    starts2 = batch_starts(pass2)
    cuts = starts2 & batch_starts(pass1) if global_tiles is not None else starts2
    chunks: list[list[int]] = []
    batches = 0
    for i, t in enumerate(order):
        if i in cuts and (not chunks or batches >= per_claim):
            chunks.append([])
            batches = 0
        batches += i in starts2
        chunks[-1].append(t.index)
    return chunks


# Batches per engine worker in one claim when a single process runs the job. Each claim
# ends with the workers waiting for the slowest window; 2048^2 through the engine a claim
# of 2 tiles at a time vs all at once (interleaved, 5 each): best 8.11 vs 6.82 s, median
# 8.63 vs 7.79 s. 8 keeps a claim's results (4 bytes a pixel, ~9 MB at tile 384) and the
# progress bar's steps small.
CLAIM_BATCHES_ALONE = 8


@dataclass(frozen=True)
class PlannedImage:
    key: str  # `InputItem.key`: the input's path relative to INPUT
    height: int
    width: int
    claim: int  # engine batches to a claim


@dataclass(frozen=True)
class JobPlan:
    """The work of one job: made by rank 0, used as it is by every rank.

    Every task number means the same chunk of the same image on every rank because no
    rank computes its own: the plan carries the geometry and, per image, its size and
    claim size; tiles and chunks follow from them by pure functions (`tiles`, `chunks`).
    Compact JSON (`to_json`): a few numbers an image, no pixels.
    """

    tile: int
    halo: int
    global_halo: int
    stride: int
    batch_size: int
    global_pass: bool  # pass 1 (the model's global sums) before pass 2
    cores: bool  # the engine batches pass 2 by core place too (`Engine.cores_only`)
    global_cores: bool  # ... and pass 1 (it keeps pass 2's features)
    images: tuple[PlannedImage, ...] = ()

    @classmethod
    def for_engine(cls, engine: Engine, images: tuple[PlannedImage, ...] = ()) -> JobPlan:
        return cls(tile=engine.tile, halo=engine.halo, global_halo=engine.global_halo, stride=engine.stride,
                   batch_size=engine.batch_size, global_pass=engine.uses_global,
                   cores=bool(getattr(engine, "cores_only", False)),
                   global_cores=bool(getattr(engine, "keeps_features", False) and getattr(engine, "cores_only", False)),
                   images=tuple(images))

    def to_json(self) -> str:
        d = asdict(self)
        d["images"] = [[i.key, i.height, i.width, i.claim] for i in self.images]
        return json.dumps(d, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> JobPlan:
        d = json.loads(text)
        d["images"] = tuple(PlannedImage(*row) for row in d["images"])
        return cls(**d)

    def tiles(self, image: PlannedImage, *, halo: int | None = None) -> list[Tile]:
        return grid(image.height, image.width, tile=self.tile, halo=self.halo if halo is None else halo,
                    stride=self.stride)

    def chunks(self, image: PlannedImage) -> list[list[int]]:
        tiles = self.tiles(image)
        global_tiles = self.tiles(image, halo=self.global_halo) if self.global_pass else None
        return _chunks(tiles, self.batch_size, image.claim, cores=self.cores, global_tiles=global_tiles,
                       global_cores=self.global_cores)

    def image_plans(self, items: list[InputItem]) -> list[ImagePlan]:
        """The images with their tiles and chunks; ``items``: this process's inputs (every planned key among them)."""
        by_key = {it.key: it for it in items}
        plans = []
        for image in self.images:
            chunks = self.chunks(image)
            by_pass = {PASS_MAIN: chunks}
            if self.global_pass:
                by_pass[PASS_GLOBAL] = chunks  # the same tiles in the same claims
            plans.append(ImagePlan(len(plans), by_key[image.key], image.height, image.width, self.tiles(image), by_pass))
        return plans


def plan_job(engine: Engine, items: list[InputItem], *, world_size: int = 1) -> tuple[JobPlan, list[tuple[str, str]]]:
    """Rank 0's plan for ``items`` (headers only: sizes, EXIF rotation applied), and ``(key,
    error)`` for each input whose header cannot be read."""
    images, failed = [], []
    b = engine.batch_size
    workers = getattr(engine, "workers", 1)
    for item in items:
        try:
            h, w = image_size(item)
        except InputImageError as e:
            failed.append((item.key, str(e)))
            continue
        # A claim is one batch per engine worker (CPU: one per core this process owns),
        # so that it keeps the process busy; with several processes, fewer if that leaves
        # an image under ~4 claims a pass, so a small image still spreads over them. One
        # process balances with nobody: CLAIM_BATCHES_ALONE batches per worker, because the
        # workers wait for each other at the end of every claim (measured below).
        # Rank 0's workers decide it for every rank: a node with other cores only runs its
        # claims faster or slower (`_chunks`: the bits do not depend on the claim size).
        per_claim = workers * CLAIM_BATCHES_ALONE
        if world_size > 1:
            n_tiles = len(grid(h, w, tile=engine.tile, halo=engine.halo, stride=engine.stride))
            per_claim = min(workers, -(-n_tiles // (4 * b)))
        images.append(PlannedImage(item.key, h, w, max(1, per_claim)))
    return JobPlan.for_engine(engine, tuple(images)), failed


def job_settings(engine: Engine, items: list[InputItem], *, model_id: str | None, fmt: str) -> dict[str, Any]:
    """What every rank of a job must agree on (`Context.agree_settings`), by the option that sets it.

    The model by its identity (`tilerun.model.model_identity`: the file's bytes; else the
    loaded weights, `resume.model_digest`), and everything that changes output bits. Not
    the engine's worker count: it may differ by node and changes only speed.
    """
    if model_id is None:
        from .resume import model_digest

        model_id = model_digest(engine.model)
    from .sources import current_level

    level = current_level()
    return {
        "--model": f"sha256 {model_id[:16]}",
        "--tile": engine.tile,
        "--halo": engine.halo,
        "--batch-size": engine.batch_size,
        "--precision": engine.precision,
        "--feature-cache": "on" if getattr(engine, "keeps_features", False) else "off",
        "--format": fmt,
        "--level / --mpp": [level.level, level.mpp],
        "the probed receptive field": asdict(engine.probe),
        "the inputs": [it.key for it in items],
    }
