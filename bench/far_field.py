"""How well the coarse context alone fills the boxes, by cell size, against biharmonic inpainting.

    python bench/far_field.py [--split val] [--scales 16,8,4,2] [--iterations 30]

The boxes of `bench/quality.py` (the same photos, seeds and noise under the holes). Each box is
filled with the far field alone: the model's coarse context (`TileNet.coarse_context`) at each
cell size, upsampled (`far_field`), with no local pre-fill and no network. Mean hole PSNR over
the cases, beside biharmonic inpainting at full resolution. ``--iterations``: the biharmonic
Chebyshev iterations per level (the shipped setting: 30). Beside each, the same cells taken
from the undamaged picture: the ceiling of any fill at that cell size, however clever.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", choices=["val", "test"], default="val")
    ap.add_argument("--scales", default="16,8,4,2", help="colour cell sizes (px) to fill at")
    ap.add_argument("--iterations", type=int, default=None, help="biharmonic iterations per level")
    args = ap.parse_args()

    import numpy as np
    from skimage.restoration import inpaint_biharmonic

    import quality as Q
    import tilerun
    import tilerun.model.net as net

    if args.iterations is not None:
        net.BIHARMONIC_ITERATIONS = args.iterations
    model = tilerun.load_model()
    scales = [int(s) for s in args.scales.split(",")]
    models = {s: tilerun.model.TileNet(dataclasses.replace(model.cfg, coarse_scale=s), model.palette) for s in scales}
    scores: dict[str, list[float]] = {}
    photos = sorted((Q.PHOTOS / args.split).glob("*.png"))
    for _, _, truth, mask, damaged in Q.cases(photos, "boxes"):
        h, w = truth.shape[:2]
        bih = inpaint_biharmonic(damaged, mask, channel_axis=-1)
        row = {"biharmonic": np.clip(np.round(bih * 255), 0, 255).astype(np.uint8)}
        for s, m in models.items():
            for name, image, holes in ((f"far field, {s}-px cells", damaged, mask), (f"true {s}-px cells", truth, None)):
                ctx = m.coarse_context(image, holes)
                colours = (ctx[0] if isinstance(ctx, tuple) else ctx)[0]
                row[name] = np.clip(np.round(
                    net.far_field(colours, 0, h, 0, w, s).permute(1, 2, 0).numpy() * 255), 0, 255).astype(np.uint8)
        for name, fill in row.items():
            scores.setdefault(name, []).append(Q.psnr(np.where(mask[..., None], fill, truth), truth, mask))
    print(f"{args.split} boxes, {len(scores['biharmonic'])} cases, mean hole PSNR"
          f" (biharmonic iterations per level: {net.BIHARMONIC_ITERATIONS}):")
    for name, v in scores.items():
        print(f"  {name:>24}: {np.mean(v):.2f} dB")


if __name__ == "__main__":
    main()
