"""What the radiometry and GeoTIFF paths cost (interleaved, best of N; `common.interleaved`).

1. Decoding a PNG photo: imagecodecs (`images._read_png`, keeps 16 bits) vs Pillow (`np.asarray`).
2. Reading a GeoTIFF's georeferencing: tifffile's tags (`georef.read_georef`) vs rasterio's open
   (crs + transform), and importing each library in a fresh interpreter.
3. The radiometry of a 16-bit and a float32 image: the whole-image histogram and `to_uint8`.

    python bench/radiometry_probe.py [--size 2048] [--repeats 5]
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved, photo, print_ratio  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    from PIL import Image

    from tilerun.georef import read_georef
    from tilerun.images import _read_png
    from tilerun.radiometry import RadiometrySpec, resolve, to_uint8

    tmp = Path(tempfile.mkdtemp())
    rgb = photo(args.size)
    png = tmp / "photo.png"
    Image.fromarray(rgb).save(png, compress_level=6)

    def pillow():
        with Image.open(png) as im:
            return np.asarray(im)

    print(f"1. decode a {args.size}^2 RGB photo PNG ({png.stat().st_size / 1e6:.1f} MB)")
    assert np.array_equal(_read_png(png).pixels, pillow())
    print_ratio(interleaved({"imagecodecs": lambda: _read_png(png), "pillow": pillow}, repeats=args.repeats),
                "imagecodecs", "pillow")

    import rasterio
    from rasterio.transform import from_origin

    geo = tmp / "geo.tif"
    with rasterio.open(geo, "w", driver="GTiff", width=512, height=512, count=1, dtype="float32", crs="EPSG:32633",
                       transform=from_origin(500000, 4200000, 10, 10), tiled=True) as d:
        d.write(np.zeros((1, 512, 512), np.float32))

    def with_rasterio():
        with rasterio.open(geo) as s:
            return s.crs, s.transform

    print("\n2. read a GeoTIFF's georeferencing")
    times = interleaved({"tifffile": lambda: read_georef(geo), "rasterio": with_rasterio}, repeats=args.repeats * 20)
    for name, ts in times.items():
        print(f"{name}: best {min(ts) * 1e3:.2f} ms, median {np.median(ts) * 1e3:.2f} ms")
    for mod in ("tifffile", "rasterio"):
        out = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {mod}"], capture_output=True, text=True)
        total = [l for l in out.stderr.splitlines() if l.rstrip().endswith(f"| {mod}")]
        print(f"import {mod}: {int(total[-1].split('|')[1]) / 1000:.0f} ms with what it imports, numpy included "
              "(python -X importtime)")

    print(f"\n3. radiometry of a {args.size}^2 3-band image")
    for dtype, data in (("uint16", (rgb.astype(np.uint16) * 16)), ("float32", rgb.astype(np.float32) * 4.7 + 100)):
        spec = RadiometrySpec()
        r, _ = resolve(spec, data)
        times = interleaved({"histogram+range": lambda: resolve(spec, data), "to_uint8": lambda: to_uint8(data, r)},
                            repeats=args.repeats)
        for name, ts in times.items():
            print(f"{dtype} {name}: best {min(ts):.3f} s")


if __name__ == "__main__":
    main()
