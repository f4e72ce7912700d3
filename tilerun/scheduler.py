"""A job over many images on one or many processes: tiles claimed from a central counter.

The design document's central task assignment, on the c10d store that torchrun already
runs (an in-process HashStore when there is no torchrun):

* **Work list.** Every process checks that it runs with rank 0's model, options and
  inputs (`job_settings`); rank 0 alone plans the job (`JobPlan`: sizes, geometry, claim
  sizes) and every process cuts tiles and chunks from that one plan, so a task number
  means the same work everywhere. A chunk is whole engine batches (up to ``batch_size``
  tiles of one window shape); a task is one chunk of one pass of one image. Order:
  pass 1 of image i+1 comes before pass 2 of image i, so the global sums a pass-2
  chunk needs are usually ready when it is claimed.
* **Claims.** ``store.add("claim", 1)`` hands out task numbers: each task is computed
  by exactly one process, however uneven the work, with no padding or duplicates.
* **Global features.** A pass-1 chunk publishes its tiles' float64 partial sums; a
  pass-2 chunk waits for all of its image's partials and adds them in tile order, so
  every process (and a single process) gets the same bits.
* **Stitching without gathers.** A pass-2 chunk publishes its uint8 cores (class index,
  and RGB with known pixels already copied from the input: 4 bytes a pixel). Rank 0's
  writer thread takes them in image order, fills the uint8 outputs, writes them
  atomically and deletes the keys. Rank 0's own chunks skip the store's copies: their
  key holds a marker and the arrays reach its writer in memory. Outputs land on rank 0's
  node only: no shared filesystem is needed for OUTPUT (inputs must exist on every node).
* **Pipelining.** Per process, a loader thread claims the next task and decodes its
  image while the main thread computes; rank 0's writer thread gathers finished images
  and hands them to PNG encoder threads (`encoder_count`).

No collective runs, so uneven work never leaves a process waiting in one; a process
that dies takes the job down through torchrun, and one that stops (no heartbeat) is
named by whoever waits for its work (`Context.wait`): no wait times out on long work.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import struct
import sys
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .dist import Context
from .engine import Engine
from .errors import InputImageError, Interrupted
from .geometry import Tile, grid
from .images import InputItem, image_size, load_image, output_paths
from .runner import FileResult, write_outputs

__all__ = ["ImagePlan", "JobPlan", "PlannedImage", "Task", "plan_job", "job_settings", "task_order",
           "run_distributed", "RankStats"]

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


@dataclass(frozen=True)
class Task:
    image: int
    pass_: int
    chunk: int

    @property
    def key(self) -> str:
        return f"r/{self.image}/{self.pass_}/{self.chunk}"


@dataclass
class RankStats:
    rank: int
    tiles: dict[str, int] = field(default_factory=lambda: {"global": 0, "main": 0})
    tasks: int = 0
    compute_s: float = 0.0
    wait_s: float = 0.0  # main thread waiting for the loader (decode, claims, global sums)
    decode_s: float = 0.0  # the loader reading and decoding images (behind compute)
    bytes_sent: int = 0


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


def plan_job(engine: Engine, items: list[InputItem], *, world_size: int = 1) -> tuple[JobPlan, list[FileResult]]:
    """Rank 0's plan for ``items`` (headers only: sizes, EXIF rotation applied), and the inputs it cannot read."""
    images, failed = [], []
    b = engine.batch_size
    workers = getattr(engine, "workers", 1)
    for item in items:
        try:
            h, w = image_size(item)
        except InputImageError as e:
            failed.append(FileResult(item.key, "failed", error=str(e)))
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
    return {
        "--model": f"sha256 {model_id[:16]}",
        "--tile": engine.tile,
        "--halo": engine.halo,
        "--batch-size": engine.batch_size,
        "--precision": engine.precision,
        "--feature-cache": "on" if getattr(engine, "keeps_features", False) else "off",
        "--format": fmt,
        "the probed receptive field": asdict(engine.probe),
        "the inputs": [it.key for it in items],
    }


def task_order(plans: list[ImagePlan]) -> list[Task]:
    """Pass 1 of image i+1 before pass 2 of image i: the next image's sums get a head start."""
    tasks: list[Task] = []

    def pass1(p: ImagePlan) -> None:
        tasks.extend(Task(p.index, PASS_GLOBAL, c) for c in range(len(p.chunks.get(PASS_GLOBAL, []))))

    if plans:
        pass1(plans[0])
    for i, p in enumerate(plans):
        if i + 1 < len(plans):
            pass1(plans[i + 1])
        tasks.extend(Task(p.index, PASS_MAIN, c) for c in range(len(p.chunks[PASS_MAIN])))
    return tasks


def _describer(plans: list[ImagePlan]) -> Callable[[str], str]:
    """A task's store key as words, for the stall message."""

    def describe(key: str) -> str:
        _, i, pass_, c = key.split("/")
        p = plans[int(i)]
        return f"{p.item.key} (pass {pass_}, chunk {int(c) + 1} of {len(p.chunks[int(pass_)])})"

    return describe


# -- payloads: a JSON header and raw arrays, nothing pickled -----------------------------
def _pack(header: dict, arrays: list[np.ndarray] = ()) -> bytearray:
    header = dict(header, arrays=[[a.dtype.str, list(a.shape)] for a in arrays])
    h = json.dumps(header).encode()
    out = bytearray(4 + len(h) + sum(a.nbytes for a in arrays))
    struct.pack_into("<I", out, 0, len(h))
    out[4 : 4 + len(h)] = h
    off = 4 + len(h)
    for a in arrays:  # one copy each, into place (tobytes + join: two; 0.11 vs 0.055 s at 67 MB)
        out[off : off + a.nbytes] = memoryview(np.ascontiguousarray(a)).cast("B")
        off += a.nbytes
    return out


def _unpack(data: bytes) -> tuple[dict, list[np.ndarray]]:
    (n,) = struct.unpack_from("<I", data)
    header = json.loads(data[4 : 4 + n])
    arrays, off = [], 4 + n
    for dtype, shape in header["arrays"]:
        a = np.frombuffer(data, dtype=np.dtype(dtype), count=int(np.prod(shape)), offset=off).reshape(shape)
        arrays.append(a)
        off += a.nbytes
    return header, arrays


_DONE = object()

#: Images encoded at once by rank 0's writer when the engine runs on a GPU.
ENCODERS_GPU = 4
#: Pixels of finished images that may wait for or be in their encoders (4 bytes a pixel:
#: 64 MP ~ 256 MB). One image larger than that is written alone.
ENCODE_PIXELS = 64 * 2**20

#: Python's thread switch interval during a job (seconds). The loader and writer run Python
#: between their C calls, and while one holds the GIL the compute workers' next torch op (a
#: window is ~1000 of them) waits for it, up to the switch interval: 5 ms by default.
#: Measured, the CLI job over bench/end_to_end.py's folder on CPU: 18.2 / 19.0 s at 0.5 ms
#: vs 20.5 / 22.2 s at 5 ms (compute alone: no change).
SWITCH_INTERVAL = 0.0005


def encoder_count(device: torch.device) -> int:
    """PNG encoder threads of rank 0's writer. CPU: the engine's workers already use every
    core, so one. A GPU leaves the cores to the host side, where encoding was most of a
    run (python bench/end_to_end.py --device cuda --timeline)."""
    return 1 if device.type == "cpu" else max(1, min(ENCODERS_GPU, os.cpu_count() or 1))


class _Loader(threading.Thread):
    """Claims tasks and prepares their inputs ahead of compute (bounded queue)."""

    def __init__(self, ctx: Context, engine: Engine, plans: list[ImagePlan], tasks: list[Task], mask_dir, depth: int = 2):
        super().__init__(daemon=True, name="tilerun-loader")
        self.ctx, self.engine, self.plans, self.tasks, self.mask_dir = ctx, engine, plans, tasks, mask_dir
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.images: OrderedDict[int, tuple | InputImageError] = OrderedDict()
        self.sums: OrderedDict[int, torch.Tensor | str] = OrderedDict()
        self.stop = threading.Event()
        self.decode_s = 0.0  # reading and decoding images
        self.describe = _describer(plans)

    def _image(self, i: int):
        if i not in self.images:
            p = self.plans[i]
            t0 = time.perf_counter()
            try:
                image, mask = load_image(p.item, mask_dir=self.mask_dir)
                if mask.shape != (p.height, p.width):
                    raise InputImageError(f"decoded size {mask.shape} differs from its header {(p.height, p.width)}")
                self.images[i] = (image, mask)
            except InputImageError as e:
                self.images[i] = e
            except Exception as e:  # the per-file boundary: one bad file costs that file, not the job
                log.debug("%s: unexpected error while reading", p.item.path, exc_info=True)
                self.images[i] = InputImageError(f"{type(e).__name__}: {e}")
            self.decode_s += time.perf_counter() - t0
            while len(self.images) > 2:  # this image and the next: pass 1 of i+1 interleaves with pass 2 of i
                self.images.popitem(last=False)
        return self.images[i]

    def _global_sums(self, store, i: int):
        """The whole image's sums from every pass-1 chunk, added in tile order; or the error text."""
        if i not in self.sums:
            p = self.plans[i]
            keys = [Task(i, PASS_GLOBAL, c).key for c in range(len(p.chunks[PASS_GLOBAL]))]
            self.ctx.wait(store, keys, describe=self.describe)
            partials: dict[int, torch.Tensor] = {}
            error = None
            for k in keys:
                header, arrays = _unpack(store.get(k))
                if header.get("error"):
                    error = header["error"]
                    break
                for t, row in zip(header["tiles"], arrays[0]):
                    partials[t] = torch.from_numpy(row.copy())
            self.sums[i] = error if error is not None else self.engine.reduce_partials(partials)
            while len(self.sums) > 2:
                self.sums.popitem(last=False)
        return self.sums[i]

    def run(self) -> None:
        store = self.ctx.store_client()
        try:
            while not self.stop.is_set():
                n = store.add("claim", 1) - 1
                if n >= len(self.tasks):
                    break
                task = self.tasks[n]
                self.ctx.claimed(store, task.key)
                loaded = self._image(task.image)
                sums = None
                if not isinstance(loaded, Exception) and task.pass_ == PASS_MAIN and self.engine.uses_global:
                    sums = self._global_sums(store, task.image)
                self.q.put((task, loaded, sums))
        except BaseException as e:  # surfaced in the main thread, which owns the process's fate
            self.q.put(e)
            return
        self.q.put(_DONE)


class _Writer(threading.Thread):
    """Rank 0: assembles each image's uint8 cores from the store and writes it (write-behind)."""

    def __init__(self, ctx: Context, engine: Engine, plans: list[ImagePlan], out_dir: Path, palette, on_tiles: Callable[[int, int], None] | None, outputs=None):
        super().__init__(daemon=True, name="tilerun-writer")
        self.encoders = encoder_count(getattr(engine, "device", torch.device("cpu")))
        self.ctx, self.engine, self.plans, self.out_dir, self.palette = ctx, engine, plans, out_dir, palette
        self.on_tiles = on_tiles
        self.outputs = outputs  # resume.OutputPlan: collision-free paths and resume stamps
        self.results: list[FileResult] = []  # each input as it is decided (outputs on disk when ok)
        self._pool: ThreadPoolExecutor | None = None
        self._stopped = False
        self._lock = threading.Lock()  # `abandon` (main thread) against new writes (this thread)
        self.error: BaseException | None = None
        self.bytes_received = 0
        # This process's own pass-2 results, by task key, handed over in memory: packing
        # them, the store's set and get took ~0.4 s of CPU per 4096^2 image (HashStore),
        # on a GPU host as long as the card's compute. The store carries a marker.
        self.local: dict[str, tuple[dict, list[np.ndarray]]] = {}
        self.describe = _describer(plans)

    def _gather(self, store, p: ImagePlan) -> FileResult | tuple[np.ndarray | None, np.ndarray | None, float]:
        """The image's uint8 outputs from its chunks in the store (its keys deleted), and the
        seconds it took to compute and gather them; or its failure."""
        t0 = time.perf_counter()
        classes = rgb = None
        error = None
        compute_s = 0.0
        for c in range(len(p.chunks[PASS_MAIN])):
            key = Task(p.index, PASS_MAIN, c).key
            self.ctx.wait(store, [key], describe=self.describe)
            data = store.get(key)
            self.bytes_received += len(data)
            self.ctx.forget(store, key)
            header, arrays = _unpack(data)
            if header.get("local"):
                header, arrays = self.local.pop(key)
            compute_s += header.get("seconds", 0.0)
            if self.on_tiles:
                self.on_tiles(len(header.get("tiles", [])), 0)
            if header.get("error"):
                error = error or header["error"]
                continue
            if error:
                continue
            it = iter(arrays)
            for t_index, has_cls, has_rgb in header["tiles"]:
                t = p.tiles[t_index]
                if has_cls:
                    if classes is None:
                        classes = np.zeros((p.height, p.width), np.uint8)
                    classes[t.y0 : t.y1, t.x0 : t.x1] = next(it)
                if has_rgb:
                    if rgb is None:
                        rgb = np.zeros((p.height, p.width, 3), np.uint8)
                    rgb[t.y0 : t.y1, t.x0 : t.x1] = next(it)
        if error:
            log.error("%s: %s", p.item.path, error)
            return FileResult(p.key, "failed", size=(p.width, p.height), tiles=len(p.tiles), error=error)
        return classes, rgb, compute_s + time.perf_counter() - t0

    def _write(self, p: ImagePlan, classes: np.ndarray | None, rgb: np.ndarray | None, seconds: float,
               strips: Executor | None) -> FileResult:
        """Encode and write one image's outputs (in an encoder thread; ``strips`` compress its parts)."""
        t0 = time.perf_counter()
        try:
            if self.outputs is not None:
                outputs = write_outputs(self.outputs.outputs(p.item), classes, rgb, self.palette, pool=strips,
                                        threads=self.encoders,
                                        text_for=lambda kinds: self.outputs.output_text(p.item, kinds))
            else:
                outputs = write_outputs(output_paths(p.item, self.out_dir), classes, rgb, self.palette, pool=strips)
        except OSError as e:
            log.error("%s: cannot write output: %s", p.item.path, e)
            result = FileResult(p.key, "failed", size=(p.width, p.height), tiles=len(p.tiles),
                                error=f"cannot write output: {e}")
        else:
            result = FileResult(p.key, "ok", outputs, (p.width, p.height), len(p.tiles),
                                seconds + time.perf_counter() - t0)
        self.results.append(result)  # here, not when the writer collects it: `abandon` reports it
        return result

    def abandon(self) -> list[FileResult]:
        """Stop (an interrupt): the writes in flight finish, no other starts. Returns the
        inputs decided so far; the outputs of each one that is ok are complete on disk."""
        with self._lock:
            self._stopped = True
            pool = self._pool
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        return list(self.results)

    def run(self) -> None:
        # PNG encoding is the writer's heaviest part (zlib, ~0.2 s a 2048^2 RGB image on this
        # project's CPU), and zlib lets go of the GIL: `encoders` images at once, and with more
        # than one encoder the strips of each image on as many threads again, so that the last
        # image of a job is not left to one thread after the card is done. The images
        # waiting for an encoder are bounded by ENCODE_PIXELS, so a lone huge image still
        # goes through, one at a time.
        pending: deque[tuple[ImagePlan, Future | FileResult]] = deque()
        pixels = 0

        def finish() -> None:
            nonlocal pixels
            p, job = pending.popleft()
            pixels -= p.height * p.width
            result = job.result() if isinstance(job, Future) else job
            if self.on_tiles:
                self.on_tiles(0, 1, failed=int(result.status != "ok"))

        strips = ThreadPoolExecutor(self.encoders, thread_name_prefix="tilerun-zlib") if self.encoders > 1 else None
        try:
            store = self.ctx.store_client()
            with ThreadPoolExecutor(self.encoders, thread_name_prefix="tilerun-png") as pool:
                self._pool = pool
                for p in self.plans:
                    while pending and (len(pending) >= self.encoders or pixels + p.height * p.width > ENCODE_PIXELS):
                        finish()
                    got = self._gather(store, p)
                    with self._lock:
                        if self._stopped:
                            return
                        if isinstance(got, FileResult):
                            self.results.append(got)
                    job = got if isinstance(got, FileResult) else pool.submit(self._write, p, *got, strips)
                    pending.append((p, job))
                    pixels += p.height * p.width
                while pending:
                    finish()
        except BaseException as e:
            self.error = e
        finally:
            if strips is not None:
                strips.shutdown(wait=False, cancel_futures=True)


def _compute(engine: Engine, plan: ImagePlan, task: Task, image, mask, sums, job: object) -> tuple[dict, list[np.ndarray], int]:
    tiles = [plan.tiles[i] for i in plan.chunks[task.pass_][task.chunk]]
    key = (job, plan.index)  # the engine keeps pass 1's features under it for this process's pass 2
    if task.pass_ == PASS_GLOBAL:
        partials = engine.global_partials(image, mask, tiles, key=key)
        rows = np.stack([partials[t.index].numpy() for t in tiles])
        return {"tiles": [t.index for t in tiles]}, [rows], len(tiles)
    header_tiles, arrays = [], []
    for r in engine.compute(image, mask, tiles, sums, key=key):
        header_tiles.append([r.tile.index, r.classes is not None, r.rgb is not None])
        arrays += [a for a in (r.classes, r.rgb) if a is not None]
    return {"tiles": header_tiles}, arrays, len(tiles)


def _interrupted(e: KeyboardInterrupt, writer: _Writer | None) -> Interrupted:
    """``e`` as `Interrupted`, with what rank 0's writer wrote (it writes no more)."""
    return Interrupted(getattr(e, "signum", signal.SIGINT), results=writer.abandon() if writer else None)


def run_distributed(
    ctx: Context,
    engine: Engine,
    plans: list[ImagePlan],
    out_dir: Path,
    *,
    mask_dir=None,
    palette=None,
    on_tiles: Callable[[int, int], None] | None = None,
    outputs=None,
) -> tuple[list[FileResult], list[RankStats]]:
    """Compute this process's share of ``plans``; on rank 0 also write every output.

    ``plans``: `JobPlan.image_plans` of rank 0's plan, the same on every rank.

    Returns (per-file results, per-rank stats) on rank 0, ([], [own stats]) elsewhere.
    """
    tasks = task_order(plans)
    store = ctx.store_client()
    stats = RankStats(ctx.rank)
    writer = _Writer(ctx, engine, plans, out_dir, palette, on_tiles, outputs) if ctx.is_writer else None
    loader = _Loader(ctx, engine, plans, tasks, mask_dir)
    if writer:
        writer.start()
    loader.start()
    switch = sys.getswitchinterval()
    sys.setswitchinterval(min(switch, SWITCH_INTERVAL))
    job = object()
    try:
        while True:
            t0 = time.perf_counter()
            got = loader.q.get()
            stats.wait_s += time.perf_counter() - t0
            if got is _DONE:
                break
            if isinstance(got, BaseException):
                raise got
            if writer and writer.error:
                raise writer.error
            task, loaded, sums = got
            plan = plans[task.image]
            t0 = time.perf_counter()
            if isinstance(loaded, Exception):
                payload = _pack({"error": str(loaded), "tiles": plan.chunks[task.pass_][task.chunk]})
            elif isinstance(sums, str):  # another process could not read this image in pass 1
                payload = _pack({"error": sums, "tiles": plan.chunks[task.pass_][task.chunk]})
            else:
                image, mask = loaded
                header, arrays, n = _compute(engine, plan, task, image, mask, sums, job)
                header["seconds"] = time.perf_counter() - t0
                if writer and task.pass_ == PASS_MAIN:
                    # Views of the engine's host buffers, not copies: the writer's stitching
                    # is the one copy (a copy here cost the main thread 50-110 ms a 4096^2
                    # image on this project's CPU). The views keep the (pinned) buffers from
                    # being reused until then.
                    writer.local[task.key] = (header, arrays)
                    payload = _pack({"local": True})
                else:
                    payload = _pack(header, arrays)
                stats.tiles["global" if task.pass_ == PASS_GLOBAL else "main"] += n
            stats.compute_s += time.perf_counter() - t0
            stats.tasks += 1
            stats.bytes_sent += len(payload)
            store.set(task.key, payload)
    except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM: rank 0 says what it wrote, for the report
        raise _interrupted(e, writer) from e
    finally:
        loader.stop.set()
        sys.setswitchinterval(switch)
        engine.release_features()
    stats.decode_s = loader.decode_s
    store.set(f"stats/{ctx.rank}", json.dumps(stats.__dict__))
    if not writer:
        return [], [stats]
    try:
        writer.join()
    except KeyboardInterrupt as e:
        raise _interrupted(e, writer) from e
    if writer.error:
        raise writer.error
    ctx.wait(store, [f"stats/{r}" for r in range(ctx.world_size)], describe=lambda k: f"rank {k[6:]}'s last task")
    all_stats = [RankStats(**json.loads(store.get(f"stats/{r}"))) for r in range(ctx.world_size)]
    return writer.results, all_stats
