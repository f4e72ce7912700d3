"""A huge input read window by window: peak RSS per process and MP/s of `tilerun run` on a
synthetic SIZE^2 tiled pyramidal TIFF, into OME-Zarr (nothing full-size is held anywhere).

    nice -n 10 python bench/big_scene.py [--size 40000] [--procs 1,2] [--dir /tmp/big]
    nice -n 10 python bench/big_scene.py --size 8192 --procs 1 --compare-whole

The scene (made once, kept in --dir): RGB, 512^2 deflate tiles, two SubIFD levels, a
smooth pattern with noise and a few holes (alpha 0), written tile by tile from a generator
(the writer never holds the image either). The model is bench/sleep_model.py with
TILERUN_SLEEP_RATE=1e12 (no sleep: pointwise, next to no compute), so the run is the
host side alone: window decode, stitching into zarr chunks, the pyramid. Each run is
`tilerun run` (or torchrun with N processes) in a fresh OUTPUT; a sampler reads every
process's RSS from /proc every 0.2 s and prints the largest seen per process.

``--compare-whole`` (a size small enough to decode whole): the same pixels also as a strip
TIFF, which tilerun decodes whole; both run into PNG, and their output pixels must be equal.

Measured on this project's 2 shared cores, under nice -n 10 (MP/s is noisy: other jobs ran):

* ``--size 40000 --procs 1,2``: 1 process 242 s, 6.6 MP/s, peak RSS 627 MB; 2 processes
  (torchrun, the image spread) 210 s, 7.6 MP/s, peak RSS 545 and 610 MB. The image is
  1.6 gigapixels: 4.8 GB as uint8 RGB, which no process ever holds.
* ``--size 8192 --procs 1 --compare-whole``: windows 11 s, peak RSS 759 MB; decoded whole
  10 s, 956 MB; output pixels equal. Into OME-Zarr (``--size 8192 --procs 1``): 10 s, 558 MB.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TILE = 512


def _tiles(size: int, step: int):
    """The scene at 1/step of its size, tile by tile in row-major order (RGBA)."""
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 24, (TILE, TILE, 3), dtype=np.uint8)
    n = -(-size // step)
    yy, xx = np.mgrid[0:TILE, 0:TILE]
    for ty in range(0, n, TILE):
        for tx in range(0, n, TILE):
            y, x = (yy + ty) * step, (xx + tx) * step
            t = np.empty((TILE, TILE, 4), np.uint8)
            t[..., 0] = (x * 255 // size).astype(np.uint8)
            t[..., 1] = (y * 255 // size).astype(np.uint8)
            t[..., 2] = (((x // 997) + (y // 991)) % 2 * 160).astype(np.uint8)
            t[..., :3] += noise
            t[..., 3] = 255
            hole = ((x % 9973) < 300) & ((y % 9967) < 200)
            t[hole, 3] = 0
            yield t


def make_scene(path: Path, size: int) -> None:
    import tifffile

    t0 = time.perf_counter()
    tmp = path.with_suffix(".tmp")
    kw = dict(tile=(TILE, TILE), compression="zlib", compressionargs={"level": 1}, photometric="rgb",
              extrasamples=["unassalpha"], dtype=np.uint8, maxworkers=2)
    with tifffile.TiffWriter(tmp, bigtiff=True) as w:
        w.write(_tiles(size, 1), shape=(size, size, 4), subifds=2, resolution=(1e4 / 0.25, 1e4 / 0.25),
                resolutionunit="CENTIMETER", **kw)
        for step in (2, 4):
            n = -(-size // step)
            w.write(_tiles(size, step), shape=(n, n, 4), subfiletype=1, **kw)
    tmp.rename(path)
    print(f"made {path} ({path.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - t0:.0f} s", flush=True)


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _cmdline(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()[:80]
    except OSError:
        return "?"


def strip_copy(scene: Path) -> Path:
    """Level 0 of ``scene`` as a strip TIFF (decoded whole by tilerun), in a folder of its own."""
    import tifffile

    path = scene.parent / "strips" / scene.name
    if not path.exists():
        path.parent.mkdir(exist_ok=True)
        data = tifffile.imread(scene)
        tifffile.imwrite(path, data, photometric="rgb", extrasamples=["unassalpha"], compression="zlib",
                         compressionargs={"level": 1}, rowsperstrip=64)
    return path


def measure(scene: Path, out: Path, procs: int, size: int, fmt: str = "ome-zarr") -> None:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT / 'bench'}", TILERUN_SLEEP_RATE="1e12", OMP_NUM_THREADS="1")
    tilerun = [sys.executable, "-m", "tilerun"]
    args = ["run", str(scene), str(out), "--model", "sleep_model:make", "--tile", "1024", "--format", fmt,
            "--device", "cpu", "-q"]
    if procs == 1:
        cmd = [*tilerun, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}",
               "-m", "tilerun", *args]
    shutil.rmtree(out, ignore_errors=True)
    peaks: dict[int, float] = {}
    names: dict[int, str] = {}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env)
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            for p in _tree(proc.pid):
                rss = _rss_mb(p)
                if rss > peaks.get(p, 0):
                    peaks[p] = rss
                    names.setdefault(p, _cmdline(p))
            time.sleep(0.2)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    rc = proc.wait()
    seconds = time.perf_counter() - t0
    stop.set()
    th.join()
    workers = {p: r for p, r in peaks.items() if "-m tilerun" in names[p] and "torch.distributed.run" not in names[p]}
    print(f"{scene.name} ({'decoded whole' if scene.parent.name == 'strips' else 'windows'}) -> {fmt}, "
          f"{procs} process{'es' * (procs > 1)}: exit {rc}, {seconds:.0f} s, {size * size / 1e6 / seconds:.1f} MP/s; "
          f"peak RSS per tilerun process (MB): {sorted(round(r) for r in workers.values())}; "
          f"largest of any process {max(peaks.values()):.0f} MB", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=40000)
    ap.add_argument("--procs", default="1,2")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/tilerun-big-scene"))
    ap.add_argument("--compare-whole", action="store_true", help="also decode a strip copy whole; PNG outputs")
    a = ap.parse_args()
    a.dir.mkdir(parents=True, exist_ok=True)
    scene = a.dir / f"scene-{a.size}.tif"
    if not scene.exists():
        make_scene(scene, a.size)
    if a.compare_whole:
        from PIL import Image

        Image.MAX_IMAGE_PIXELS = None
        n = int(a.procs.split(",")[0])
        outs = {}
        for src in (scene, strip_copy(scene)):
            outs[src] = a.dir / f"out-{src.parent.name}"
            measure(src, outs[src], n, a.size, fmt="png")
        for kind in ("pred", "inpainted"):
            x, y = (np.asarray(Image.open(o / f"{scene.stem}.{kind}.png")) for o in outs.values())
            print(f"{kind}: windows and whole decode {'equal' if np.array_equal(x, y) else 'DIFFER'}", flush=True)
        for o in outs.values():
            shutil.rmtree(o, ignore_errors=True)
        return
    for n in map(int, a.procs.split(",")):
        measure(scene, a.dir / f"out-{n}", n, a.size)
        shutil.rmtree(a.dir / f"out-{n}", ignore_errors=True)


if __name__ == "__main__":
    main()
