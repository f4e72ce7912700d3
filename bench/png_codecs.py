"""tilerun's PNG encoder (tilerun/png.py) against imagecodecs' PNG codecs at the same zlib level.

Usage: python bench/png_codecs.py [--repeats 5]

On photos from sample_images/ resized to 1024^2 and 4096^2 (RGB, as the inpainted output)
and a 16-class map of the 4096^2 one: seconds to encode (best of --repeats, one thread)
and bytes, for png.write_png (the "up" filter, zlib level 1, run-length strategy) and
imagecodecs.png_encode / spng_encode at level 1 (libpng / libspng with their own filter
choice, zlib-ng). Every file is decoded back and compared with its pixels.
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import imagecodecs
import numpy as np
from PIL import Image

from tilerun.png import write_png

ROOT = Path(__file__).resolve().parent.parent


def best(f, repeats: int) -> tuple[float, bytes]:
    t, out = float("inf"), b""
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = f()
        t = min(t, time.perf_counter() - t0)
    return t, out


def ours(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    write_png(buf, pixels, level=1)
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    with Image.open(ROOT / "sample_images" / "retina.jpg") as im:
        photo = im.convert("RGB")
    cases = {f"photo {n}^2 RGB": np.asarray(photo.resize((n, n), Image.BICUBIC)) for n in (1024, 4096)}
    big = cases["photo 4096^2 RGB"]
    cases["class map 4096^2"] = (big.astype(np.uint16).sum(2) * 16 // 766).astype(np.uint8)
    coders = {
        "tilerun png.py": ours,
        "imagecodecs png_encode": lambda a: bytes(imagecodecs.png_encode(a, level=1)),
        "imagecodecs spng_encode": lambda a: bytes(imagecodecs.spng_encode(a, level=1)),
    }
    print("| image | encoder | seconds | MB |")
    print("|---|---|---|---|")
    for name, pixels in cases.items():
        for coder, f in coders.items():
            t, data = best(lambda: f(pixels), args.repeats)
            back = np.asarray(Image.open(io.BytesIO(data)))
            assert np.array_equal(back, pixels), (name, coder)
            print(f"| {name} | {coder} | {t:.3f} | {len(data) / 1e6:.2f} |")


if __name__ == "__main__":
    main()
