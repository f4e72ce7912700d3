"""``NAME.preview.png``: input with holes marked | class map | inpainted, and a legend.

A preview is for looking at, not for measuring: every panel is downscaled to fit
``max_side`` (1024 px by default), so a gigapixel input gives a preview of a few
megabytes at most. The class map is downscaled by nearest neighbour (no blended
colours that are no class), the photos by area averaging, the holes by "any hole in
the block" so that a one-pixel scratch still shows.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .images import OUTPUT_FORMATS, output_suffixes, write_png_atomic

__all__ = ["make_preview", "write_preview", "write_previews", "preview_path", "HOLE_COLOURS", "MAX_SIDE", "GAP", "TITLE"]

log = logging.getLogger("tilerun")

MAX_SIDE = 1024
# Holes as magenta/black diagonal stripes: visible on any photo and unlike any flat class colour.
HOLE_COLOURS = ((255, 0, 255), (0, 0, 0))
GAP = 8  # pixels between and around the panels
TITLE = 18  # the panel titles' line
_BACKGROUND = (255, 255, 255)


def _font(size: int = 13):
    """Pillow's bundled FreeType font (Pillow >= 10.1), else its small bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow 10.0: no size argument
        return ImageFont.load_default()


def _fit(h: int, w: int, max_side: int) -> tuple[int, int]:
    scale = min(1.0, max_side / max(h, w))
    return max(1, round(h * scale)), max(1, round(w * scale))


def _marked_input(image: np.ndarray, mask: np.ndarray, size: tuple[int, int]) -> Image.Image:
    h, w = size
    small = np.asarray(Image.fromarray(image).resize((w, h), Image.BOX)).copy()
    holes = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((w, h), Image.BOX)) > 0
    yy, xx = np.mgrid[0:h, 0:w]
    stripe = ((yy + xx) // 4) % 2 == 0
    small[holes & stripe] = HOLE_COLOURS[0]
    small[holes & ~stripe] = HOLE_COLOURS[1]
    return Image.fromarray(small)


def _class_panel(classes: np.ndarray, palette, size: tuple[int, int]) -> Image.Image:
    h, w = size
    k = int(classes.max(initial=0)) + 1
    colours = np.array(list(palette or [])[:256] + [(0, 0, 0)] * max(0, k - len(palette or [])), np.uint8)
    small = np.asarray(Image.fromarray(classes).resize((w, h), Image.NEAREST))
    return Image.fromarray(colours[small])


def _legend(palette, width: int) -> Image.Image:
    """Swatches with class numbers, wrapped to ``width``."""
    font = _font(12)
    sw, pad = 14, 6
    items = [(str(i), tuple(c)) for i, c in enumerate(palette)]
    label_w = max((int(font.getlength(t)) for t, _ in items), default=0)
    cell = sw + 4 + label_w + 2 * pad
    per_row = max(1, width // cell)
    rows = -(-len(items) // per_row)
    im = Image.new("RGB", (width, rows * (sw + pad) + pad), _BACKGROUND)
    d = ImageDraw.Draw(im)
    for n, (text, colour) in enumerate(items):
        x, y = pad + (n % per_row) * cell, pad + (n // per_row) * (sw + pad)
        d.rectangle([x, y, x + sw - 1, y + sw - 1], fill=colour, outline=(0, 0, 0))
        d.text((x + sw + 4, y + 1), text, fill=(0, 0, 0), font=font)
    return im


def make_preview(
    image: np.ndarray,
    mask: np.ndarray,
    classes: np.ndarray | None,
    rgb: np.ndarray | None,
    palette=None,
    *,
    max_side: int = MAX_SIDE,
) -> Image.Image:
    """The preview of one result; a panel the model did not give is left out.

    ``image`` uint8 HxWx3, ``mask`` bool HxW (True = missing), ``classes`` uint8 HxW,
    ``rgb`` uint8 HxWx3; ``palette`` K RGB triples (the legend shows classes 0..K-1).
    """
    h, w = mask.shape
    size = _fit(h, w, max_side)
    panels = [("input, holes striped", _marked_input(image, mask, size))]
    if classes is not None:
        panels.append(("class map", _class_panel(classes, palette, size)))
    if rgb is not None:
        panels.append(("inpainted", Image.fromarray(rgb).resize((size[1], size[0]), Image.BOX)))
    width = sum(p.width for _, p in panels) + GAP * (len(panels) + 1)
    legend = _legend(palette, width) if classes is not None and palette else None
    top = GAP + TITLE
    height = top + size[0] + GAP + (legend.height if legend else 0)
    out = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(out)
    font = _font(13)
    x = GAP
    for title, p in panels:
        draw.text((x, GAP // 2 + 1), title, fill=(0, 0, 0), font=font)
        out.paste(p, (x, top))
        x += p.width + GAP
    if legend:
        out.paste(legend, (0, top + size[0] + GAP // 2))
    return out


def write_preview(
    path: str | os.PathLike,
    image: np.ndarray,
    mask: np.ndarray,
    classes: np.ndarray | None,
    rgb: np.ndarray | None,
    palette=None,
    *,
    max_side: int = MAX_SIDE,
) -> Path:
    """`make_preview`, written atomically to ``path`` (like every output)."""
    path = Path(path)
    # compress_level 6: a preview is written once and looked at often; size beats speed here.
    sheet = make_preview(image, mask, classes, rgb, palette, max_side=max_side)
    write_png_atomic(np.asarray(sheet.convert("RGB")), path, compress_level=6)
    return path


_PRED = tuple(output_suffixes(f)["pred"] for f in OUTPUT_FORMATS)
_INPAINTED = tuple(output_suffixes(f)["inpainted"] for f in OUTPUT_FORMATS)


def preview_path(output: str | os.PathLike) -> Path:
    """``a/NAME.pred.png`` or ``a/NAME.inpainted.png`` (or ``.tif``) -> ``a/NAME.preview.png``."""
    p = Path(output)
    for suffix in _PRED + _INPAINTED:
        if p.name.endswith(suffix):
            return p.with_name(p.name[: -len(suffix)] + ".preview.png")
    raise ValueError(f"not a tilerun output name: {p.name}")


def write_previews(files, items, *, mask_dir=None, palette=None, max_side: int = MAX_SIDE) -> list[Path]:
    """Previews for the finished inputs of a job, from the input and the outputs as written;
    also for inputs a resumed run skipped, when their preview is missing (a rerun with --preview).

    Runs after the job on the process that wrote the outputs (rank 0), one image at a
    time, so it needs nothing from the scheduler and shows exactly what is on disk.
    ``files``: the job's `runner.FileResult` list; ``items``: its `images.InputItem` list.
    """
    from .errors import InputImageError
    from .images import load_image

    by_key = {it.key: it for it in items}
    written = []
    for f in files:
        outputs = [o for o in f.outputs if o.endswith(_PRED + _INPAINTED)]
        if not outputs or f.input not in by_key or f.status not in ("ok", "skipped"):
            continue
        target = preview_path(outputs[0])
        if f.status == "skipped" and target.exists():  # resumed: done earlier, preview included
            continue
        try:
            image, mask = load_image(by_key[f.input], mask_dir=mask_dir)
            classes = rgb = None
            pal = palette
            for out in outputs:
                with Image.open(out) as im:
                    if out.endswith(_PRED):
                        classes = np.asarray(im)
                        if pal is None and im.getpalette():
                            flat = im.getpalette()
                            pal = [tuple(flat[i : i + 3]) for i in range(0, 3 * (int(classes.max(initial=0)) + 1), 3)]
                    elif out.endswith(_INPAINTED):
                        rgb = np.asarray(im.convert("RGB"))
            written.append(write_preview(target, image, mask, classes, rgb, pal, max_side=max_side))
        except (InputImageError, OSError) as e:  # a preview is a convenience: its failure costs only itself
            log.error("%s: no preview: %s", f.input, e)
    return written
