"""What the shipped model's inpainting parts cost: tiled time on a 2048^2 photo with holes.

Times `tilerun.infer_image` (the tiled engine, CPU defaults) for several weights files, or
weights with configuration fields switched (``PATH:class_fill=false``), interleaved, best of N;
prints each one's ratio to the first. Holes: ``scattered`` (`common.holes`: 2% single pixels
everywhere plus 6 blocks, so every tile has holes) or ``boxes`` (12 squares of 8-20% of the
side, as big as `bench/quality.py`'s).

    python bench/model_cost.py --repeats 3 --holes boxes --photo build/photos/test/Path.png \
        --model old.safetensors --model tilerun/weights/default.safetensors
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import PHOTO, holes, interleaved, load_model_spec, machine, photo  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", required=True, help="PATH or PATH:field=value,... (repeatable)")
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--photo", type=Path, default=PHOTO)
    ap.add_argument("--holes", choices=["scattered", "boxes"], default="scattered")
    args = ap.parse_args()
    import torch

    import tilerun
    from tilerun.engine import Engine

    torch.set_num_threads(2)
    print(machine())
    image = photo(args.size, source=args.photo)
    if args.holes == "boxes":
        rng = np.random.default_rng(0)
        mask = np.zeros((args.size, args.size), bool)
        for _ in range(12):
            side = int(args.size * rng.uniform(0.08, 0.20))
            y, x = rng.integers(0, args.size - side, 2)
            mask[y : y + side, x : x + side] = True
    else:
        mask = holes(args.size)
    print(f"{args.photo.name} at {args.size}x{args.size}, {args.holes} holes, {100 * mask.mean():.1f}% missing")
    engines = {spec: Engine(load_model_spec(spec)) for spec in args.model}
    for e in engines.values():
        tilerun.infer_image(e, image, mask)  # warm-up: probe, allocator
    times = interleaved({k: (lambda e=e: tilerun.infer_image(e, image, mask)) for k, e in engines.items()},
                        repeats=args.repeats)
    first = min(times[args.model[0]])
    for spec, ts in times.items():
        print(f"{spec}: best {min(ts):.2f} s ({', '.join(f'{t:.2f}' for t in ts)}), {min(ts) / first:.3f}x the first")


if __name__ == "__main__":
    main()
