"""Assemble and write: the last two steps of plan -> claim -> compute -> assemble -> write.

Every process writes the images it finishes: the whole images it claimed (computed here,
nothing moved) and the spread images `owners` gave it, whose chunks computed elsewhere
come from the part store (shared OUTPUT, `parts`) or over the process group (`transport`).

* `Canvas`: one image's uint8 outputs (class index; RGB with the known pixels already the
  input's), filled chunk by chunk from results in the wire format's layout: a header
  ``tiles`` of ``[tile index, has classes, has rgb]`` and the arrays in that order.
* `OutputWriter`: a process's write-behind encoders. PNG encoding is the heaviest host
  step (zlib, ~0.2 s a 2048^2 RGB image on this project's CPU) and lets go of the GIL:
  ``encoders`` images at once, and with more than one encoder each image's strips on as
  many threads again. Images waiting for an encoder are bounded by ``max_pixels``, so a
  lone huge image still goes through, one at a time.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import numpy as np

from .geometry import Tile

__all__ = ["Canvas", "CanvasAborted", "OutputWriter"]

log = logging.getLogger("tilerun")


class CanvasAborted(Exception):
    """The canvas will not be completed (a chunk failed, or the job stops): its writer gives up."""


class Canvas:
    """One image's uint8 outputs, filled from chunk results; the first error wins.

    An encoder may start before the canvas is full (`OutputWriter.submit` with
    ``streaming``): `wait_rows` blocks until the rows it asks for are final. Tiles are
    row-major (`geometry.grid`), so the rows above the first tile not yet placed are done,
    whatever order the chunks come in.
    """

    def __init__(self, height: int, width: int, tiles: list[Tile]) -> None:
        self.height, self.width, self.tiles = height, width, tiles
        self.classes: np.ndarray | None = None
        self.rgb: np.ndarray | None = None
        self.error: str | None = None
        self.filled = 0  # tiles placed
        self._placed = bytearray(len(tiles))
        self._first_open = 0  # the first tile, row-major, not yet placed
        self._aborted = False
        self._cond = threading.Condition()

    @property
    def rows_done(self) -> int:
        """Rows [0, rows_done) are final."""
        return self.tiles[self._first_open].y0 if self._first_open < len(self.tiles) else self.height

    def add(self, header: dict, arrays) -> int:
        """Place one chunk's cores (or note its error); the chunk's tile count."""
        n = len(header.get("tiles", ()))
        if header.get("error"):
            with self._cond:
                self.error = self.error or header["error"]
                self._cond.notify_all()
            return n
        if self.error:
            return n
        it = iter(arrays)
        for t_index, has_cls, has_rgb in header["tiles"]:
            t = self.tiles[t_index]
            if has_cls:
                if self.classes is None:
                    self.classes = np.zeros((self.height, self.width), np.uint8)
                self.classes[t.y0 : t.y1, t.x0 : t.x1] = next(it)
            if has_rgb:
                if self.rgb is None:
                    self.rgb = np.zeros((self.height, self.width, 3), np.uint8)
                self.rgb[t.y0 : t.y1, t.x0 : t.x1] = next(it)
            self.filled += 1
            self._placed[t_index] = 1
        with self._cond:
            while self._first_open < len(self.tiles) and self._placed[self._first_open]:
                self._first_open += 1
            self._cond.notify_all()
        return n

    def abort(self) -> None:
        """Wake whoever waits: this canvas will not be completed."""
        with self._cond:
            self._aborted = True
            self._cond.notify_all()

    def _wait(self, done: Callable[[], bool]) -> None:
        with self._cond:
            self._cond.wait_for(lambda: done() or self.error is not None or self._aborted)
            if self.error is not None or self._aborted:
                raise CanvasAborted(self.error or "stopped")

    def wait_started(self) -> None:
        """Until the first chunk is placed, so that the outputs the model gives exist."""
        self._wait(lambda: self.filled > 0)

    def wait_rows(self, y: int) -> None:
        """Until rows [0, y) are final; `CanvasAborted` if they never will be."""
        self._wait(lambda: self.rows_done >= y)


#: Images encoded at once by a process's writer when the engine runs on a GPU.
ENCODERS_GPU = 4
#: Pixels of finished images that may wait for or be in their encoders (4 bytes a pixel:
#: 64 MP ~ 256 MB). One image larger than that is written alone.
ENCODE_PIXELS = 64 * 2**20


def encoder_count(device_type: str) -> int:
    """PNG encoder threads. CPU: the engine's workers already use every core, so one. A GPU
    leaves the cores to the host side, where encoding was most of a run (BENCHMARKS.md, GPU)."""
    return 1 if device_type == "cpu" else max(1, min(ENCODERS_GPU, os.cpu_count() or 1))


class OutputWriter:
    """Encodes and writes finished images behind the caller's back, in order of submission.

    ``write(key, classes, rgb, strips)`` writes one image's outputs and returns their paths
    (`runner.write_outputs` bound to the job's output plan); ``strips`` is an executor for
    a PNG's strips or None. A streaming write also gets ``ready=``, a callable that blocks
    until rows [0, y) are final. `submit` blocks while ``max_pixels`` of images, or more than
    ``encoders`` + 1 images, are pending (one waits while the encoders work).
    """

    def __init__(self, write: Callable[..., list[str]], *,
                 encoders: int = 1, max_pixels: int | None = None) -> None:
        self._write = write
        self.encoders, self.max_pixels = encoders, ENCODE_PIXELS if max_pixels is None else max_pixels
        self._pool = ThreadPoolExecutor(encoders, thread_name_prefix="tilerun-png")
        self._strips = ThreadPoolExecutor(encoders, thread_name_prefix="tilerun-zlib") if encoders > 1 else None
        # A spread image's strips on every core: its finisher encodes it when the other
        # processes are done with it (often the job's tail), so their cores are free.
        wide = os.cpu_count() or 1
        self._wide = ThreadPoolExecutor(wide, thread_name_prefix="tilerun-zlib-wide") if wide > 1 else None
        self._pending: deque[tuple[int, Future, Canvas]] = deque()
        self._pixels = 0
        self._lock = threading.Lock()
        self._submit_lock = threading.Lock()
        self.results: list[tuple[str, list[str] | None, str | None, float]] = []  # key, outputs, error, seconds
        self.images_written = 0
        self.bytes_written = 0
        self.on_written: Callable[[str, bool], None] | None = None  # (key, written ok), from an encoder thread

    def _job(self, key: str, canvas: Canvas, seconds: float, after, wide: bool, streaming: bool
             ) -> tuple[str, list[str] | None, str | None, float] | None:
        t0 = time.perf_counter()
        try:
            pool = self._wide if wide else self._strips
            if streaming:
                canvas.wait_started()
                outputs = self._write(key, canvas.classes, canvas.rgb, pool, ready=canvas.wait_rows)
            else:
                outputs = self._write(key, canvas.classes, canvas.rgb, pool)
        except CanvasAborted:  # the image failed or the job stops: its finisher reports it
            return None
        except OSError as e:
            log.error("%s: cannot write output: %s", key, e)
            if self.on_written is not None:
                self.on_written(key, False)
            return key, None, f"cannot write output: {e}", seconds + time.perf_counter() - t0
        size = 0
        for p in outputs:
            try:
                size += os.path.getsize(p)
            except OSError:
                pass
        with self._lock:
            self.images_written += 1
            self.bytes_written += size
        if after is not None:
            after()
        if self.on_written is not None:
            self.on_written(key, True)
        return key, outputs, None, seconds + time.perf_counter() - t0

    def _finish_one(self) -> None:
        pixels, fut, _ = self._pending.popleft()
        self._pixels -= pixels
        result = fut.result()
        if result is not None:
            self.results.append(result)

    def submit(self, key: str, canvas: Canvas, seconds: float = 0.0, *, after: Callable[[], None] | None = None,
               wide: bool = False, streaming: bool = False) -> None:
        """Queue ``canvas`` (complete, error-free) to be written as ``key``'s outputs; ``after()``
        runs once they are written (a spread image's part store is removed then, not before).
        ``wide``: compress its strips on every core (a spread image). ``streaming``: the canvas
        is still being filled; its rows are encoded as they become final (`Canvas.wait_rows`),
        so that encoding overlaps the computing of the rest. Whoever fills it calls
        `Canvas.abort` if it will not be completed; the write is then dropped without a result."""
        with self._submit_lock:  # the main thread (whole images) and the finisher (spread ones)
            self._submit(key, canvas, seconds, after, wide, streaming)

    def _submit(self, key, canvas, seconds, after, wide, streaming) -> None:
        px = canvas.height * canvas.width
        while self._pending and (len(self._pending) > self.encoders or self._pixels + px > self.max_pixels):
            self._finish_one()
        fut = self._pool.submit(self._job, key, canvas, seconds, after, wide, streaming)
        self._pending.append((px, fut, canvas))
        self._pixels += px

    def close(self) -> list[tuple[str, list[str] | None, str | None, float]]:
        """Wait for every write; the results (key, outputs, error, seconds), in submission order."""
        try:
            with self._submit_lock:
                while self._pending:
                    self._finish_one()
        finally:
            self._pool.shutdown(wait=True)
            for pool in (self._strips, self._wide):
                if pool is not None:
                    pool.shutdown(wait=True)
        return self.results

    def abandon(self) -> list[tuple[str, list[str] | None, str | None, float]]:
        """Stop (an interrupt, or the job failing): the writes in flight finish, no other starts.
        The results decided so far; every output of those that are ok is complete on disk."""
        for _, _, canvas in self._pending:  # a streaming write waits for rows that will not come
            canvas.abort()
        self._pool.shutdown(wait=True, cancel_futures=True)
        for pool in (self._strips, self._wide):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        done = list(self.results)
        for _, fut, _ in self._pending:
            if fut.done() and not fut.cancelled() and fut.exception() is None and fut.result() is not None:
                done.append(fut.result())
        self._pending.clear()
        return done
