"""Where a CLI job's seconds go, thread by thread: runs ``tilerun run ARGS...`` in this process
with the scheduler's steps timed (main thread: each task; writer: gathering each image;
encoders: writing it) and prints one line per step, in start order.

    python bench/cli_timeline.py run FOLDER OUT --overwrite --device cuda -q
"""

from __future__ import annotations

import functools
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tilerun.scheduler as s  # noqa: E402

T0 = time.perf_counter()
EVENTS: list[tuple[float, float, str, str]] = []


def timed(name, fn, label=lambda *a: ""):
    @functools.wraps(fn)
    def wrapper(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            EVENTS.append((t - T0, time.perf_counter() - T0, threading.current_thread().name, f"{name} {label(*a)}"))
    return wrapper


s._compute = timed("compute", s._compute, lambda engine, plan, task, *a: f"image {task.image} pass {task.pass_}")
s._Writer._gather = timed("gather", s._Writer._gather, lambda self, store, p: f"image {p.index}")
s._Writer._write = timed("write", s._Writer._write, lambda self, p, *a: f"image {p.index} ({p.width}x{p.height})")
s._Loader._image = timed("load", s._Loader._image, lambda self, i: f"image {i}")

if __name__ == "__main__":
    from tilerun.cli import main

    try:
        main(sys.argv[1:], prog_name="tilerun", standalone_mode=False)
    finally:
        for start, end, thread, what in sorted(EVENTS):
            print(f"{start:7.3f} {end:7.3f} {end - start:6.3f}  {thread:<22} {what}")
