"""Benchmark 3: the CLI over a folder vs the engine's compute alone on the same images.

    python bench/end_to_end.py [--repeats 2] [--big 2] [--size 2048] [--device cpu|cuda]
                               [--patch "ENCODERS_GPU = 8" ...] [--timeline] [--profile]

The folder: sample_images/ plus ``big`` real photos resized to ``size``^2 with sidecar
hole masks. Interleaved, best of ``repeats``:

* ``cli``: ``python -m tilerun run FOLDER OUT --overwrite`` in a subprocess; its job time
  from OUT/tilerun-report.json (listing, decoding, both passes, PNG encoding, atomic
  writes; not Python start-up, model load or the receptive-field probe, which the
  process wall time below includes: the probe only in a run that finds none kept for
  this model and code in the probe cache, docs/exactness.md);
* ``compute``: the same images already decoded in memory, `infer_image` on each with the
  same engine settings, nothing read or written. Its first run is a cold engine (on a GPU:
  first kernels and allocations, ~0.5-0.9 s on an H100, bench/first_image.py), as the CLI's
  fresh process is; the ratio to that run is printed too.

RATIO = compute / cli job time: 1.0 would mean I/O costs nothing.

``--patch "NAME = VALUE; ..."`` (repeatable): also the CLI with these settings of
``tilerun.assemble`` changed before it starts (e.g. ``ENCODERS_GPU = 8``), interleaved
with the shipped settings, to measure them. ``--timeline``: then one more CLI run through
``bench/cli_timeline.py`` (each task, gather, load and write, per thread);
``--profile``: one more under cProfile.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, fmt_times, holes, machine, photo  # noqa: E402


def make_folder(dest: Path, *, big: int, size: int) -> None:
    from PIL import Image

    shutil.copytree(ROOT / "sample_images", dest)
    sources = sorted((ROOT / "sample_images").glob("*.jpg"))
    for i in range(big):
        Image.fromarray(photo(size, source=sources[i % len(sources)])).save(dest / f"big{i}.jpg", quality=92)
        Image.fromarray(holes(size, seed=i).astype("uint8") * 255).save(dest / f"big{i}.mask.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--big", type=int, default=2)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--profile", action="store_true",
                    help="then one more CLI run under cProfile (its main thread: compute and waits)")
    ap.add_argument("--timeline", action="store_true", help="then one more CLI run with bench/cli_timeline.py")
    ap.add_argument("--patch", action="append", default=[], help="tilerun.assemble assignments for a CLI variant")
    a = ap.parse_args()

    from tilerun.engine import Engine, infer_image
    from tilerun.images import find_inputs, load_image
    from tilerun.model import load_model

    print(machine())
    with tempfile.TemporaryDirectory(prefix="tilerun-bench-") as tmp:
        folder, out = Path(tmp) / "in", Path(tmp) / "out"
        make_folder(folder, big=a.big, size=a.size)
        items = find_inputs(folder)
        decoded = [load_image(it) for it in items]
        mp = sum(m.size for _, m in decoded) / 1e6
        print(f"folder: {len(items)} images, {mp:.1f} MP")
        # The CLI's defaults: the engine's own (tilerun.defaults) for the device.
        engine = Engine(load_model(), device=a.device)
        args = ["run", str(folder), str(out), "--overwrite", "--device", a.device, "-q"]
        cmd = [sys.executable, "-m", "tilerun", *args]
        variants = {}
        for patch in a.patch:
            sets = "; ".join(f"s.{p.strip()}" for p in patch.split(";") if p.strip())
            code = f"import tilerun.assemble as s; {sets}; from tilerun.cli import main; main({args!r}, prog_name='tilerun')"
            variants[patch] = [sys.executable, "-c", code]
        cli_job, cli_wall, compute, rank_compute = [], [], [], []
        variant_job = {n: [] for n in variants}
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True)
            cli_wall.append(time.perf_counter() - t0)
            report = json.loads((out / "tilerun-report.json").read_text())
            assert report["counts"]["ok"] == len(items), report["counts"]
            cli_job.append(report["seconds"])
            rank_compute.append(sum(r.get("compute_s", 0.0) for r in report.get("ranks", [])))
            print("cli ranks:", [{k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()
                                  if k in ("compute_s", "wait_s", "decode_s")} for r in report.get("ranks", [])])
            for n, vcmd in variants.items():
                subprocess.run(vcmd, check=True)
                variant_job[n].append(json.loads((out / "tilerun-report.json").read_text())["seconds"])
            t0 = time.perf_counter()
            for image, mask in decoded:
                infer_image(engine, image, mask)
            compute.append(time.perf_counter() - t0)
        print(f"engine tile {engine.tile}, batch {engine.batch_size}")
        print(f"cli job (report): {fmt_times(cli_job)}")
        print(f"cli process wall (incl. start-up, model load, probe): {fmt_times(cli_wall)}")
        print(f"cli's own compute seconds (report, ranks): {fmt_times(rank_compute)}")
        print(f"compute alone: {fmt_times(compute)}")
        print(f"RATIO compute alone / cli job = {min(compute) / min(cli_job):.3f}  (target >= 0.9)")
        print(f"      compute alone / cli process wall = {min(compute) / min(cli_wall):.3f}")
        # The CLI is a fresh process: its job includes the device's warm-up (first kernels,
        # allocations), which best-of-N compute alone has behind it. Compute alone's first run
        # is the same engine cold.
        print(f"      compute alone's first run (cold engine, {compute[0]:.2f} s) / cli job = {compute[0] / min(cli_job):.3f}")
        if a.profile:
            prof = subprocess.run([sys.executable, "-m", "cProfile", "-s", "tottime", "-m", "tilerun", *args],
                                  check=True, capture_output=True, text=True).stdout
            print("\n".join(prof.splitlines()[:35]))
        if a.timeline:
            subprocess.run([sys.executable, str(ROOT / "bench" / "cli_timeline.py"), *args], check=True)
        for n, times in variant_job.items():
            print(f"cli job with {n}: {fmt_times(times)}")
            print(f"RATIO compute alone / cli job ({n}) = {min(compute) / min(times):.3f}")


if __name__ == "__main__":
    main()
