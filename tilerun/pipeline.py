"""Overlap I/O with compute: read ahead and write behind, each in one background thread.

Two reusable pieces for a per-process loop (read → tile → forward → crop → write):

* `prefetch` runs an iterable (decoding images, cutting tiles) in a thread up to
  ``depth`` items ahead of its consumer;
* `BackgroundWriter` runs jobs (PNG encode + atomic write) behind the consumer, at
  most ``depth`` of them waiting.

Both queues are bounded on purpose: a decoded 8192x8192 photo is 200 MB of uint8, so
"ahead" and "behind" must mean one or two images, never the whole folder. Threads (not
processes) suffice because the heavy parts — libjpeg/zlib inside Pillow, PyTorch
kernels — release the GIL.

Errors are never swallowed: an exception raised by the prefetched iterable is re-raised
in the consumer at the position it happened; a job that raises in the writer re-raises
in the caller at the next `BackgroundWriter.submit` or at `BackgroundWriter.close`. Errors
that should cost one file only (an undecodable image, a full disk) belong inside the
iterable or the job, caught narrowly and turned into a result.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable, Iterable, Iterator, TypeVar

__all__ = ["prefetch", "BackgroundWriter"]

T = TypeVar("T")

_END = object()
_POLL_S = 0.1  # how often a blocked producer checks whether its consumer has gone


class _Raised:
    """An exception from the producer thread, carried through the queue to the consumer."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


def prefetch(iterable: Iterable[T], *, depth: int = 1, name: str = "tilerun-prefetch") -> Iterator[T]:
    """Iterate ``iterable`` in a background thread, at most ``depth`` items ahead of the consumer.

    Items come out in order. With ``depth`` items waiting, the producer blocks, so at
    most ``depth + 2`` items are alive at once (queued, one being produced, one with
    the consumer). Closing the returned generator early (``break``, an exception in the
    loop body) stops the producer after the item it is working on.
    """
    if depth < 1:
        raise ValueError(f"prefetch depth must be >= 1, got {depth}")
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: Any) -> bool:
        # A plain put() could block forever once the consumer has stopped reading.
        while not stop.is_set():
            try:
                q.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in iterable:
                if not put(item):
                    return
        except BaseException as e:  # carried to the consumer, which decides the process's fate
            put(_Raised(e))
            return
        put(_END)

    # The thread starts on the first next(): a generator that is never iterated never runs
    # `iterable` and leaves no thread behind.
    def consume() -> Iterator[T]:
        thread = threading.Thread(target=produce, name=name, daemon=True)
        thread.start()
        try:
            while True:
                item = q.get()
                if item is _END:
                    return
                if isinstance(item, _Raised):
                    raise item.error
                yield item
        finally:
            stop.set()
            thread.join()

    return consume()


class BackgroundWriter:
    """Runs submitted jobs in order in one background thread, at most ``depth`` waiting.

    ``submit`` blocks while ``depth`` jobs wait, so the producer (compute) never gets
    more than ``depth + 1`` results ahead of the disk. Use as a context manager: leaving
    the block waits for every job; leaving it by an exception cancels the jobs not yet
    started.

    A job that raises stops nothing by itself; its exception is re-raised in the
    caller by the next ``submit`` or by ``close`` (once), and is also in its `Future`.
    """

    def __init__(self, *, depth: int = 1, name: str = "tilerun-writer") -> None:
        if depth < 1:
            raise ValueError(f"writer depth must be >= 1, got {depth}")
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._q.get()
            if job is _END:
                return
            future, fn, args, kwargs = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as e:  # handed to the submitting thread, see _raise_pending
                future.set_exception(e)
                with self._lock:
                    if self._error is None:
                        self._error = e

    def _raise_pending(self) -> None:
        with self._lock:
            error, self._error = self._error, None
        if error is not None:
            raise error

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future:
        """Queue ``fn(*args, **kwargs)``; blocks while ``depth`` jobs wait. Raises an earlier job's error."""
        self._raise_pending()
        if self._closed:
            raise RuntimeError("BackgroundWriter is closed")
        future: Future = Future()
        self._q.put((future, fn, args, kwargs))
        return future

    def close(self, *, cancel: bool = False) -> None:
        """Wait for the queued jobs (or cancel those not started) and stop the thread; raises a job's error."""
        if not self._closed:
            self._closed = True
            if cancel:
                while True:
                    try:
                        job = self._q.get_nowait()
                    except queue.Empty:
                        break
                    if job is not _END:
                        job[0].cancel()
            self._q.put(_END)
            self._thread.join()
        self._raise_pending()

    def __enter__(self) -> "BackgroundWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:
            self.close(cancel=True)
        except Exception as job_error:  # the body's exception is the one to raise; note the job's on it
            if hasattr(exc, "add_note"):  # Python >= 3.11
                exc.add_note(f"also, a background job failed: {job_error!r}")
