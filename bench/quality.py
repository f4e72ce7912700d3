"""Inpainting quality of tilerun's default weights vs classical inpainting, on unseen photos.

On the test split of data/photos.csv (natural photos nobody trained on or chose anything
with: `make photos` fetches them into build/photos/), with fixed-seed holes and random noise
under them, measures on the hole pixels only:

* PSNR and SSIM (scikit-image's SSIM map, averaged over the hole pixels) of tilerun
  (through `tilerun.infer_image`, i.e. the tiled engine), OpenCV's Telea (radius 5) and
  scikit-image's biharmonic inpainting;
* class accuracy (truth: the palette class nearest the true colour) of tilerun's class
  map vs the baseline "class of the nearest known pixel".

Hole kinds: "strokes" are the training mask generator's thick brush strokes sized for a
96-px crop (drawn per 96 x 96 area of the photo, whatever the weights); "boxes" are 1-3 squares of 8-20% of the
photo's long side each, far wider than the network's receptive field.
``--split val`` measures on the validation photos instead (the ones choices are made on);
``--photos DIR`` on your own pictures (PNG, JPEG or TIFF, scaled to 800 px on the long side as
the splits are), e.g. pictures kept out of everything here for an independent check.

    python bench/quality.py [--split test | --photos DIR] [--write BENCHMARKS.md] [--figure docs/quality.png]
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PHOTOS = ROOT / "build" / "photos"
SEED = 4
LONG_SIDE = 800  # the splits' size (data/fetch_photos.py); bigger pictures are scaled to it
SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff"}
TRIALS = 2  # masks per photo and kind
CASES = ["strokes", "boxes"]
# Strokes are drawn per 96 x 96 area of the photo (the shipped weights' first training crop),
# whatever the weights measured: every model meets the same holes.
STROKE_SCALE = 96
SECTION = "## Quality"


def box_holes(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """1-3 squares, each side 8-20% of the long side, anywhere in the photo."""
    mask = np.zeros((h, w), bool)
    for _ in range(int(rng.integers(1, 4))):
        side = int(round(max(h, w) * rng.uniform(0.08, 0.20)))
        y, x = int(rng.integers(0, h - side)), int(rng.integers(0, w - side))
        mask[y : y + side, x : x + side] = True
    return mask


def cases(photos: list[Path], label: str):
    """Each case of hole kind ``label`` (one of CASES) on ``photos``: (photo, trial, truth, mask,
    damaged), fixed-seed holes with random noise under them (a method that peeks at hidden pixels
    would show it)."""
    from tilerun.masks import random_mask

    ci = CASES.index(label)
    for pi, path in enumerate(photos):
        im = Image.open(path).convert("RGB")
        if max(im.size) > LONG_SIDE:
            scale = LONG_SIDE / max(im.size)
            im = im.resize((round(im.width * scale), round(im.height * scale)), Image.LANCZOS)
        truth = np.asarray(im)
        h, w = truth.shape[:2]
        for trial in range(TRIALS):
            rng = np.random.default_rng([SEED, ci, pi, trial])
            if label == "boxes":
                mask = box_holes(rng, h, w)
            else:
                mask = random_mask(rng, h, w, kind="thick", scale=STROKE_SCALE)
            damaged = truth.copy()
            damaged[mask] = rng.integers(0, 256, (int(mask.sum()), 3), dtype=np.uint8)
            yield path, trial, truth, mask, damaged


def hole_ssim(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    _, full = structural_similarity(a, b, channel_axis=-1, data_range=255, full=True)
    return float(full.mean(-1)[mask].mean())


def psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    err = (a.astype(np.float64) - b.astype(np.float64))[mask]
    return float(10 * np.log10(255.0**2 / max(np.mean(err**2), 1e-12)))


def nearest_class(rgb: np.ndarray, palette: np.ndarray) -> np.ndarray:
    p = palette.astype(np.float32)
    x = rgb.reshape(-1, 3).astype(np.float32)
    d = (x**2).sum(1)[:, None] - 2 * x @ p.T + (p**2).sum(1)[None]
    return d.argmin(1).reshape(rgb.shape[:2])


def run(*, model_path: Path | None, figure: Path | None, split: str = "test",
        classical: bool = True, prefill: bool = False, photos_dir: Path | None = None) -> tuple[str, dict]:
    import cv2
    import torch
    from scipy.ndimage import distance_transform_edt
    from skimage.restoration import inpaint_biharmonic

    import tilerun
    from tilerun.engine import Engine
    from tilerun.model import DEFAULT_WEIGHTS

    torch.set_num_threads(2)
    sys.path.insert(0, str(ROOT / "bench"))
    from common import load_model_spec

    model = load_model_spec(str(model_path)) if model_path is not None else tilerun.load_model(None)
    if model_path is None and not DEFAULT_WEIGHTS.exists():
        print("warning: no trained default weights; measuring the untrained init", file=sys.stderr)
    if prefill:  # the RGB head's correction is zero: the output in a hole is the pre-fill itself
        with torch.no_grad():
            model.decoder.rgb.weight.zero_()
            model.decoder.rgb.bias.zero_()
    engine = Engine(model)  # probed once, reused for every image
    palette = np.array(model.palette, np.uint8)
    # The latest run's crop (a merge's replicas share theirs); 128, tilerun train's default, without metadata.
    crop = next((t["recipe"]["crop"] for t in _runs(_training(model)) if (t.get("recipe") or {}).get("crop")), 128)

    where = photos_dir or PHOTOS / split
    photos = sorted(p for p in where.glob("*") if p.suffix.lower() in SUFFIXES)
    if not photos:
        fix = "give a folder of PNG, JPEG or TIFF pictures" if photos_dir else "run `make photos`"
        raise SystemExit(f"no pictures in {where}: {fix}")
    rows = {}
    examples = []
    methods = ("tilerun", "telea", "biharmonic")
    for label in CASES:
        acc = {k: [] for k in ("ratio", "cls", "cls_base", *methods, *(f"ssim_{m}" for m in methods),
                               *(f"t_{m}" for m in methods))}
        per_photo: dict[str, dict[str, list[float]]] = {}
        for path, trial, truth, mask, damaged in cases(photos, label):
            t = time.perf_counter()
            classes, filled = tilerun.infer_image(engine, damaged, mask)
            acc["t_tilerun"].append(time.perf_counter() - t)
            t = time.perf_counter()
            telea = cv2.inpaint(damaged, mask.astype(np.uint8), 5, cv2.INPAINT_TELEA)
            acc["t_telea"].append(time.perf_counter() - t)
            t = time.perf_counter()
            bih = inpaint_biharmonic(damaged, mask, channel_axis=-1) if classical else telea
            acc["t_biharmonic"].append(time.perf_counter() - t)
            if classical:
                bih = np.clip(np.round(bih * 255), 0, 255).astype(np.uint8)

            acc["ratio"].append(mask.mean())
            for name, out in (("tilerun", filled), ("telea", telea), ("biharmonic", bih)):
                acc[name].append(psnr(out, truth, mask))
                per_photo.setdefault(path.stem, {}).setdefault(name, []).append(acc[name][-1])
                acc[f"ssim_{name}"].append(hole_ssim(out, truth, mask))
            true_cls = nearest_class(truth, palette)
            idx = distance_transform_edt(mask, return_indices=True)[1]
            base_cls = true_cls[idx[0], idx[1]]  # the class of the nearest known pixel
            acc["cls"].append(float((classes[mask] == true_cls[mask]).mean()))
            acc["cls_base"].append(float((base_cls[mask] == true_cls[mask]).mean()))
            if trial == 0:
                examples.append((f"{path.stem}, {label}", mask, damaged, filled, telea, bih, truth))
        rows[label] = {k: float(np.mean(v)) for k, v in acc.items()}
        print(label, {k: round(v, 3) for k, v in rows[label].items()}, file=sys.stderr)
        # The mean hides how far the margin swings from one picture to the next.
        for stem, by in per_photo.items():
            print(f"  {stem}:", ", ".join(f"{m} {np.mean(v):.2f}" for m, v in by.items()), file=sys.stderr)

    if figure is not None:
        _figure(examples, figure)
    return _table(rows, model, crop=crop, model_name=str(model_path or "tilerun/weights/default.safetensors"),
                  photos=photos, split=split, photos_dir=photos_dir), rows


def _training(model) -> dict:
    import json

    meta = getattr(model, "metadata", {})
    return json.loads(meta["training"]) if "training" in meta else {}


def _runs(training: dict) -> list[dict]:
    """The training runs behind weights (chains of --init-from, merged replicas), shared ones once."""
    runs, seen, todo = [], set(), [training]
    while todo:
        t = todo.pop() or {}
        if "merged" in t:
            todo.extend(t["merged"])
            continue
        key = (t.get("file"), t.get("step"), t.get("seconds"))
        if t and key not in seen:
            seen.add(key)
            runs.append(t)
            todo.append(t.get("init_from"))
    return runs


def _provenance(training: dict) -> str:
    """ "step 3000 of 3000 of the last of 7 training runs, ..." or "the mean of 2 replicas (...), ..."."""
    runs = _runs(training)
    total = sum(float(t.get("seconds") or 0) for t in runs)
    if "merged" in training:
        parts = [f"`{t.get('file')}` step {t.get('step', '?')} of {(t.get('recipe') or {}).get('steps', '?')}"
                 for t in training["merged"]]
        head = f"the mean of {len(parts)} replicas ({', '.join(parts)})"
    else:
        head = f"step {training.get('step', '?')} of {(training.get('recipe') or {}).get('steps', '?')}"
    if not runs:
        return head
    return (f"{head}; {len(runs)} training runs, {total / 60:.0f} min of training in all "
            "(a shared 2-core CPU; see docs/training.md)")


def _which(photos: list[Path], split: str, photos_dir: Path | None) -> str:
    names = ", ".join(p.stem for p in photos)
    if photos_dir is not None:
        return f"The pictures of `{photos_dir}` ({names}; at most {LONG_SIDE} px on the long side)"
    chosen = "nothing chosen with them" if split == "test" else "the choices were made on them"
    return f"The {split} split of `data/photos.csv` ({names}: never trained on, {chosen})"


def _table(rows: dict, model, *, crop: int, model_name: str, photos: list[Path], split: str = "test",
           photos_dir: Path | None = None) -> str:
    import platform

    import torch

    training = _training(model)
    lines = [
        SECTION,
        "",
        f"`make quality` (`python bench/quality.py`), {platform.machine()} CPU, torch {torch.__version__}, "
        f"2 threads. {_which(photos, split, photos_dir)}, {TRIALS} "
        "fixed-seed masks per photo and hole kind, random noise under the "
        "holes. PSNR (dB), SSIM and class accuracy on the hole pixels only, averaged over the cases; "
        "runtime in seconds per photo.",
        "",
        f"Weights: `{model_name}`, {_provenance(training)}.",
        "",
        "| holes | hole ratio | tilerun PSNR | Telea PSNR | biharmonic PSNR | tilerun − best classical | "
        "tilerun SSIM | Telea SSIM | biharmonic SSIM | tilerun class acc. | nearest-known acc. | tilerun s | "
        "Telea s | biharmonic s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, r in rows.items():
        best = max(r["telea"], r["biharmonic"])
        lines.append(
            f"| {label} | {100 * r['ratio']:.1f}% | {r['tilerun']:.2f} | {r['telea']:.2f} | {r['biharmonic']:.2f} | "
            f"{r['tilerun'] - best:+.2f} | {r['ssim_tilerun']:.3f} | {r['ssim_telea']:.3f} | "
            f"{r['ssim_biharmonic']:.3f} | {100 * r['cls']:.1f}% | {100 * r['cls_base']:.1f}% | "
            f"{r['t_tilerun']:.2f} | {r['t_telea']:.3f} | {r['t_biharmonic']:.2f} |"
        )
    verdicts = []
    for label, r in rows.items():
        gap = r["tilerun"] - max(r["telea"], r["biharmonic"])
        verdicts.append(f"{label}: PSNR {'met' if gap >= 0.5 else 'missed'} ({gap:+.2f} dB vs +0.50 needed), "
                        f"class accuracy {'met' if r['cls'] >= r['cls_base'] else 'missed'} "
                        f"({100 * (r['cls'] - r['cls_base']):+.1f} points)")
    lines += [
        "",
        "**Result:** " + "; ".join(verdicts) + ".",
        "",
        "Targets: tilerun ≥ the better classical method + 0.5 dB on strokes and on boxes, and class "
        f"accuracy ≥ nearest-known. Strokes are the training generator's thick strokes, sized for and drawn "
        f"once per {STROKE_SCALE}x{STROKE_SCALE} area of the photo; boxes are 1-3 squares of 8-20% of the "
        "photo's long side, wider than the network's receptive field: their middles get colour from the "
        "whole-image coarse context (docs/model.md).",
        "",
    ]
    return "\n".join(lines)


def _figure(examples: list, path: Path) -> None:
    """Rows of crops around a hole: input with holes (marked) | tilerun | Telea | biharmonic | truth."""
    from PIL import ImageDraw

    side = 240
    cols = ["input (holes marked)", "tilerun", "Telea", "biharmonic", "truth"]
    head = 18
    sheet = Image.new("RGB", (side * len(cols), head + (side + head) * len(examples)), "white")
    draw = ImageDraw.Draw(sheet)
    for j, c in enumerate(cols):
        draw.text((j * side + 4, 3), c, fill="black")
    for i, (title, mask, damaged, *ims) in enumerate(examples):
        y = head + i * (side + head)
        draw.text((4, y + 3), title, fill="black")
        h, w = mask.shape
        ys, xs = np.nonzero(mask)
        k = len(ys) // 2  # a crop around a hole pixel, inside the photo
        cy = int(np.clip(ys[k] - side // 2, 0, h - side))
        cx = int(np.clip(xs[k] - side // 2, 0, w - side))
        shown = damaged.copy()
        shown[mask] = (255, 0, 255)  # the holes, not the noise under them
        for j, im in enumerate([shown, *ims]):
            sheet.paste(Image.fromarray(im[cy : cy + side, cx : cx + side]), (j * side, y + head))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, optimize=True)


def write_section(path: Path, text: str) -> None:
    """Replace (or append) this benchmark's section; other sections stay as they are."""
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(old):
        new = pattern.sub(lambda _: text + "\n", old)
    else:
        new = old.rstrip("\n") + "\n\n" + text + "\n"
    path.write_text(new)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--write", type=Path, default=None, help="Markdown file whose Quality section to (re)write.")
    ap.add_argument("--model", type=Path, default=None, help="Weights to measure (default: the shipped ones); "
                    "PATH:field=value,... switches TileNetConfig fields on them, e.g. PATH:class_fill=true.")
    ap.add_argument("--figure", type=Path, default=None, help="PNG of a few results (e.g. docs/quality.png).")
    ap.add_argument("--split", default="test", choices=["test", "val"],
                    help="Photos to measure on: val for choices, test once at the end.")
    ap.add_argument("--photos", type=Path, default=None,
                    help="A folder of your own pictures to measure on instead of a split.")
    ap.add_argument("--no-classical", dest="classical", action="store_false",
                    help="Skip biharmonic (slow); its columns then repeat Telea's.")
    ap.add_argument("--prefill", action="store_true", help="Measure the model's pre-fill alone (its RGB head zeroed).")
    args = ap.parse_args()
    text, _ = run(model_path=args.model, figure=args.figure, split=args.split, classical=args.classical,
                  prefill=args.prefill, photos_dir=args.photos)
    print(text)
    if args.write:
        write_section(args.write, text)


if __name__ == "__main__":
    main()
