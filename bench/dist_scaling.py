"""Distributed speed-up: torchrun N processes x 1 thread vs 1 process x 1 thread, same inputs.

Usage: python bench/dist_scaling.py [--repeats 3] [--nproc 2] [--tile 512]

Two workloads made from real photos in sample_images/: a folder of four 1024x1024
photos, and one 3072x3072 photo. Runs are interleaved (1, N, 1, N, ...) and the best of
``--repeats`` is kept, since the machine is shared and noisy. Two times per run:

* ``job``: the ranks' work span, from the first rank's start of claims to the last rank's
  last write (``started_at`` / ``ended_at`` in the report's ``ranks``; older reports: their
  ``seconds``), the part that parallelises;
* ``wall``: the whole command, including Python and torch start-up and the model probe
  (rank 0's, unless the probe cache holds it).

Also from the report: bytes each process sent through the store per image, and the
seconds each process waited for work (decode, claims, global sums).
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

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def make_inputs(tmp: Path) -> dict[str, Path]:
    samples = ROOT / "sample_images"
    four = tmp / "four_1024"
    four.mkdir()
    for name in ("retina.jpg", "hubble_deep_field.jpg", "coffee.png", "astronaut.png"):
        im = Image.open(samples / name).convert("RGB").resize((1024, 1024), Image.BICUBIC)
        im.save(four / (Path(name).stem + ".png"))
    one = tmp / "one_3072"
    one.mkdir()
    Image.open(samples / "retina.jpg").convert("RGB").resize((3072, 3072), Image.BICUBIC).save(one / "retina3072.png")
    return {"four 1024x1024 photos": four, "one 3072x3072 photo": one}


def run(inp: Path, out: Path, nproc: int, tile: int) -> tuple[float, dict]:
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    args = ["-m", "tilerun", "run", str(inp), str(out), "--tile", str(tile), "-q"]
    if nproc == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    wall = time.perf_counter() - t0
    return wall, json.loads((out / "tilerun-report.json").read_text())


def _span(report: dict) -> float:
    ranks = report["ranks"]
    if ranks and all(r.get("started_at") for r in ranks):
        return max(r["ended_at"] for r in ranks) - min(r["started_at"] for r in ranks)
    return report["seconds"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--tile", type=int, default=512)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        workloads = make_inputs(tmp)
        rows = []
        for name, inp in workloads.items():
            best: dict[int, tuple[float, float, dict]] = {}
            for _ in range(a.repeats):
                for n in (1, a.nproc):  # interleaved
                    wall, rep = run(inp, tmp / f"out{n}", n, a.tile)
                    job = _span(rep)
                    if n not in best or job < best[n][1]:
                        best[n] = (wall, job, rep)
            w1, j1, _ = best[1]
            wn, jn, repn = best[a.nproc]
            images = len(repn["files"])
            ranks = repn["ranks"]
            rows.append({
                "workload": name,
                "job_1": j1, f"job_{a.nproc}": jn, "job_speedup": j1 / jn,
                "wall_1": w1, f"wall_{a.nproc}": wn, "wall_speedup": w1 / wn,
                "bytes_per_image_per_rank": [r["bytes_sent"] / images for r in ranks],
                "wait_s_per_rank": [round(r["wait_s"], 2) for r in ranks],
                "tiles_per_rank": [r["tiles"] for r in ranks],
            })
            print(json.dumps(rows[-1]), flush=True)
        print()
        print(f"| workload | 1 proc job s | {a.nproc} procs job s | speed-up (job) | speed-up (wall) | MB sent per image, per rank | wait s per rank |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            mb = ", ".join(f"{b / 1e6:.2f}" for b in r["bytes_per_image_per_rank"])
            print(f"| {r['workload']} | {r['job_1']:.1f} | {r[f'job_{a.nproc}']:.1f} | {r['job_speedup']:.2f}x | "
                  f"{r['wall_speedup']:.2f}x | {mb} | {', '.join(map(str, r['wait_s_per_rank']))} |")


if __name__ == "__main__":
    main()
