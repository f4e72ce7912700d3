"""Reading a big TIFF: peak memory and time through tifffile (tile by tile) vs Pillow.

    python bench/tiff_memory.py [--sizes 8192,16384]

For each size a real photo resized to size^2 is written as a tiled TIFF (512^2 tiles,
deflate). Each read is a fresh subprocess: `tilerun.images.load_image` as the CLI calls
it, once with tifffile installed and once as without it (Pillow's path), no pixel limit
(the CLI's --max-pixels). Printed: the process's peak RSS above what it held before the
read, next to the uint8 arrays the read must return (RGB + missing mask, 4 bytes a pixel).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine, photo, vm_mb  # noqa: E402


def child(path: Path, reader: str) -> None:
    import tilerun.tiff
    from tilerun.images import InputItem, load_image, set_max_pixels

    if reader == "pillow":
        tilerun.tiff.tifffile = None  # as without the tiff extra
    set_max_pixels(None)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak: from here on, the read's share
    before = vm_mb("VmRSS:")
    t0 = time.perf_counter()
    rgb, mask = load_image(InputItem(path, Path(path.name)))
    seconds = time.perf_counter() - t0
    print(json.dumps({"peak_mb": vm_mb("VmHWM:") - before, "arrays_mb": (rgb.nbytes + mask.nbytes) / 2**20,
                      "seconds": seconds}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="8192,16384")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(Path(a.child[0]), a.child[1])
        return

    import tifffile

    print(machine())
    with tempfile.TemporaryDirectory(prefix="tilerun-tiff-") as tmp:
        for size in map(int, a.sizes.split(",")):
            path = Path(tmp) / f"photo{size}.tif"
            tifffile.imwrite(path, photo(size), photometric="rgb", tile=(512, 512), compression="zlib", maxworkers=2)
            print(f"{size}^2 tiled TIFF: {path.stat().st_size / 2**20:.0f} MB on disk", flush=True)
            for reader in ("tifffile", "pillow"):
                r = subprocess.run([sys.executable, __file__, "--child", str(path), reader],
                                   capture_output=True, text=True, check=True)
                d = json.loads(r.stdout.strip().splitlines()[-1])
                print(f"  {reader:<8}: peak {d['peak_mb']:.0f} MB above the process before the read "
                      f"({d['peak_mb'] / d['arrays_mb']:.2f}x the {d['arrays_mb']:.0f} MB of uint8 arrays it returns), "
                      f"{d['seconds']:.2f} s", flush=True)


if __name__ == "__main__":
    main()
