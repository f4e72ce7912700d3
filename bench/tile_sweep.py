"""Choose the default tile (and batch) by measurement: time and peak memory per setting.

    python bench/tile_sweep.py [--size 2048] [--tiles 384,512,768,1024] [--batches 1] [--repeats 3] [--device cpu]

Time: tiled inference of a ``size``^2 photo with holes, all settings interleaved, best of
``repeats``. Memory: each setting once more in a fresh subprocess, peak RSS above the
process's RSS just before inference (model loaded, image decoded; the peak is reset
through Linux's /proc/self/clear_refs so that the probe's own peak is left out): the
float working set a setting adds, which for a big photo sits on top of its uint8 arrays.
On CUDA: the peak of PyTorch's GPU allocator over one more run of each setting instead.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import fmt_times, holes, interleaved, machine, photo, vm_mb  # noqa: E402


def _memory_child(size: int, tile: int, batch: int, workers: int, device: str) -> None:
    from tilerun.engine import Engine, infer_image
    from tilerun.model import load_model

    img, mask = photo(size), holes(size)
    engine = Engine(load_model(), tile=tile, batch_size=batch, device=device, workers=workers or None)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS: the model probe's own peak is not the tile's doing
    before = vm_mb("VmRSS:")
    infer_image(engine, img, mask)
    peak = vm_mb("VmHWM:")
    print(json.dumps({"before_mb": before, "peak_mb": peak}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--tiles", default="384,512,768,1024")
    ap.add_argument("--batches", default="1")
    ap.add_argument("--workers", type=int, default=None, help="CPU workers (default: the engine's)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--memory-child", nargs=3, type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.memory_child:
        _memory_child(a.size, *a.memory_child, a.device)
        return

    import torch

    from tilerun.engine import Engine, infer_image
    from tilerun.model import load_model

    print(machine())
    img, mask = photo(a.size), holes(a.size)
    probe = None
    fns = {}
    settings = [(t, b) for t in map(int, a.tiles.split(",")) for b in map(int, a.batches.split(","))]
    for t, b in settings:
        e = Engine(load_model(), tile=t, batch_size=b, device=a.device, probe=probe, workers=a.workers)
        probe = e.probe
        sync = torch.cuda.synchronize if e.device.type == "cuda" else (lambda: None)
        fns[f"tile {t} batch {b}"] = lambda e=e, sync=sync: (infer_image(e, img, mask), sync())
    times = interleaved(fns, repeats=a.repeats)
    mp = a.size * a.size / 1e6
    for (t, b), (name, ts) in zip(settings, times.items()):
        if a.device.startswith("cuda"):
            # GPU memory is what a setting spends there: the caching allocator's peak, one more run.
            torch.cuda.reset_peak_memory_stats()
            fns[name]()
            print(f"{name}: {mp / min(ts):.3f} MP/s, {fmt_times(ts)}; peak GPU memory "
                  f"{torch.cuda.max_memory_allocated() / 2**20:.0f} MiB", flush=True)
            continue
        child = subprocess.run(
            [sys.executable, __file__, "--size", str(a.size), "--device", a.device, "--memory-child", str(t), str(b), str(a.workers or 0)],
            capture_output=True, text=True, check=True,
        )
        mem = json.loads(child.stdout.strip().splitlines()[-1])
        print(f"{name}: {mp / min(ts):.3f} MP/s, {fmt_times(ts)}; float working set "
              f"{mem['peak_mb'] - mem['before_mb']:.0f} MB (peak RSS {mem['peak_mb']:.0f} MB)", flush=True)


if __name__ == "__main__":
    main()
