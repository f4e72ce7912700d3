"""Where a CLI job's seconds go, thread by thread: runs ``tilerun run ARGS...`` in this process
with the job's steps timed (main thread: each chunk computed; finisher: collecting a
spread image's chunks; encoders: writing each image) and prints one line per step, in
start order.

    python bench/cli_timeline.py run FOLDER OUT --overwrite --device cuda -q
"""

from __future__ import annotations

import functools
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tilerun.assemble as a  # noqa: E402
import tilerun.work as w  # noqa: E402

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


w._main_chunk = timed("compute", w._main_chunk, lambda engine, plan, ids, *_: f"image {plan.index} tiles {ids[0]}..")
w.SpreadIO.collect = timed("collect", w.SpreadIO.collect, lambda self, store, tag, i, c, *_: f"image {i} chunk {c}")
a.OutputWriter._job = timed("write", a.OutputWriter._job, lambda self, key, canvas, *_: f"{key} ({canvas.width}x{canvas.height})")
w._Loader._image = timed("load", w._Loader._image, lambda self, i: f"image {i}")

if __name__ == "__main__":
    from tilerun.cli import main

    try:
        main(sys.argv[1:], prog_name="tilerun", standalone_mode=False)
    finally:
        for start, end, thread, what in sorted(EVENTS):
            print(f"{start:7.3f} {end:7.3f} {end - start:6.3f}  {thread:<22} {what}")
