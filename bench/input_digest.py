"""What resume's input identity costs on one big input: the sampled digest (the default) and
the whole-file one (``--verify-inputs``), SHA-256 against BLAKE2b, cold-ish (the file's pages
evicted with posix_fadvise DONTNEED first: the disk, or the host's cache under a VM) and warm.
Best of N, interleaved.

    python bench/input_digest.py /tmp/big.tif --make 40000   # writes a 40,000^2 RGB tiled TIFF (4.8 GB)
    python bench/input_digest.py /tmp/big.tif --reps 3
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tilerun.resume import content_digest  # noqa: E402


def make(path: str, side: int) -> None:
    import numpy as np
    import tifffile

    tile = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    count = (-(-side // 256)) ** 2
    tifffile.imwrite(path, (tile for _ in range(count)), shape=(side, side, 3), dtype=np.uint8, tile=(256, 256),
                     photometric="rgb", bigtiff=True)


def full(path: str, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(4 << 20):
            h.update(chunk)
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("path")
    ap.add_argument("--make", type=int, metavar="SIDE", help="write a SIDE x SIDE RGB TIFF at PATH first")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    if args.make:
        make(args.path, args.make)
    cases = {"sampled (default)": lambda: content_digest(args.path),
             "full sha256 (--verify-inputs)": lambda: content_digest(args.path, full=True),
             "full blake2b": lambda: full(args.path, "blake2b")}
    best: dict[tuple[str, str], float] = {}
    for _ in range(args.reps):
        for name, fn in cases.items():
            for state in ("cold", "warm"):
                if state == "cold":
                    fd = os.open(args.path, os.O_RDONLY)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    os.close(fd)
                else:
                    fn()
                t0 = time.perf_counter()
                fn()
                best[name, state] = min(best.get((name, state), float("inf")), time.perf_counter() - t0)
    size = os.path.getsize(args.path)
    print(f"{args.path}: {size / 1e9:.2f} GB, best of {args.reps}")
    for (name, state), dt in best.items():
        print(f"  {name:30s} {state}: {dt * 1000:9.1f} ms ({size / dt / 1e9:6.2f} GB/s of file)")


if __name__ == "__main__":
    main()
