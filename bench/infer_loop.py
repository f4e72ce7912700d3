"""`infer_image(model, photo)` in a loop vs one Engine built once: does the library's simple
call cost more than the engine it builds each time?

    python bench/infer_loop.py [--photos 50] [--repeats 5] [--device auto]

Photos: random crops of sample_images/*, resized to 256-512 px squares (seeded, in memory).
Side "loop": ``infer_image(model, photo)`` per photo, each call building its own Engine (the
probe is measured once per model object and reused: `tilerun.receptive.probe_for`). Side
"engine": one ``Engine(model)`` built inside the timed run, then ``infer_image(engine, photo)``
per photo. Interleaved, best of --repeats each (bench/common.py). The model's first call is
made, and timed, before either side: it measures the probe or reads it from the disk cache.
Target: loop / engine <= 1.05.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, interleaved, machine, print_ratio  # noqa: E402


def photos(n: int, *, seed: int = 0) -> list[np.ndarray]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    sources = sorted(p for p in (ROOT / "sample_images").iterdir() if p.suffix in (".png", ".jpg") and ".mask." not in p.name)
    images = []
    for source in sources:
        with Image.open(source) as im:
            images.append(im.convert("RGB"))
    out = []
    for i in range(n):
        im = images[i % len(images)]
        side = int(rng.integers(256, 513))
        crop = int(rng.integers(min(im.size) // 2, min(im.size) + 1))
        x, y = int(rng.integers(0, im.width - crop + 1)), int(rng.integers(0, im.height - crop + 1))
        out.append(np.asarray(im.crop((x, y, x + crop, y + crop)).resize((side, side), Image.LANCZOS)).copy())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    from tilerun import Engine, infer_image, load_model
    from tilerun.dist import _device

    device = _device(args.device, 0)
    model = load_model()
    batch = photos(args.photos)
    t0 = time.perf_counter()
    infer_image(model, batch[0], device=device)
    first = time.perf_counter() - t0

    def loop() -> None:
        for p in batch:
            infer_image(model, p, device=device)

    def engine() -> None:
        e = Engine(model, device=device)
        for p in batch:
            infer_image(e, p)

    times = interleaved({"loop": loop, "engine": engine}, repeats=args.repeats)
    print(machine())
    print(f"{args.photos} photos, 256-512 px, device {device}; first call (probe or cache) {first:.2f} s")
    print_ratio(times, "loop", "engine")


if __name__ == "__main__":
    main()
