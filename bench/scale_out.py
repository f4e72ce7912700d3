"""Host-side scale-out: 1, 2, 4 torchrun processes with a model that sleeps like an 8 MP/s card.

Usage: python bench/scale_out.py [--repeats 2] [--procs 1,2,4] [--tile 512] [--rate 8e6]

The model (`bench/sleep_model.py`) holds the "device" for pixels / rate seconds a batch and
uses almost no CPU, as a GPU looks from its host: what is measured is the host side
(decoding, scheduling, moving cores, stitching, encoding, writing). Two workloads from
sample_images/: a folder of 16 photos of 1024^2 (resized crops, PNG) and one photo of
8192^2 (JPEG, quality 95). Runs are interleaved (1, 2, 4, 1, 2, 4, ...), best of
``--repeats`` by the report's job seconds. Per run, from ``tilerun-report.json``:

* job MP/s: input pixels / the job's work span, from the first rank's start of claims to
  the last rank's last write (the ranks' ``started_at`` / ``ended_at``; the report's
  ``seconds``, the whole command with Python's and torch's start-up, is shown beside);
* ratio to one process;
* store bytes per output pixel: every rank's ``bytes_sent`` (through the c10d store) over
  the input pixels; p2p bytes likewise when the report has ``bytes_p2p``;
* images written per rank (``images_written``; reports without it: rank 0 wrote them all).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("retina.jpg", "hubble_deep_field.jpg", "coffee.png", "astronaut.png", "chelsea.png", "rocket.jpg")


def make_inputs(tmp: Path) -> dict[str, Path]:
    folder = tmp / "sixteen_1024"
    folder.mkdir()
    for i in range(16):
        with Image.open(ROOT / "sample_images" / SOURCES[i % len(SOURCES)]) as im:
            im = im.convert("RGB")
            w, h = im.size
            k = i // len(SOURCES)  # a different crop each time a source comes round
            box = (k * w // 10, k * h // 10, w - k * w // 20, h - k * h // 20)
            im.crop(box).resize((1024, 1024), Image.BICUBIC).save(folder / f"photo{i:02d}.png")
    big = tmp / "one_8192"
    big.mkdir()
    with Image.open(ROOT / "sample_images" / "retina.jpg") as im:
        im.convert("RGB").resize((8192, 8192), Image.BICUBIC).save(big / "retina8192.jpg", quality=95)
    return {"16 photos 1024^2": folder, "one photo 8192^2": big}


def run(inp: Path, out: Path, nproc: int, tile: int, rate: float, extra: list[str]) -> tuple[float, dict]:
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", TILERUN_SLEEP_RATE=str(rate),
               PYTHONPATH=os.pathsep.join([str(ROOT / "bench"), os.environ.get("PYTHONPATH", "")]))
    env.pop("WORLD_SIZE", None)
    args = ["-m", "tilerun", "run", str(inp), str(out), "--tile", str(tile), "--model", "sleep_model:make", "-q", *extra]
    if nproc == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0, json.loads((out / "tilerun-report.json").read_text())


def _span(report: dict) -> float:
    """The job's work in seconds: first rank's start to last rank's end (reports without the
    ranks' times: the report's ``seconds``)."""
    ranks = report["ranks"]
    if all(r.get("started_at") for r in ranks):
        return max(r["ended_at"] for r in ranks) - min(r["started_at"] for r in ranks)
    return report["seconds"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--procs", default="1,2,4")
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--rate", type=float, default=8e6, help="the sleeping model's pixels a second")
    ap.add_argument("--extra", default="", help="more `tilerun run` options, space-separated")
    a = ap.parse_args()
    procs = [int(p) for p in a.procs.split(",")]
    extra = a.extra.split()
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        workloads = make_inputs(tmp)
        rows = []
        for name, inp in workloads.items():
            best: dict[int, tuple[float, dict]] = {}
            for _ in range(a.repeats):
                for n in procs:  # interleaved
                    wall, rep = run(inp, tmp / f"out{n}", n, a.tile, a.rate, extra)
                    if n not in best or _span(rep) < _span(best[n][1]):
                        best[n] = (wall, rep)
            for n in procs:
                wall, rep = best[n]
                assert rep["counts"]["failed"] == 0, rep["files"]
                pixels = sum(f["size"][0] * f["size"][1] for f in rep["files"])
                ranks = rep["ranks"]
                ok = rep["counts"]["ok"]
                written = [r.get("images_written", ok if r["rank"] == 0 else 0) for r in ranks]
                row = {
                    "workload": name, "procs": n, "job_s": _span(rep), "command_s": rep["seconds"],
                    "wall_s": round(wall, 2), "mp_s": pixels / 1e6 / _span(rep),
                    "store_bytes_per_px": sum(r["bytes_sent"] for r in ranks) / pixels,
                    "p2p_bytes_per_px": sum(r.get("bytes_p2p", 0) for r in ranks) / pixels,
                    "images_written": written,
                }
                row["ratio"] = row["mp_s"] / (pixels / 1e6 / _span(best[procs[0]][1]))
                rows.append(row)
                print(json.dumps(row), flush=True)
        print()
        print(f"tile {a.tile}, model sleeping at {a.rate / 1e6:g} MP/s per process, best of {a.repeats}"
              + (f", options: {a.extra}" if a.extra else ""))
        print("| workload | processes | job s | command s | job MP/s | vs 1 process | store bytes / px | p2p bytes / px | images written per rank |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['workload']} | {r['procs']} | {r['job_s']:.2f} | {r['command_s']:.2f} | {r['mp_s']:.2f} | {r['ratio']:.2f}x | "
                  f"{r['store_bytes_per_px']:.3f} | {r['p2p_bytes_per_px']:.3f} | {', '.join(map(str, r['images_written']))} |")


if __name__ == "__main__":
    main()
