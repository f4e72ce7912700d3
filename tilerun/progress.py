"""Progress of a whole job: one tqdm bar over every tile, or periodic log lines.

The runner feeds one `Progress` object (`advance`, or `on_tiles` as the scheduler's
callback). In a distributed run only rank 0 shows anything: rank 0's writer sees every
tile of every process, so feeding it there counts the whole job; the other ranks get
``enabled=False`` and print nothing (errors go through logging, not through here).

On a terminal (stderr is a tty) it is a tqdm bar -- tiles done/total, tiles/s and ETA
from tqdm, images done and MP/s in the postfix. Elsewhere (a log file, CI, a batch
scheduler) a bar would be thousands of carriage returns, so it logs a line every
``interval`` seconds instead, plus one at the end. ``quiet`` silences both.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import IO

__all__ = ["Progress"]

log = logging.getLogger("tilerun")

# Seconds between log lines when stderr is not a terminal: often enough to see a job is
# alive in `tail -f`, rare enough that a day-long job logs a few thousand lines.
LOG_INTERVAL = 30.0
LOG_INTERVAL_VERBOSE = 5.0


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """Counts tiles, pixels and images done against the job's totals and shows them.

    ``total_*`` may be set later with `set_totals` (the runner knows the tiles only after
    planning). Images count every input of the job: one that failed is done, with a failure,
    and one already done by an earlier run is done from the start.
    """

    def __init__(
        self,
        *,
        total_tiles: int = 0,
        total_images: int = 0,
        total_pixels: int = 0,
        enabled: bool = True,
        quiet: bool = False,
        verbose: int = 0,
        stream: IO[str] | None = None,
        tty: bool | None = None,
        interval: float | None = None,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.active = enabled and not quiet
        self.tty = self._isatty(self.stream) if tty is None else tty
        self.verbose = verbose
        self.interval = interval if interval is not None else LOG_INTERVAL_VERBOSE if verbose else LOG_INTERVAL
        self.tiles = self.pixels = self.images = self.failed = self.skipped = 0
        self.total_tiles, self.total_images, self.total_pixels = total_tiles, total_images, total_pixels
        self._lock = threading.Lock()  # the scheduler calls from its writer thread
        self._t0 = time.perf_counter()
        self._last_log = self._t0
        self._bar = None
        self._redirect = None
        self._closed = False
        if self.active and self.tty:
            self._open_bar()

    @staticmethod
    def _isatty(stream) -> bool:
        try:
            return stream.isatty()
        except (AttributeError, ValueError):
            return False

    def _open_bar(self) -> None:
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        self._bar = tqdm(
            total=self.total_tiles or None,
            unit="tile",
            file=self.stream,
            dynamic_ncols=True,
            smoothing=0.1,
            desc="tilerun",
        )
        # Log lines (an input that failed) print above the bar instead of through it.
        self._redirect = logging_redirect_tqdm()
        self._redirect.__enter__()

    # -- feeding ---------------------------------------------------------------------
    def set_totals(self, *, tiles: int, images: int, pixels: int) -> None:
        with self._lock:
            self.total_tiles, self.total_images, self.total_pixels = tiles, images, pixels
            if self._bar is not None:
                self._bar.total = tiles
                self._bar.refresh()

    def advance(self, *, tiles: int = 0, pixels: int | None = None, images: int = 0, failed: int = 0,
                skipped: int = 0) -> None:
        """Count work done. ``pixels`` None: ``tiles`` times the job's mean tile area (the
        scheduler's callback knows tile counts only; the sum is exact once every tile is in).
        ``failed`` and ``skipped`` (already done): how many of ``images`` were."""
        with self._lock:
            if pixels is None:
                pixels = round(tiles * self.total_pixels / self.total_tiles) if self.total_tiles else 0
            self.tiles += tiles
            self.pixels += pixels
            self.images += images
            self.failed += failed
            self.skipped += skipped
            if not self.active:
                return
            if self._bar is not None:
                self._bar.set_postfix_str(self._postfix(), refresh=False)
                self._bar.update(tiles)  # refreshes at most every tqdm mininterval
            else:
                now = time.perf_counter()
                if now - self._last_log >= self.interval:
                    self._last_log = now
                    log.info("%s", self.line())

    def on_tiles(self, tiles: int, images: int, failed: int = 0) -> None:
        """The scheduler's ``on_tiles(tiles, images, failed=0)`` callback."""
        self.advance(tiles=tiles, images=images, failed=failed)

    # -- showing ---------------------------------------------------------------------
    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self._t0

    def _images(self) -> str:
        """``7/7 images (2 failed, 3 already done)``."""
        notes = [f"{n} {what}" for n, what in ((self.failed, "failed"), (self.skipped, "already done")) if n]
        return f"{self.images}/{self.total_images} images" + (f" ({', '.join(notes)})" if notes else "")

    def _postfix(self) -> str:
        mps = self.pixels / 1e6 / max(self.elapsed, 1e-9)
        return f"{self._images()}, {mps:.2f} MP/s"

    def line(self) -> str:
        """One log line: images, tiles, rates and ETA."""
        el = max(self.elapsed, 1e-9)
        rate = self.tiles / el
        pct = f" ({100 * self.tiles / self.total_tiles:.0f}%)" if self.total_tiles else ""
        left = self.total_tiles - self.tiles
        eta = _duration(left / rate) if rate > 0 and left > 0 else "--:--" if left > 0 else "done"
        return (
            f"{self._images()}, {self.tiles}/{self.total_tiles} tiles{pct}, "
            f"{rate:.1f} tiles/s, {self.pixels / 1e6 / el:.2f} MP/s, "
            f"{'ETA ' + eta if eta != 'done' else 'done'} after {_duration(el)}"
        )

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._bar is not None:
                self._bar.set_postfix_str(self._postfix(), refresh=False)
                self._bar.close()
                self._redirect.__exit__(None, None, None)
            elif self.active and self.tiles:
                log.info("%s", self.line())

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
