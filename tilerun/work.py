"""One process's share of a job: claim -> compute -> deliver, and finish -> write.

The road: plan (`scheduler`: images, tiles and chunks every rank agrees on) -> ownership
(`owners`: each image whole or spread, and a spread image's finisher) -> claims (here: one
counter in the c10d store) -> compute (`engine`) -> assemble (`assemble.Canvas`; a spread
image's chunks from other processes through `parts` or `transport`) -> write
(`assemble.OutputWriter`, in the process that finishes the image).

* **Claims.** ``store.add("claim", 1)`` hands out task numbers of one list that every rank
  builds alike (`task_list`): the spread images' chunks first (pass 1 of spread image k+1
  before pass 2 of image k, so sums are ready when wanted), then the whole images, largest
  first (`owners`). A whole task is an image: its pass 1 and pass 2 run in the process that
  claimed it, which writes it; its chunks' batches are the plan's, so the bits are those of
  any other split.
* **Spread images.** A pass-1 chunk publishes its tiles' float64 partial sums in the store
  (a few hundred bytes a tile; with a shared OUTPUT also in the image's part store, so a
  rerun skips them). A pass-2 chunk's uint8 cores go to the image's finisher: with a shared
  OUTPUT into the part store, every chunk (the finisher's own too, so that all survive a
  kill); else in memory when the finisher is this process, or over the process group
  (`transport.PointToPoint`, tag = task number). Then a key ``d/<image>/<chunk>`` names the
  rank that computed it. The finisher's thread (`_Finisher`) waits for each chunk's key,
  takes its cores from where that rank put them, and writes the image.
* **The store** carries claims, pass-1 sums, the chunk keys, two progress counters
  (rank 0's progress bar polls them) and each rank's results at the end: no pixels.
* **Resume at tile level** (shared OUTPUT): chunks an earlier run left in a part store
  (``kept``) are not in the task list; the finisher reads them from the part store.
"""

from __future__ import annotations

import json
import logging
import queue
import signal
import sys
import threading
import time
import zlib
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from . import assemble
from .assemble import Canvas, OutputWriter
from .errors import InputImageError, Interrupted
from .decoded import NodeDecodes, remove_stale
from .engine import Partials
from .images import keep_radiometry_note, load_image, load_mask, radiometry_note, radiometry_spec, sidecar_mask_path
from .owners import Ownership
from .parts import PartStore
from .sources import WindowedImage, describe, open_source, windowed
from .transport import PointToPoint, pack, unpack

if TYPE_CHECKING:
    from .dist import Context
    from .engine import Engine

__all__ = ["PASS_WHOLE", "PASS_GLOBAL", "PASS_MAIN", "Task", "RankStats", "task_list", "SpreadIO", "run_worker"]

log = logging.getLogger("tilerun")

PASS_WHOLE, PASS_GLOBAL, PASS_MAIN = 0, 1, 2

#: Python's thread switch interval during a job (seconds). The loader and the finisher run
#: Python between their C calls, and while one holds the GIL the compute workers' next
#: torch op waits for it, up to the switch interval: 5 ms by default. Measured, the CLI job
#: over bench/end_to_end.py's folder on CPU: 18.2 / 19.0 s at 0.5 ms vs 20.5 / 22.2 s at 5 ms.
SWITCH_INTERVAL = 0.0005
#: Seconds between rank 0's looks at the progress counters.
PROGRESS_POLL_S = 0.25

Kept = dict[int, dict[int, set[int]]]  # image -> pass -> chunks an earlier run left in its part store


@dataclass(frozen=True)
class Task:
    image: int
    pass_: int  # PASS_WHOLE: the whole image, both passes
    chunk: int

    @property
    def key(self) -> str:
        return f"r/{self.image}/{self.pass_}/{self.chunk}"


@dataclass
class RankStats:
    rank: int
    tiles: dict[str, int] = field(default_factory=lambda: {"global": 0, "main": 0})
    tiles_reused: int = 0  # pass-2 tiles an earlier run left in a part store, not recomputed
    tasks: int = 0
    compute_s: float = 0.0
    wait_s: float = 0.0  # main thread waiting for the loader (decode, claims, global sums)
    decode_s: float = 0.0  # the loader reading and decoding images (behind compute)
    decodes_shared: int = 0  # spread images mapped from another process's decode on this node (`decoded`)
    images_written: int = 0
    bytes_written: int = 0  # output files this process wrote
    bytes_sent: int = 0  # through the c10d store
    bytes_p2p: int = 0  # over the process group
    bytes_parts: int = 0  # into part stores
    # Wall-clock time (time.time) when this rank's share began (claims) and ended (its writes
    # done): the span from the first start to the last end is the job's work, without start-up.
    started_at: float = 0.0
    ended_at: float = 0.0


def _todo(plans, kept: Kept, i: int, pass_: int, global_pass: bool) -> list[int]:
    """Chunks of ``pass_`` of spread image ``i`` that this run computes."""
    k = kept.get(i, {})
    main = [c for c in range(len(plans[i].chunks[PASS_MAIN])) if c not in k.get(PASS_MAIN, ())]
    if pass_ == PASS_MAIN:
        return main
    if not global_pass or not main:  # every core kept: no sums needed
        return []
    return [c for c in range(len(plans[i].chunks[PASS_GLOBAL])) if c not in k.get(PASS_GLOBAL, ())]


def task_list(plans, own: Ownership, *, global_pass: bool, kept: Kept | None = None) -> list[Task]:
    """The claim list, alike on every rank: spread images' chunks, then whole images."""
    kept = kept or {}
    spread = list(own.spread)
    tasks: list[Task] = []

    def pass1(i: int) -> None:
        tasks.extend(Task(i, PASS_GLOBAL, c) for c in _todo(plans, kept, i, PASS_GLOBAL, global_pass))

    if spread:
        pass1(spread[0])
    for k, i in enumerate(spread):
        if k + 1 < len(spread):
            pass1(spread[k + 1])
        tasks.extend(Task(i, PASS_MAIN, c) for c in _todo(plans, kept, i, PASS_MAIN, global_pass))
    tasks.extend(Task(i, PASS_WHOLE, 0) for i in own.whole)
    return tasks


def chunk_key(image: int, chunk: int) -> str:
    """The store key that names the rank which computed a spread image's pass-2 chunk."""
    return f"d/{image}/{chunk}"


def describer(plans) -> Callable[[str], str]:
    """A store key of a task's result as words, for a stall message."""

    def describe(key: str) -> str:
        parts = key.split("/")
        if parts[0] == "r":
            i, pass_, c = map(int, parts[1:])
        elif parts[0] == "d":
            (i, c), pass_ = map(int, parts[1:]), PASS_MAIN
        else:
            return key
        p = plans[i]
        return f"{p.item.key} (pass {pass_}, chunk {c + 1} of {len(p.chunks[pass_])})"

    return describe


class SpreadIO:
    """Where a spread image's pass-2 chunks go (`deliver`, computing side) and come from
    (`collect`, its finisher): this process's memory, the part store, or point to point."""

    def __init__(self, rank: int, *, parts: dict[int, PartStore] | None = None, p2p: PointToPoint | None = None) -> None:
        if parts is None and p2p is None:
            raise ValueError("a spread image needs a part store (shared OUTPUT) or the process group")
        self.rank, self.parts, self.p2p = rank, parts, p2p
        self._local: dict[tuple[int, int], tuple[dict, list]] = {}
        self._cond = threading.Condition()
        self.bytes_sent = 0  # through the store: the chunk keys
        self.bytes_parts = 0

    def deliver(self, store, tag: int, image: int, chunk: int, finisher: int, header: dict, arrays) -> None:
        if self.parts is not None:
            # The finisher's own chunks too: in the part store they survive a kill (tile-level resume).
            self.bytes_parts += self.parts[image].put(PASS_MAIN, chunk, header, arrays)
        elif finisher == self.rank:
            # Views of the engine's host buffers, not copies: the canvas is the one copy.
            with self._cond:
                self._local[(image, chunk)] = (header, arrays)
                self._cond.notify_all()
        else:
            self.p2p.send(finisher, tag, header, arrays)
        key, value = chunk_key(image, chunk), str(self.rank)
        store.set(key, value)
        self.bytes_sent += len(key) + len(value)

    def collect(self, store, tag: int, image: int, chunk: int, wait: Callable) -> tuple[dict, list]:
        """``wait(store, keys)``: until the keys are set (`Context.wait`)."""
        key = chunk_key(image, chunk)
        wait(store, [key])
        rank = int(store.get(key))
        if self.parts is not None:
            return self.parts[image].get(PASS_MAIN, chunk)
        if rank == self.rank:
            with self._cond:
                self._cond.wait_for(lambda: (image, chunk) in self._local)
                return self._local.pop((image, chunk))
        _, header, arrays = self.p2p.recv(tag, src=rank)
        return header, arrays


_DONE = object()


def load_input(item, *, mask_dir=None) -> tuple:
    """(image, mask) for the engine. An input `sources.windowed` reads: a `sources.WindowedImage`
    and its mask, whose windows are decoded as the engine asks for them (the decompression-bomb
    limit does not apply: no full-size array of it is ever made); any other: decoded whole."""
    if not windowed(item.path):
        return load_image(item, mask_dir=mask_dir)
    image = WindowedImage(open_source(item.path))
    try:  # the image's mapping to uint8, as a whole decode would find it (`sources`)
        keep_radiometry_note(item.path, image.source.prepare_radiometry(radiometry_spec()))
    except ValueError as e:  # --bands names a band the image lacks
        raise InputImageError(str(e)) from e
    side = sidecar_mask_path(item, mask_dir)
    if side is not None:  # a PNG mask has no windows: read whole (a bool a pixel)
        image.sidecar = load_mask(side, image.shape[:2])
    return image, image.mask


class _Loader(threading.Thread):
    """Claims tasks and prepares their inputs (decoded image; a spread pass-2 chunk's sums) ahead of compute."""

    def __init__(self, ctx, engine, plans, tasks: list[Task], mask_dir, *, parts, kept: Kept,
                 shared: NodeDecodes | None = None, spread=(), depth: int = 2):
        super().__init__(daemon=True, name="tilerun-loader")
        self.ctx, self.engine, self.plans, self.tasks, self.mask_dir = ctx, engine, plans, tasks, mask_dir
        self.parts, self.kept = parts, kept
        self.shared, self.spread = shared, set(spread)  # spread images: one decode per node (`decoded`)
        self.describe = describer(plans)
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.images: OrderedDict[int, tuple | InputImageError] = OrderedDict()
        self.sums: OrderedDict[int, torch.Tensor | str] = OrderedDict()
        self.stop = threading.Event()
        self.decode_s = 0.0

    def _decode(self, i: int):
        p = self.plans[i]
        image, mask = load_input(p.item, mask_dir=self.mask_dir)
        if mask.shape != (p.height, p.width):
            raise InputImageError(f"decoded size {mask.shape} differs from its header {(p.height, p.width)}")
        return image, mask

    def _image(self, store, i: int):
        if i not in self.images:
            p = self.plans[i]
            t0 = time.perf_counter()
            try:
                if self.shared is not None and i in self.spread and not windowed(p.item.path):
                    self.images[i] = self.shared.load(
                        store, i, p.item.key, lambda: self._decode(i), note=lambda: radiometry_note(p.item.path),
                        adopt=lambda note: keep_radiometry_note(p.item.path, note))
                else:
                    self.images[i] = self._decode(i)
            except InputImageError as e:
                self.images[i] = e
            except Exception as e:  # the per-file boundary: one bad file costs that file, not the job
                log.debug("%s: unexpected error while reading", p.item.path, exc_info=True)
                self.images[i] = InputImageError(f"{type(e).__name__}: {e}")
            self.decode_s += time.perf_counter() - t0
            while len(self.images) > 2:  # this image and the next
                self.images.popitem(last=False)
        return self.images[i]

    def _global_sums(self, store, i: int):
        """Spread image ``i``'s sums from every pass-1 chunk (store, or kept in its part store); or the error text."""
        if i not in self.sums:
            p = self.plans[i]
            kept = self.kept.get(i, {}).get(PASS_GLOBAL, set())
            chunks = range(len(p.chunks[PASS_GLOBAL]))
            keys = [Task(i, PASS_GLOBAL, c).key for c in chunks if c not in kept]
            if keys:
                self.ctx.wait(store, keys, describe=self.describe)
            partials: list[Partials] = []
            error = None
            for c in chunks:
                if c in kept:
                    header, arrays = self.parts[i].get(PASS_GLOBAL, c)
                else:
                    header, arrays = unpack(store.get(Task(i, PASS_GLOBAL, c).key))
                if header.get("error"):
                    error = header["error"]
                    break
                partials.append(_partials_of(p, header, arrays))
            self.sums[i] = error if error is not None else self.engine.reduce_partials(partials)
            while len(self.sums) > 2:
                self.sums.popitem(last=False)
        return self.sums[i]

    def _pass2_keys(self, i: int) -> list[str]:
        """The keys that mark spread image ``i``'s pass-2 chunks delivered: then nobody needs its pixels."""
        return [chunk_key(i, c) for c in _todo(self.plans, self.kept, i, PASS_MAIN, False)]

    def run(self) -> None:
        store = self.ctx.store_client()
        try:
            while not self.stop.is_set():
                n = store.add("claim", 1) - 1
                if n >= len(self.tasks):
                    break
                task = self.tasks[n]
                # Whoever waits for this task's result can name this rank and the task.
                if task.pass_ == PASS_GLOBAL:
                    self.ctx.claimed(store, task.key)
                elif task.pass_ == PASS_MAIN:
                    self.ctx.claimed(store, chunk_key(task.image, task.chunk))
                if self.ctx.distributed:
                    store.set(f"holds/{self.ctx.rank}", self.describe(task.key) if task.pass_ != PASS_WHOLE
                              else f"{self.plans[task.image].item.key} (the whole image)")
                if self.shared is not None:
                    self.shared.release_finished(store, self._pass2_keys)
                loaded = self._image(store, task.image)
                sums = None
                if not isinstance(loaded, Exception) and task.pass_ == PASS_MAIN and self.engine.uses_global:
                    sums = self._global_sums(store, task.image)
                self.q.put((n, task, loaded, sums))
        except BaseException as e:  # surfaced in the main thread, which owns the process's fate
            self.q.put(e)
            return
        self.q.put(_DONE)


def _pass1_payload(partials: Partials, tiles: list) -> tuple[dict, list[np.ndarray]]:
    """A pass-1 chunk as the store and the part store carry it: its tiles' global terms, then
    its context's cell sums (a few KB per tile: the coordinator never carries pixels)."""
    header = {"tiles": [t.index for t in tiles]}
    arrays = [np.stack([partials.terms[t.index].numpy() for t in tiles])]
    if partials.cells is not None:
        # Compressed: most class counts are zero. zlib at level 1 takes a 384^2 tile's cell sums
        # from 9.5 to 3.6 KiB (`python bench/context_cost.py`).
        header["cells"] = [[g, r, c, list(a.shape)] for g, r, c, a in partials.cells]
        raw = b"".join(np.ascontiguousarray(a, np.uint16).tobytes() for *_, a in partials.cells)
        arrays.append(np.frombuffer(zlib.compress(raw, 1), np.uint8))
    return header, arrays


def _partials_of(plan, header: dict, arrays: list[np.ndarray]) -> Partials:
    """`_pass1_payload` read back (no cell sums for a model without a whole-image context)."""
    cells = None
    if "cells" in header:
        flat = np.frombuffer(zlib.decompress(arrays[1]), np.uint16)
        cells, off = [], 0
        for g, r, c, shape in header["cells"]:
            n = int(np.prod(shape))
            cells.append((g, r, c, flat[off : off + n].reshape(shape)))
            off += n
    terms = {t: torch.from_numpy(row.copy()) for t, row in zip(header["tiles"], arrays[0])}
    return Partials((plan.height, plan.width), terms, cells)


def _main_chunk(engine, plan, ids: list[int], image, mask, sums, key) -> tuple[dict, list[np.ndarray]]:
    header_tiles, arrays = [], []
    for r in engine.compute(image, mask, [plan.tiles[i] for i in ids], sums, key=key):
        header_tiles.append([r.tile.index, r.classes is not None, r.rgb is not None])
        arrays += [a for a in (r.classes, r.rgb) if a is not None]
    return {"tiles": header_tiles}, arrays


def _whole_image(engine, plan, image, mask, key, *, on_chunk: Callable[[list[int]], None],
                 new_canvas: Callable | None = None, start: Callable[[Canvas], None] | None = None) -> Canvas:
    """One whole-image task: both passes over the plan's chunks (the same batches, hence the
    same bits, as when the image is spread), stitched in this process. ``start(canvas)``:
    called with the empty canvas once pass 2 begins (a streaming write)."""
    sums = None
    if engine.uses_global:
        sums = engine.reduce_partials([engine.global_partials(image, mask, [plan.tiles[i] for i in ids], key=key)
                                       for ids in plan.chunks[PASS_GLOBAL]])
    canvas = new_canvas(plan) if new_canvas else Canvas(plan.height, plan.width, plan.tiles)
    if start is not None:
        start(canvas)
    try:
        for ids in plan.chunks[PASS_MAIN]:
            canvas.add(*_main_chunk(engine, plan, ids, image, mask, sums, key))
            on_chunk(ids)
    except BaseException:
        canvas.abort()  # its streaming write gives up
        _discard(canvas)
        raise
    return canvas


def _discard(canvas: Canvas) -> None:
    """A canvas that will not be written: an `omezarr.OmeZarrCanvas` removes its temporary folder."""
    if hasattr(canvas, "discard"):
        canvas.discard()


def _decided(plans, written: tuple) -> dict:
    """An `OutputWriter` result as a report entry."""
    key, outputs, error, seconds = written
    p = next(q for q in plans if q.key == key)
    return {"input": key, "status": "failed" if error else "ok", "outputs": outputs or [],
            "size": [p.width, p.height], "tiles": len(p.tiles), "seconds": seconds, "error": error,
            "radiometry": radiometry_note(p.item.path, forget=True), "read": describe(p.item.path)}


def _error_header(plan, pass_: int, chunk: int, error: str) -> dict:
    return {"error": error, "tiles": [[i, False, False] for i in plan.chunks[pass_][chunk]]}


class _Finisher(threading.Thread):
    """Assembles and writes the spread images this rank finishes, as their chunks arrive."""

    def __init__(self, ctx, plans, own: Ownership, tags: dict[tuple[int, int], int], io: SpreadIO,
                 writer: OutputWriter, kept: Kept, failed: Callable, done_tiles: Callable[[int], None],
                 new_canvas: Callable = None):
        super().__init__(daemon=True, name="tilerun-finisher")
        self.ctx, self.plans, self.own, self.tags, self.io, self.writer = ctx, plans, own, tags, io, writer
        self.kept, self.failed, self.done_tiles = kept, failed, done_tiles
        self.new_canvas = new_canvas or (lambda p: Canvas(p.height, p.width, p.tiles))
        self.error: BaseException | None = None
        self.canvas: Canvas | None = None  # the image being collected
        self.reused = 0
        describe = describer(plans)
        self.wait = lambda store, keys: ctx.wait(store, keys, describe=describe)

    def run(self) -> None:
        try:
            store = self.ctx.store_client()
            for i, rank in self.own.spread.items():
                if rank != self.ctx.rank:
                    continue
                p = self.plans[i]
                canvas = self.canvas = self.new_canvas(p)
                # Written as its rows become final: the encoding overlaps the computing of
                # the rest, instead of being the job's tail (python bench/scale_out.py).
                parts = self.io.parts[i] if self.io.parts is not None else None
                self.writer.submit(p.key, canvas, 0.0, after=parts.remove if parts is not None else None,
                                   wide=True, streaming=True)
                kept = self.kept.get(i, {}).get(PASS_MAIN, set())
                for c in range(len(p.chunks[PASS_MAIN])):
                    if c in kept:
                        n = canvas.add(*self.io.parts[i].get(PASS_MAIN, c))
                        self.reused += n
                        self.done_tiles(n)
                    else:
                        canvas.add(*self.io.collect(store, self.tags[(i, c)], i, c, self.wait))
                if canvas.error:  # its write gives up (`Canvas.wait_rows`); reported here
                    _discard(canvas)
                    self.failed(p, canvas.error)
        except BaseException as e:
            self.error = e
            if self.canvas is not None:
                self.canvas.abort()


def run_worker(
    ctx: "Context",
    engine: "Engine",
    plans: list,
    own: Ownership,
    *,
    write: Callable,
    io: SpreadIO | None,
    kept: Kept | None = None,
    mask_dir=None,
    on_tiles: Callable[[int, int], None] | None = None,
    new_canvas: Callable | None = None,
) -> tuple[list[dict], list[RankStats]]:
    """Compute this process's claims and write the images it finishes.

    ``write(key, classes, rgb, strips)``: writes one image's outputs, returns their paths.
    ``io``: how spread images' chunks travel (None: no image is spread). ``on_tiles(tiles,
    images)`` (rank 0): every rank's progress. Returns (every rank's per-image results as
    dicts: input, status, outputs, size, tiles, seconds, error; every rank's stats) on rank
    0, ([], [own stats]) elsewhere. ``new_canvas(plan)``: the `assemble.Canvas` an image's cores
    go into (default: in memory; `omezarr.OmeZarrCanvas` writes them to disk as they come).
    """
    started_at = time.time()
    kept = kept or {}
    store = ctx.store_client()
    ctx.claimed(store, f"results/{ctx.rank}")  # a rank that stops is named by what it holds (`_holds`)
    tasks = task_list(plans, own, global_pass=engine.uses_global, kept=kept)
    tags = {(t.image, t.chunk): n for n, t in enumerate(tasks) if t.pass_ == PASS_MAIN}
    stats = RankStats(ctx.rank, started_at=started_at)
    results: list[dict] = []
    results_lock = threading.Lock()
    counter_store = ctx.store_client()
    counter_lock = threading.Lock()

    def count(tiles: int = 0, images: int = 0, failed: int = 0) -> None:
        with counter_lock:
            for name, n in (("tiles", tiles), ("images", images), ("failed", failed)):
                if n:
                    counter_store.add(f"progress/{name}", n)

    def failed(p, error: str) -> None:
        log.error("%s: %s", p.item.path, error)
        count(images=1, failed=1)
        with results_lock:
            results.append({"input": p.key, "status": "failed", "outputs": [], "size": [p.width, p.height],
                            "tiles": len(p.tiles), "seconds": 0.0, "error": error})

    writer = OutputWriter(write, encoders=assemble.encoder_count(getattr(engine, "device", torch.device("cpu")).type))
    writer.on_written = lambda key, ok: count(images=1, failed=int(not ok))
    finisher = None
    if any(r == ctx.rank for r in own.spread.values()):
        finisher = _Finisher(ctx, plans, own, tags, io, writer, kept, failed, lambda n: count(tiles=n), new_canvas)
    shared = None
    if own.spread and ctx.distributed and ctx.local_world_size > 1:
        remove_stale()
        shared = NodeDecodes(lambda st, keys, describe: ctx.wait(st, keys, describe=describe), ctx.claimed)
    loader = _Loader(ctx, engine, plans, tasks, mask_dir, parts=io.parts if io else None, kept=kept,
                     shared=shared, spread=own.spread)
    poller = _ProgressPoller(ctx, on_tiles) if on_tiles is not None else None
    for t in (finisher, loader, poller):
        if t is not None:
            t.start()
    switch = sys.getswitchinterval()
    sys.setswitchinterval(min(switch, SWITCH_INTERVAL))
    job = object()
    ok = False
    try:
        while True:
            t0 = time.perf_counter()
            got = loader.q.get()
            stats.wait_s += time.perf_counter() - t0
            if got is _DONE:
                break
            if isinstance(got, BaseException):
                raise got
            if finisher is not None and finisher.error is not None:
                raise finisher.error
            n, task, loaded, sums = got
            p = plans[task.image]
            t0 = time.perf_counter()
            key = (job, p.index)  # the engine keeps pass 1's features under it for this process's pass 2
            if task.pass_ == PASS_WHOLE:
                if isinstance(loaded, Exception):
                    failed(p, str(loaded))
                    count(tiles=len(p.tiles))
                else:
                    done = []

                    def on_chunk(ids: list[int]) -> None:
                        done.extend(ids)
                        count(tiles=len(ids))

                    # An image of several claims is encoded as its rows become final, behind
                    # the computing of the rest (Canvas.wait_rows); one claim completes at once.
                    streaming = len(p.chunks[PASS_MAIN]) > 1
                    start = (lambda c: writer.submit(p.key, c, 0.0, streaming=True)) if streaming else None
                    try:
                        canvas = _whole_image(engine, p, *loaded, key, on_chunk=on_chunk, new_canvas=new_canvas,
                                              start=start)
                    except InputImageError as e:  # a window that cannot be decoded (`sources`): this file fails
                        failed(p, str(e))
                        count(tiles=len(p.tiles) - len(done))
                    else:
                        if engine.uses_global:
                            stats.tiles["global"] += len(p.tiles)
                        stats.tiles["main"] += len(p.tiles)
                        if not streaming:
                            writer.submit(p.key, canvas, time.perf_counter() - t0)
            elif task.pass_ == PASS_GLOBAL:
                error = str(loaded) if isinstance(loaded, Exception) else None
                if error:
                    header, arrays = _error_header(p, PASS_GLOBAL, task.chunk, error), []
                else:
                    image, mask = loaded
                    tiles = [p.tiles[i] for i in p.chunks[PASS_GLOBAL][task.chunk]]
                    try:
                        header, arrays = _pass1_payload(engine.global_partials(image, mask, tiles, key=key), tiles)
                        stats.tiles["global"] += len(tiles)
                    except InputImageError as e:  # a window that cannot be decoded (`sources`)
                        error = str(e)
                        header, arrays = _error_header(p, PASS_GLOBAL, task.chunk, error), []
                if io is not None and io.parts is not None and not error:
                    stats.bytes_parts += io.parts[task.image].put(PASS_GLOBAL, task.chunk, header, arrays)
                payload = pack(header, arrays)
                store.set(task.key, payload)
                stats.bytes_sent += len(payload)
            else:
                ids = p.chunks[PASS_MAIN][task.chunk]
                if isinstance(loaded, Exception) or isinstance(sums, str):
                    header, arrays = _error_header(p, PASS_MAIN, task.chunk, str(loaded) if isinstance(loaded, Exception) else sums), []
                else:
                    image, mask = loaded
                    try:
                        header, arrays = _main_chunk(engine, p, ids, image, mask, sums, key)
                        stats.tiles["main"] += len(ids)
                    except InputImageError as e:  # a window that cannot be decoded (`sources`)
                        header, arrays = _error_header(p, PASS_MAIN, task.chunk, str(e)), []
                io.deliver(store, n, task.image, task.chunk, own.spread[task.image], header, arrays)
                count(tiles=len(ids))
            stats.compute_s += time.perf_counter() - t0
            stats.tasks += 1
        if finisher is not None:
            finisher.join()
            if finisher.error is not None:
                raise finisher.error
        ok = True
    except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM: the writes in flight finish, then say what was written
        decided = [_decided(plans, r) for r in writer.abandon()]
        with results_lock:
            decided += results
        raise Interrupted(getattr(e, "signum", signal.SIGINT), results=decided) from e
    finally:
        loader.stop.set()
        if shared is not None:
            # After _DONE the loader has stopped. On a failure it may still be writing a
            # decode; a file it writes after this is the next job's on this host to remove.
            shared.close()
        sys.setswitchinterval(switch)
        engine.release_features()
        if not ok:
            writer.abandon()
    results += [_decided(plans, written) for written in writer.close()]
    if io is not None:
        if io.p2p is not None:
            io.p2p.flush()
            stats.bytes_p2p = io.p2p.bytes_sent
        stats.bytes_sent += io.bytes_sent
        stats.bytes_parts += io.bytes_parts
    stats.decode_s = loader.decode_s
    stats.decodes_shared = shared.shared if shared is not None else 0
    stats.images_written, stats.bytes_written = writer.images_written, writer.bytes_written
    stats.tiles_reused = finisher.reused if finisher is not None else 0
    stats.ended_at = time.time()
    store.set(f"results/{ctx.rank}", json.dumps({"results": results, "stats": asdict(stats)}))
    if poller is not None:
        poller.finish()
    if ctx.rank != 0:
        return [], [stats]
    keys = [f"results/{r}" for r in range(ctx.world_size)]
    ctx.wait(store, keys, describe=_holds(ctx))
    all_results, all_stats = [], []
    for k in keys:
        doc = json.loads(store.get(k))
        all_results += doc["results"]
        all_stats.append(RankStats(**doc["stats"]))
    return all_results, all_stats


def _holds(ctx) -> Callable[[str], str]:
    """``results/RANK`` as words: the task that rank holds now (its last claim), for a stall message."""

    def describe(key: str) -> str:
        rank = key.split("/")[1]
        store = ctx.store_client()
        if store.check([f"holds/{rank}"]):
            return store.get(f"holds/{rank}").decode()
        return f"rank {rank}'s first task"

    return describe


class _ProgressPoller(threading.Thread):
    """Rank 0: every rank's tiles and images done, from the store's counters, into the progress bar."""

    def __init__(self, ctx, on_tiles: Callable[[int, int], None]) -> None:
        super().__init__(daemon=True, name="tilerun-progress")
        self.ctx, self.on_tiles = ctx, on_tiles
        self._halt = threading.Event()
        self._seen = (0, 0, 0)
        self._store = ctx.store_client()
        self._lock = threading.Lock()

    def poll(self) -> None:
        with self._lock:
            now = tuple(self._store.add(f"progress/{name}", 0) for name in ("tiles", "images", "failed"))
            dt, di, df = (a - b for a, b in zip(now, self._seen))
            self._seen = now
        if dt or di:
            self.on_tiles(dt, di, failed=df)

    def run(self) -> None:
        while not self._halt.wait(PROGRESS_POLL_S):
            self.poll()

    def finish(self) -> None:
        """Stop; a last look once every rank has counted (their results are in the store by then)."""
        self._halt.set()
        self.join()
        keys = [f"results/{r}" for r in range(self.ctx.world_size)]
        self.ctx.wait(self._store, keys, describe=_holds(self.ctx))
        self.poll()
