"""Benchmark 2: the tiled engine vs MONAI's sliding_window_inference on the same model.

    python bench/monai_compare.py [--size 2048] [--repeats 3] [--device cpu|cuda]      (pip install monai)

MONAI gets what its API allows: a single-tensor predictor (image and mask in, logits and
RGB concatenated out), roi = our tile, overlap 0.25, gaussian blending, sw_batch_size =
our batch, the model's own forward per window (MONAI has no global pass, so every window
uses its own window's global features) and the same channels_last weights as the engine.
Interleaved, best of ``repeats``; then both results against one whole-image forward.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import fmt_times, holes, interleaved, machine, photo  # noqa: E402
from bench.engine_vs_whole import deviation, to_uint8, whole_forward  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tile", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()

    import monai
    import torch
    from monai.inferers import sliding_window_inference

    from tilerun.engine import Engine, infer_image
    from tilerun.model import load_model

    print(machine())
    print(f"monai {monai.__version__}")
    img, mask = photo(a.size), holes(a.size)
    dev = a.device
    model = load_model()
    engine = Engine(model, tile=a.tile, batch_size=a.batch, device=dev)  # moves model (channels_last), shared below
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    roi = (engine.tile, engine.tile)

    def predictor(x: torch.Tensor) -> torch.Tensor:
        logits, rgb = model(x[:, :3], x[:, 3:4])
        return torch.cat([logits, rgb], 1)

    x = torch.cat(
        [torch.from_numpy(img).permute(2, 0, 1)[None].float().div(255), torch.from_numpy(mask)[None, None].float()], 1
    ).to(dev)

    def monai_run():
        with torch.inference_mode():
            out = sliding_window_inference(
                x, roi_size=roi, sw_batch_size=engine.batch_size, predictor=predictor, overlap=0.25, mode="gaussian"
            )
        sync()
        return out[:, :-3], out[:, -3:]

    if engine.device.type == "cuda":
        print(torch.cuda.get_device_name(engine.device))
    print(f"photo {a.size}^2, {mask.mean():.1%} missing; roi {roi}, overlap 0.25, gaussian, sw_batch_size {engine.batch_size}")
    times = interleaved({"tiled": lambda: infer_image(engine, img, mask), "monai": monai_run}, repeats=a.repeats)
    for name, ts in times.items():
        print(f"{name}: {fmt_times(ts)}")
    best = {k: min(v) for k, v in times.items()}
    print(f"RATIO monai / tiled = {best['monai'] / best['tiled']:.2f}x  (target >= 2.5)")
    ref = to_uint8(*whole_forward(load_model().to(dev), img, mask, device=dev))
    print("tiled vs whole:", deviation(infer_image(engine, img, mask), ref))
    logits, rgb = monai_run()
    m_classes, m_rgb = to_uint8(logits, rgb)
    m_rgb = m_rgb.copy()
    m_rgb[~mask] = img[~mask]  # known pixels as both tools' users would keep them
    print("monai vs whole:", deviation((m_classes, m_rgb), ref))


if __name__ == "__main__":
    main()
