"""Benchmark 5: compute efficiency — achieved FLOP/s of the tiled engine ÷ a large matmul's FLOP/s.

    python bench/flops.py [--size 2048] [--repeats 3] [--matmul 4096] [--device cpu|cuda] [--precision fp32|bf16]

Model FLOPs per pixel: torch.utils.flop_counter.FlopCounterMode over one forward of a
512^2 input (convolutions, linear layers: 2 FLOPs per multiply-add), divided by its
pixels. Achieved: that × the engine's throughput in core pixels per second on a
``size``^2 photo (both passes in the time; halos and pass 1 count as overhead, not as
work). Reference: a ``matmul`` of two ``matmul``^2 matrices in the same precision (fp32:
IEEE on CUDA too, as the engine's convolutions), same threads, interleaved with the
engine runs, best of ``repeats`` each.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import fmt_times, holes, interleaved, machine, photo  # noqa: E402


def model_flops_per_pixel(model, side: int = 512) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x, m = torch.rand(1, 3, side, side), torch.zeros(1, 1, side, side)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(x, m)
    return counter.get_total_flops() / (side * side)


def window_work(model, side: int, halo: int, threads: int) -> tuple[float, float, float]:
    """One window forward as the engine runs it (its core asked for, ``out_box``): (share of its
    CPU time in convolutions, their FLOP/s, its FLOPs per core pixel)."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.rand(1, 3, side, side).contiguous(memory_format=torch.channels_last)
    m = torch.zeros(1, 1, side, side)
    m[..., side // 3 : side // 2, side // 3 : side // 2] = 1
    box = (halo, side - halo, halo, side - halo)
    net = model.to(memory_format=torch.channels_last)
    torch.set_num_threads(threads)
    with torch.inference_mode():
        net(x, m, out_box=box)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            net(x, m, out_box=box)
        with FlopCounterMode(display=False) as counter:
            net(x, m, out_box=box)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    conv = sum(e.self_cpu_time_total for e in events if "conv" in e.key)
    flops = counter.get_total_flops()
    return conv / total, flops / (conv / 1e6), flops / (side - 2 * halo) ** 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--matmul", type=int, default=4096)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    a = ap.parse_args()

    import torch

    from tilerun.engine import Engine, infer_image
    from tilerun.model import load_model

    print(machine())
    img, mask = photo(a.size), holes(a.size)
    model = load_model()
    fpp = model_flops_per_pixel(model)
    engine = Engine(model, device=a.device, precision=a.precision)
    cuda = engine.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    n = a.matmul
    dtype = torch.bfloat16 if a.precision == "bf16" else torch.float32
    p, q = torch.rand(n, n, device=engine.device, dtype=dtype), torch.rand(n, n, device=engine.device, dtype=dtype)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False  # IEEE fp32, as the engine's fp32 convolutions
        print(torch.cuda.get_device_name(engine.device))

    reps = 10 if cuda else 1  # a GPU matmul of 4096^2 takes ~1 ms: time ten

    def matmul():
        for _ in range(reps):
            p @ q
        sync()

    matmul()  # warm-up: oneDNN/MKL/cuBLAS pick their kernels once
    times = interleaved({"matmul": matmul, "tiled": lambda: infer_image(engine, img, mask)}, repeats=a.repeats)
    times["matmul"] = [t / reps for t in times["matmul"]]
    mm_flops = 2 * n**3 / min(times["matmul"])
    mps = a.size * a.size / min(times["tiled"])
    achieved = fpp * mps
    print(f"model: {fpp / 1e3:.1f} kFLOP per pixel (FlopCounterMode)")
    print(f"matmul {n}^2 {a.precision}: {fmt_times(times['matmul'])} -> {mm_flops / 1e9:.1f} GFLOP/s")
    print(f"tiled {a.size}^2 (tile {engine.tile}, batch {engine.batch_size}): {fmt_times(times['tiled'])} -> "
          f"{mps / 1e6:.3f} MP/s -> {achieved / 1e9:.1f} GFLOP/s")
    print(f"RATIO achieved / matmul = {achieved / mm_flops:.1%}  (target >= 70%)")
    if cuda:
        return  # the window breakdown below reads the CPU profiler
    window = engine.tile + 2 * engine.halo
    share, conv_flops, per_core = window_work(model, window, engine.halo, torch.get_num_threads())
    print(f"one {window}^2 window forward ({torch.get_num_threads()} threads, core asked for): convolutions {share:.0%} "
          f"of its CPU time, at {conv_flops / 1e9:.1f} GFLOP/s = {conv_flops / mm_flops:.0%} of the matmul; "
          f"{per_core / 1e3:.1f} kFLOP per core pixel = {per_core / fpp:.2f}x the model's per pixel "
          f"(the halo's share; {(window / engine.tile) ** 2:.2f}x pixels per core pixel for the encoder)")


if __name__ == "__main__":
    main()
