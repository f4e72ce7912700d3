"""A fresh process's first image on a GPU vs its next ones: CUDA's warm-up inside a CLI job.

    python bench/first_image.py [--warm SIZE] [--alloc-first]

Prints CUDA init, engine construction (model load + receptive-field probe, on the CPU) and
`infer_image` on one 4096^2 photo four times. ``--warm SIZE``: first one `infer_image` on a
blank SIZE^2 image (the question for a CLI that would warm the card while it starts: does
the first real image then run at the speed of the rest?). ``--alloc-first``: before the
engine, time 4 x 72 MB of pinned host memory (first and cached) and an 8 GiB device
allocation; this pre-fills the pinned cache the first image would otherwise fill.

bench/logs/gpu-h100-10-first-image.txt (H100): three runs with ``--alloc-first`` (then the
script's only order). With PYTORCH_CUDA_ALLOC_CONF=pinned_use_cuda_host_register:True,
pinned_num_register_threads:8 the pinned allocations took a third of the time; the first
image did not get faster.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import holes, photo  # noqa: E402


def now() -> float:
    torch.cuda.synchronize()
    return time.perf_counter()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--warm", type=int, default=0, help="side of a blank image run once before the photo")
    ap.add_argument("--alloc-first", action="store_true", help="time pinned and device allocations first")
    a = ap.parse_args()

    t = time.perf_counter()
    torch.zeros(1, device="cuda")
    print(f"cuda init {time.perf_counter() - t:.3f}")
    if a.alloc_first:
        t = now()
        bufs = [torch.empty(72 * 2**20, dtype=torch.uint8, pin_memory=True) for _ in range(4)]
        print(f"4 x 72 MB pinned, first: {now() - t:.3f}")
        del bufs
        t = now()
        bufs = [torch.empty(72 * 2**20, dtype=torch.uint8, pin_memory=True) for _ in range(4)]
        print(f"4 x 72 MB pinned, again (cached): {now() - t:.3f}")
        t = now()
        g = torch.empty(8 * 2**30, dtype=torch.uint8, device="cuda")
        print(f"8 GiB cudaMalloc: {now() - t:.3f}")
        del g, bufs

    from tilerun.engine import Engine, infer_image
    from tilerun.model import load_model

    t = time.perf_counter()
    engine = Engine(load_model(), device="cuda")
    print(f"engine (load + probe): {time.perf_counter() - t:.3f}")
    if a.warm:
        blank = np.zeros((a.warm, a.warm, 3), np.uint8)
        t = now()
        infer_image(engine, blank, holes(a.warm))
        print(f"warm-up, blank {a.warm}^2: {now() - t:.3f}")
    img, mask = photo(4096), holes(4096)
    for i in range(4):
        t = now()
        infer_image(engine, img, mask)
        print(f"infer_image 4096^2 #{i}: {now() - t:.3f}")
    print(f"max allocated GiB {torch.cuda.max_memory_allocated() / 2**30:.1f}, reserved {torch.cuda.memory_reserved() / 2**30:.1f}")


if __name__ == "__main__":
    main()
