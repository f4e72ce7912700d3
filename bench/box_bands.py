"""Where in a box the fill is good: hole PSNR by distance from the box's border.

    python bench/box_bands.py [--split val] [--model PATH[:field=value,...]]

The boxes of `bench/quality.py` (the same photos, seeds and noise under the holes), filled by
the model, by its pre-fill alone (its RGB correction zeroed) and by biharmonic inpainting.
Each hole pixel's squared error is pooled by its distance to the nearest known pixel
(0-4, 4-8, 8-16, 16-32, 32-64, 64+ px), and each band's PSNR printed.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

BANDS = [(0, 4), (4, 8), (8, 16), (16, 32), (32, 64), (64, None)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", choices=["val", "test"], default="val")
    ap.add_argument("--model", default=None, help="weights (default: the shipped ones), as quality.py takes them")
    args = ap.parse_args()

    import numpy as np
    import torch
    from scipy.ndimage import distance_transform_edt
    from skimage.restoration import inpaint_biharmonic

    import quality as Q
    import tilerun
    from common import load_model_spec
    from tilerun.engine import Engine

    model = load_model_spec(args.model) if args.model else tilerun.load_model()
    pre = copy.deepcopy(model)
    with torch.no_grad():
        pre.decoder.rgb.weight.zero_()
        pre.decoder.rgb.bias.zero_()
    engines = {"model": Engine(model), "pre-fill": Engine(pre)}
    totals = {k: np.zeros((len(BANDS), 2)) for k in (*engines, "biharmonic")}
    photos = sorted((Q.PHOTOS / args.split).glob("*.png"))
    for _, _, truth, mask, damaged in Q.cases(photos, "boxes"):
        fills = {k: tilerun.infer_image(e, damaged, mask)[1] for k, e in engines.items()}
        bih = inpaint_biharmonic(damaged, mask, channel_axis=-1)
        fills["biharmonic"] = np.clip(np.round(bih * 255), 0, 255).astype(np.uint8)
        dist = distance_transform_edt(mask)
        for k, fill in fills.items():
            se = ((fill.astype(np.float64) - truth) ** 2).mean(-1)
            for b, (lo, hi) in enumerate(BANDS):
                band = (dist > lo) & (dist <= (np.inf if hi is None else hi))
                totals[k][b] += (se[band].sum(), band.sum())
    print("| px from the border | " + " | ".join(f"{lo}-{hi or ''}" for lo, hi in BANDS) + " |")
    print("|---" * (len(BANDS) + 1) + "|")
    print("| hole pixels | " + " | ".join(f"{int(n)}" for _, n in totals["model"]) + " |")
    for k, t in totals.items():
        cells = [f"{10 * np.log10(255**2 / (s / n)):.2f}" if n else "" for s, n in t]
        print(f"| {k} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
