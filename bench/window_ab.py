"""One tile's forward, TileNet's code at a git ref vs the working tree's, interleaved in one process.

    python bench/window_ab.py [--ref HEAD] [--repeats 12] [--side 464] [--halo 40] [--threads 1] [--holes two|wide]

For changes to ``tilerun/model/net.py``: both models get the shipped weights, NHWC as the
CPU engine runs them, and a window as pass 2 runs it (its core asked for, ``out_box``; two
holes, or with ``--holes wide`` one box half the window across, so that the harmonic sweeps
cover whole planes). Each forward is timed in the calling thread's CPU time, the heap trimmed before it
as the engine does (so every forward faults its activations in afresh), old and new
alternately; best, first quartile and median per side. Then the largest difference of the
outputs and the share of class pixels that differ.
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def net_at(ref: str) -> types.ModuleType:
    """``tilerun/model/net.py`` as it was at ``ref``, imported under another name."""
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{ref}:tilerun/model/net.py"],
                         capture_output=True, text=True, check=True).stdout
    module = types.ModuleType("tilerun_net_at_ref")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(src.replace("from ..", "from tilerun."), f"{ref}:net.py", "exec"), module.__dict__)
    return module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref", default="HEAD")
    ap.add_argument("--repeats", type=int, default=12)
    ap.add_argument("--side", type=int, default=464)
    ap.add_argument("--halo", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--holes", choices=["two", "wide"], default="two")
    a = ap.parse_args()

    import torch

    from bench.common import machine
    from tilerun.engine import _release_free_heap
    from tilerun.model import load_model

    print(machine())
    torch.set_num_threads(a.threads)
    new = load_model().eval()
    old_net = net_at(a.ref)
    known = {f.name for f in dataclasses.fields(old_net.TileNetConfig)}  # fields added since ref stay at their defaults
    old_cfg = old_net.TileNetConfig.from_dict({k: v for k, v in new.cfg.to_dict().items() if k in known})
    old = old_net.TileNet(old_cfg, new.palette).eval()
    old.load_state_dict(new.state_dict())
    models = {a.ref: old.to(memory_format=torch.channels_last), "working tree": new.to(memory_format=torch.channels_last)}

    s, h = a.side, a.halo
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, s, s, 3, generator=g).permute(0, 3, 1, 2)  # NHWC-strided, as the engine's windows
    m = torch.zeros(1, 1, s, s)
    if a.holes == "wide":
        m[..., s // 4 : 3 * s // 4, s // 4 : 3 * s // 4] = 1
    else:
        m[..., s // 3 : s // 2, s // 3 : s // 2] = 1
        m[..., s // 20 : s // 8, 2 * s // 3 : 5 * s // 7] = 1
    sums = torch.rand(1, 2 * new.cfg.width, generator=g) + 0.5
    box = (h, s - h, h, s - h)
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.inference_mode():
        outs = {k: net(x, m, global_sums=sums, out_box=box) for k, net in models.items()}  # warm-up
        for _ in range(a.repeats):
            for k, net in models.items():
                _release_free_heap()
                t0 = time.thread_time()
                net(x, m, global_sums=sums, out_box=box)
                times[k].append(time.thread_time() - t0)
    print(f"window {s}^2, core {s - 2 * h}^2, {a.threads} thread(s), {a.repeats} forwards each, CPU time of the thread")
    for k, v in times.items():
        v = sorted(v)
        print(f"{k}: best {v[0] * 1e3:.1f} ms, first quartile {v[len(v) // 4] * 1e3:.1f}, median {v[len(v) // 2] * 1e3:.1f}")
    (ko, vo), (kn, vn) = times.items()
    print(f"RATIO working tree / {a.ref}: best {min(vn) / min(vo):.3f}, median {sorted(vn)[len(vn) // 2] / sorted(vo)[len(vo) // 2]:.3f}")
    (lo, ro), (ln, rn) = outs[ko], outs[kn]
    print(f"largest difference: logits {(lo - ln).abs().max().item():.2e}, rgb {(ro - rn).abs().max().item():.2e}; "
          f"class pixels differing {(lo.argmax(1) != ln.argmax(1)).float().mean().item():.5%}")


if __name__ == "__main__":
    main()
