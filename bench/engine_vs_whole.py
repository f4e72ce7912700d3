"""Benchmark 1: the tiled engine vs ONE whole-image forward of the same model.

    python bench/engine_vs_whole.py [--size 2048] [--repeats 3] [--tile T] [--batch B]
                                    [--device cpu|cuda] [--precision fp32|bf16|fp16]

A real photo (sample_images/retina.jpg, Lanczos-resized to size^2) with ~8% holes.
Interleaved, best of ``repeats``:

* ``whole (NCHW)``: the model as a user would call it, weights and input as PyTorch
  makes them (contiguous, NCHW);
* ``whole (channels_last)``: the same forward with NHWC weights, the engine's layout:
  the strongest single-forward baseline;
* ``tiled``: `infer_image` with the engine's defaults (both passes, uint8 out);
* ``pass 1 alone``: the engine's global pass, to show what the exact global features cost;
* on CUDA, ``tiled, no feature cache``: pass 2 runs the encoder again instead of taking
  pass 1's features (the engine's ``feature_cache=0``, the CPU default).

Prints the ratios and the tiled result's deviation from the whole forward.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import fmt_times, holes, interleaved, machine, photo  # noqa: E402


def whole_forward(model, img, mask, *, device="cpu", precision="fp32"):
    """One forward of the whole image, as a user would write it (with autocast for bf16/fp16)."""
    import contextlib

    import torch

    x = torch.from_numpy(img).permute(2, 0, 1)[None].to(device).float().div(255).contiguous()
    m = torch.from_numpy(mask)[None, None].to(device).float()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype:
        cast = torch.autocast(torch.device(device).type, dtype=dtype)
    elif torch.device(device).type == "cuda":
        # As the engine runs fp32 on CUDA: IEEE convolutions. cuDNN's default, TF32, would be
        # a faster but less exact baseline (and not the same function as the engine's).
        from tilerun.engine import _ieee_fp32_convs

        cast = _ieee_fp32_convs()
    else:
        cast = contextlib.nullcontext()
    with torch.inference_mode(), cast:
        logits, rgb = model(x, m)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return logits, rgb


def to_uint8(logits, rgb):
    import torch

    classes = logits.argmax(1)[0].to(torch.uint8).cpu().numpy()
    rgb8 = rgb[0].float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return classes, rgb8


def deviation(a, b) -> str:
    (ca, ra), (cb, rb) = a, b
    frac = float((ca != cb).mean())
    diff = int(abs(ra.astype(int) - rb.astype(int)).max())
    return f"class pixels differing {frac:.5%}, max RGB difference {diff} grey levels"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tile", type=int, default=None, help="default: the engine's CPU default")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--feature-cache", type=int, default=None, help="MiB (default: the engine's for the device)")
    ap.add_argument("--profile", action="store_true", help="also print where one tiled run spends its time")
    a = ap.parse_args()

    import torch

    from tilerun.engine import Engine, infer_image
    from tilerun.model import load_model

    print(machine())
    img, mask = photo(a.size), holes(a.size)
    dev, prec = a.device, a.precision
    plain = load_model().to(dev)  # NCHW, as PyTorch makes it
    channels_last = load_model().to(dev, memory_format=torch.channels_last)
    cache = None if a.feature_cache is None else a.feature_cache * 2**20
    engine = Engine(load_model(), tile=a.tile, batch_size=a.batch, device=dev, precision=prec, feature_cache=cache)
    if dev.startswith("cuda"):
        print(torch.cuda.get_device_name(dev))
    tiles = engine.tiles(a.size, a.size)
    print(f"photo {a.size}x{a.size}, {mask.mean():.1%} missing; engine tile {engine.tile}, batch {engine.batch_size}, "
          f"halo {engine.halo} (pass 1: {engine.global_halo}), {len(tiles)} tiles, precision {engine.precision}, "
          f"feature cache {engine._features.budget / 2**20:.0f} MiB")

    runs = {
        "whole (NCHW)": lambda: whole_forward(plain, img, mask, device=dev, precision=prec),
        "whole (channels_last)": lambda: whole_forward(channels_last, img, mask, device=dev, precision=prec),
        "tiled": lambda: infer_image(engine, img, mask),  # returns host arrays: synchronised
        "pass 1 alone": lambda: engine.reduce_partials(engine.global_partials(img, mask, tiles)),
    }
    if engine.device.type == "cuda":
        # The layout default on CUDA (NHWC for half precisions only) checked against the other one.
        other = Engine(load_model(), tile=a.tile, batch_size=a.batch, device=dev, precision=prec, feature_cache=cache,
                       channels_last=not engine.channels_last, probe=engine.probe)
        runs[f"tiled, {'NCHW' if engine.channels_last else 'channels_last'}"] = lambda: infer_image(other, img, mask)
    if engine.keeps_features:
        # Pass 1's encoder features kept for pass 2 (the CUDA default) against recomputing them.
        recompute = Engine(load_model(), tile=a.tile, batch_size=a.batch, device=dev, precision=prec, feature_cache=0,
                           probe=engine.probe)
        runs["tiled, no feature cache"] = lambda: infer_image(recompute, img, mask)
    if engine.workers > 1:
        # The CPU default: one single-threaded forward per core. Checked against one forward on all cores.
        one = Engine(load_model(), tile=a.tile, batch_size=a.batch, device=dev, precision=prec, workers=1, feature_cache=cache,
                     probe=engine.probe)
        runs["tiled, 1 worker"] = lambda: infer_image(one, img, mask)
    cpu: dict[str, list[float]] = {}
    times = interleaved(runs, repeats=a.repeats, cpu=cpu)
    for name, ts in times.items():
        print(f"{name}: {fmt_times(ts)}; process CPU best {min(cpu[name]):.2f} s")
    best = {k: min(v) for k, v in times.items()}
    mp = a.size * a.size / 1e6
    print(f"tiled: {mp / best['tiled']:.3f} MP/s")
    print(f"RATIO tiled / whole (channels_last) = {best['tiled'] / best['whole (channels_last)']:.3f}  (target <= 1.0, must <= 1.2)")
    print(f"RATIO tiled / whole (NCHW)          = {best['tiled'] / best['whole (NCHW)']:.3f}")
    if engine.device.type == "cpu":
        print(f"RATIO of process CPU seconds, best  = {min(cpu['tiled']) / min(cpu['whole (channels_last)']):.3f}  "
              "(tiled / whole channels_last: the work each did, less moved by other tenants)")
    print(f"pass 1 share of the tiled time      = {best['pass 1 alone'] / best['tiled']:.1%}")
    for name in best:
        if name.startswith("tiled, ") and "worker" not in name and "cache" not in name:
            print(f"RATIO {name} / tiled (default layout {'channels_last' if engine.channels_last else 'NCHW'}) = "
                  f"{best[name] / best['tiled']:.3f}")
    if "tiled, no feature cache" in best:
        print(f"RATIO tiled without / with the feature cache = {best['tiled, no feature cache'] / best['tiled']:.3f}")
        print(f"RATIO tiled without the feature cache / whole (NCHW) = "
              f"{best['tiled, no feature cache'] / best['whole (NCHW)']:.3f}")
    if "tiled, 1 worker" in best:
        print(f"RATIO tiled 1 worker / {engine.workers} workers  = {best['tiled, 1 worker'] / best['tiled']:.3f}")
    if a.profile:
        # Host side (Python and numpy; on CUDA, time blocked on the device shows in synchronize).
        import cProfile
        import pstats

        with cProfile.Profile() as host:
            infer_image(engine, img, mask)
        pstats.Stats(host).sort_stats("tottime").print_stats(15)
        if dev.startswith("cuda"):
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                infer_image(engine, img, mask)
            print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12))
    ref = to_uint8(*whole_forward(plain, img, mask, device=dev, precision=prec))
    print("tiled vs whole (NCHW):", deviation(infer_image(engine, img, mask), ref))


if __name__ == "__main__":
    main()
