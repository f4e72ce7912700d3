"""first_extreme (tilerun/channels.py) against argmax, NHWC and NCHW, one thread.

Usage: python bench/first_extreme.py [--size 512] [--batch 2]

Prints, per channel count and layout, the best of 7 runs in ms of first_extreme, of
first_extreme with an NHWC tensor taken through the tournament (no NCHW copy), and of
argmax(1); each result is checked against argmax.
"""

from __future__ import annotations

import argparse
import time

import torch

from tilerun import channels
from tilerun.channels import first_extreme


def best_ms(f, n: int = 7) -> float:
    best = float("inf")
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t0)
    return best * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    keep = channels.NCHW_UP_TO
    print("| channels | layout | first_extreme ms | tournament ms | argmax ms |")
    print("|---|---|---|---|---|")
    for c in (2, 4, 8, 16):
        for layout in ("NHWC", "NCHW"):
            x = torch.randn(args.batch, c, args.size, args.size)
            if layout == "NHWC":
                x = x.contiguous(memory_format=torch.channels_last)
            assert torch.equal(first_extreme(x, largest=True), x.argmax(1))
            now = best_ms(lambda: first_extreme(x, largest=True))
            channels.NCHW_UP_TO = 0
            tour = best_ms(lambda: first_extreme(x, largest=True))
            channels.NCHW_UP_TO = keep
            arg = best_ms(lambda: x.argmax(1))
            print(f"| {c} | {layout} | {now:.1f} | {tour:.1f} | {arg:.1f} |")


if __name__ == "__main__":
    main()
