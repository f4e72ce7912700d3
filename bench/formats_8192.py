"""One 8192^2 photo as PNG, tiled TIFF and OME-Zarr input: `tilerun run` seconds, MP/s and
peak RSS of each, into PNG outputs.

Usage: python bench/formats_8192.py [--size 8192] [--repeats 2] [--dir /tmp/tilerun-formats]

The photo is sample_images/retina.jpg resized to SIZE^2 (RGB), written once as a PNG
(decoded whole), a tiled TIFF (512^2 deflate tiles: read window by window) and an OME-Zarr
(NGFF 0.4 through ome-zarr-py, 512^2 chunks: read window by window). The model is
bench/sleep_model.py with TILERUN_SLEEP_RATE=1e12 (pointwise, next to no compute), so what
is measured is the host side: reading, stitching, encoding, writing. Runs are interleaved,
best of --repeats by wall time; peak RSS (GNU time's %M) the largest of the repeats. Every run's outputs must
equal the PNG run's (the same pixels whatever the reader).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def make_inputs(d: Path, size: int) -> dict[str, Path]:
    import tifffile
    import zarr
    from ome_zarr.writer import write_image

    paths = {"PNG": d / "png" / "photo.png", "tiled TIFF": d / "tiff" / "photo.tif",
             "OME-Zarr": d / "zarr" / "photo.ome.zarr"}
    if all(p.exists() for p in paths.values()):
        return paths
    with Image.open(ROOT / "sample_images" / "retina.jpg") as im:
        rgb = np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC))
    for p in paths.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(paths["PNG"], compress_level=1)
    tifffile.imwrite(paths["tiled TIFF"], rgb, tile=(512, 512), compression="zlib", photometric="rgb")
    group = zarr.open_group(str(paths["OME-Zarr"]), mode="w", zarr_format=2)
    write_image(np.moveaxis(rgb, -1, 0), group=group, axes="cyx", storage_options={"chunks": (3, 512, 512)})
    return paths


def run(inp: Path, out: Path) -> tuple[float, int]:
    """Wall seconds and peak RSS (kB, GNU time's %M) of one `tilerun run`."""
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, TILERUN_SLEEP_RATE="1e12",
               PYTHONPATH=os.pathsep.join([str(ROOT / "bench"), os.environ.get("PYTHONPATH", "")]))
    rss = out.with_name(out.name + ".rss")
    rss.parent.mkdir(parents=True, exist_ok=True)
    cmd = ["/usr/bin/time", "-f", "%M", "-o", str(rss), sys.executable, "-m", "tilerun", "run", str(inp.parent),
           str(out), "--model", "sleep_model:make", "--tile", "512", "-q"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return wall, int(rss.read_text().split()[-1])


def digest(out: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(out.glob("*.png")):
        h.update(np.asarray(Image.open(p)).tobytes())
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/tilerun-formats"))
    args = ap.parse_args()
    paths = make_inputs(args.dir, args.size)
    best: dict[str, tuple[float, int]] = {}
    digests = {}
    for _ in range(args.repeats):  # interleaved
        for name, p in paths.items():
            out = args.dir / "out" / name.replace(" ", "-")
            wall, rss = run(p, out)
            digests[name] = digest(out)
            old = best.get(name, (float("inf"), 0))
            best[name] = (min(old[0], wall), max(old[1], rss))
    ref = digests["PNG"]
    mp = args.size * args.size / 1e6
    print(f"one {args.size}^2 photo, sleep model (host side only), tile 512, best of {args.repeats}")
    print("| input | seconds | MP/s | peak RSS MB | outputs equal the PNG run's |")
    print("|---|---|---|---|---|")
    for name, (wall, rss) in best.items():
        print(f"| {name} | {wall:.1f} | {mp / wall:.1f} | {rss / 1024:.0f} | {'yes' if digests[name] == ref else 'NO'} |")


if __name__ == "__main__":
    main()
