"""What tilerun knows about a model, all of it measured: ``tilerun inspect [MODEL]``; and what
`tilerun run` will read of an input: ``tilerun inspect INPUT`` (`inspect_input`).

* **Architecture**: the top-level submodules and their parameter counts.
* **Outputs**: K (the number of classes) and RGB, from one small forward (the contract check).
* **Stride and receptive field**: `receptive.probe_model` (shift probe, gradient probe).
* **Memory per tile**: the peak of live tensor storage during one forward of one tile
  window at the default tile size (the tile plus its halo on every side), batch 1.
  On CUDA it is ``torch.cuda.max_memory_allocated``. Elsewhere a dispatch mode sees every
  tensor an operator returns and counts its storage until the storage is freed, so the
  peak is that of activations (weights and the input window are not included; torch's
  allocator overhead is not either). It is measured, not estimated from layer shapes,
  so it holds for TorchScript and exported programs too.
* **Tile-exact**: a small random image with random holes, tiled with a small tile,
  compared bit for bit with one whole-image forward through `infer_image`.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .defaults import DEFAULT_BATCH, DEFAULT_TILE
from .geometry import round_up
from .receptive import ModelProbe, probe_for

__all__ = ["InspectReport", "ExactCheck", "inspect_model", "format_report", "peak_forward_bytes", "check_tile_exact",
           "InputReport", "inspect_input", "format_input_report", "is_input"]


@dataclass(frozen=True)
class ExactCheck:
    height: int
    width: int
    tile: int
    halo: int
    tiles: int
    differing_classes: float | None  # fraction of pixels whose class differs from the whole-image forward
    differing_rgb: float | None  # fraction of pixels whose inpainted colour differs

    @property
    def exact(self) -> bool:
        return not self.differing_classes and not self.differing_rgb


@dataclass
class InspectReport:
    source: str
    model_type: str
    modules: list[tuple[str, str, int]]  # (name, type, parameters) of the top-level submodules
    parameters: int
    parameter_bytes: int
    classes: int | None
    rgb: bool
    palette: list[tuple[int, int, int]] | None
    probe: ModelProbe
    tile: int  # the default tile the memory figure is for (0: whole image)
    batch_size: int
    window: int  # side of one tile window (tile + 2 halo); for tile 0, the side measured
    memory_bytes: int | None  # peak activation memory of one window, batch 1
    memory_method: str
    exact: ExactCheck
    default_tile: int = DEFAULT_TILE  # tilerun's default for the device measured on
    feature_bytes: int | None = None  # encoder features pass 1 keeps for pass 2, one window (None: no hook)
    feature_cache: int = 0  # the engine's default budget for them on the device measured on
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    context: str | None = None  # the whole-image coarse context (`coarse_context_summary`), if the model has one


class _PeakStorage(TorchDispatchMode):
    """Live bytes of the storages operators return, and their peak (see module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._seen: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key, nbytes = storage.data_ptr(), storage.nbytes()
                if nbytes == 0 or key in self._seen:  # views share their base's storage
                    continue
                self._seen.add(key)
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._free, key, nbytes)
        return out


def peak_forward_bytes(model: nn.Module, side: int, *, device: str | torch.device = "cpu",
                       halo: int = 0) -> tuple[int, str]:
    """Peak memory of one forward of ``model`` on a ``side`` x ``side`` window, batch 1: (bytes, how).

    As the engine runs it: a model that takes ``out_box`` is asked for the core only.
    """
    from .engine import takes_out_box

    kwargs = {"out_box": (halo, side - halo, halo, side - halo)} if halo and takes_out_box(model) else {}
    device = torch.device(device)
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, side, side, generator=g).to(device)
    mask = (torch.rand(1, 1, side, side, generator=g) > 0.7).float().to(device)
    with torch.inference_mode():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            out = model(image, mask, **kwargs)
            torch.cuda.synchronize(device)
            del out
            return torch.cuda.max_memory_allocated(device) - base, "torch.cuda.max_memory_allocated"
        mode = _PeakStorage()
        with mode:
            out = model(image, mask, **kwargs)
        del out
        return mode.peak, "peak of live tensor storage during the forward (dispatch mode)"


def check_tile_exact(model: nn.Module, probe: ModelProbe, *, seed: int = 0) -> ExactCheck:
    """Tiled vs whole-image `infer_image` on a small random image with holes.

    The tile is small (a few stride multiples) so that the image has interior tiles,
    edge tiles and corner tiles; the sizes are odd so that border padding is exercised.
    A model without a bounded receptive field is tiled with a halo of 16 px (rounded to
    its stride) to show how far from exact tiles would be.
    """
    from .engine import Engine, infer_image

    s = probe.stride
    tile = round_up(32, s)
    halo = probe.halo if probe.halo is not None else round_up(16, s)
    h, w = 2 * tile + s + 3, 3 * tile - s + 1
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    mask = rng.random((h, w)) < 0.3
    mask[h // 3 : h // 2, w // 4 : w // 2] = True  # and one bigger hole across tile seams
    tiled = Engine(model, tile=tile, halo=halo, batch_size=DEFAULT_BATCH, probe=probe)
    whole = Engine(model, tile=0, halo=0, batch_size=1, probe=probe)
    a = infer_image(tiled, image, mask)
    b = infer_image(whole, image, mask)

    def frac(x, y):
        if x is None or y is None:
            return None
        d = x != y
        return float((d.any(axis=2) if d.ndim == 3 else d).mean())

    return ExactCheck(h, w, tile, halo, len(tiled.tiles(h, w)), frac(a[0], b[0]), frac(a[1], b[1]))


def _modules(model: nn.Module) -> list[tuple[str, str, int]]:
    from .model.loading import ExportedModel

    root = model.graph if isinstance(model, ExportedModel) else model
    rows = []
    for name, child in root.named_children():
        if name.startswith("_"):  # export's own helpers (_guards_fn), not the model's
            continue
        kind = getattr(child, "original_name", None) or type(child).__name__  # TorchScript keeps the class name there
        rows.append((name, kind, sum(p.numel() for p in child.parameters())))
    return rows


def inspect_model(
    model: nn.Module,
    *,
    source: str = "",
    tile: int | None = None,
    batch_size: int | None = None,
    device: str | torch.device = "cpu",
    memory: bool = True,
) -> InspectReport:
    """Measure everything `format_report` prints. Takes seconds (the probes and one
    full-size forward); ``memory=False`` skips the full-size forward. ``tile`` and
    ``batch_size`` default to tilerun's defaults for ``device``."""
    from .defaults import default_batch, default_tile
    from .engine import default_feature_cache, takes_features
    from .model.loading import check_contract

    kind = torch.device(device).type
    default = default_tile(kind)
    tile = default if tile is None else tile
    batch_size = default_batch(kind) if batch_size is None else batch_size
    t0 = time.perf_counter()
    outputs = check_contract(model)
    probe, _ = probe_for(model)  # the one Engine and infer_image reuse (kept per model, and on disk)
    params = list(model.parameters())
    notes = []
    if not probe.tile_exact:
        tile_used = 0
        window = tile  # whole-image model: report memory for an image of the default tile's size
        notes.append(f"not tile-exact: each image runs whole; memory below is for one {tile}x{tile} image")
    else:
        if tile % probe.stride:
            notes.append(f"--tile {tile} is not a multiple of the stride {probe.stride}; using {round_up(tile, probe.stride)}")
            tile = round_up(tile, probe.stride)
        tile_used = tile
        window = tile + 2 * probe.halo
    mem, how = (None, "skipped")
    if memory:
        dev_model = model.to(device) if torch.device(device).type != "cpu" else model
        mem, how = peak_forward_bytes(dev_model, window, device=device, halo=probe.halo if tile_used else 0)
    feature_bytes = None
    if tile_used and probe.has_global and takes_features(model):
        side = torch.zeros(1, 1, window, window)
        with torch.inference_mode():
            feats = model.to("cpu").encode(side.expand(1, 3, -1, -1), side)
        feature_bytes = sum(t.numel() * t.element_size() for t in feats)
    exact = check_tile_exact(model.to("cpu"), probe)
    context = coarse_context_summary(model)
    return InspectReport(
        source=source or type(model).__name__,
        model_type=getattr(model, "original_name", None) or type(model).__name__,
        modules=_modules(model),
        parameters=sum(p.numel() for p in params),
        parameter_bytes=sum(p.numel() * p.element_size() for p in params),
        classes=outputs.classes,
        rgb=outputs.rgb,
        palette=[tuple(int(v) for v in c) for c in getattr(model, "palette", None) or []] or None,
        probe=probe,
        tile=tile_used,
        batch_size=batch_size,
        window=window,
        memory_bytes=mem,
        memory_method=how,
        exact=exact,
        default_tile=default,
        feature_bytes=feature_bytes,
        feature_cache=default_feature_cache(torch.device(device)),
        seconds=time.perf_counter() - t0,
        notes=notes,
        context=context,
    )


def coarse_context_summary(model: torch.nn.Module, *, side: int = 2048) -> str | None:
    """Scale, size and cost of a model's whole-image coarse context (TileNet's ``coarse_scale``),
    measured on a ``side`` x ``side`` image with a hole; None without one."""
    from .receptive import takes_context

    cfg = getattr(model, "cfg", None)
    scale = getattr(cfg, "coarse_scale", 0)
    if not takes_context(model) or not scale:
        return None
    image = np.zeros((side, side, 3), np.uint8)
    mask = np.zeros((side, side), bool)
    mask[side // 4 : side // 2, side // 4 : side // 2] = True
    t = time.perf_counter()
    ctx = model.coarse_context(image, mask)
    ms = 1000 * (time.perf_counter() - t)
    parts = ctx if isinstance(ctx, tuple) else (ctx,)
    cells = parts[0].shape[-2:]
    size = _mb(sum(p.numel() * p.element_size() for p in parts))
    classes = ""
    if len(parts) > 1:
        c = parts[1].shape[-2:]
        classes = (f" and {parts[1].shape[1]} class shares in {c[0]}x{c[1]} cells of {cfg.class_scale} px"
                   " (the class prior's far field)")
    return (f"1/{scale} scale, {cells[0]}x{cells[1]} cells{classes} ({size} float64) for a {side}x{side} image, "
            f"{ms:.0f} ms once per image and process; the pre-fill's far field "
            f"({'biharmonic' if getattr(cfg, 'coarse_biharmonic', False) else 'harmonic'} fill), exact under tiling")


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _swatch(rgb: tuple[int, int, int], color: bool) -> str:
    if color:
        r, g, b = rgb
        return f"\x1b[48;2;{r};{g};{b}m    \x1b[0m"
    return "#%02x%02x%02x" % tuple(rgb)


_LABEL = 17


def _label(text: str) -> str:
    return f"{text:<{_LABEL}}"


def format_report(r: InspectReport, *, color: bool = False) -> str:
    """The report as text; ``color``: palette swatches as 24-bit ANSI colour (for a terminal)."""
    p = r.probe
    lines = [f"{_label('model')}{r.source} ({r.model_type})"]
    lines.append(f"{_label('parameters')}{r.parameters:,} ({_mb(r.parameter_bytes)})")
    width = max((len(n) for n, _, _ in r.modules), default=0)
    for name, kind, n in r.modules:
        lines.append(f"  {name:<{width}}  {kind:<20} {n:>10,}")
    outs = []
    if r.classes is not None:
        outs.append(f"class map, K = {r.classes}")
    if r.rgb:
        outs.append("inpainted RGB")
    lines.append(f"{_label('outputs')}{', '.join(outs)}")
    if r.palette:
        lines.append("palette")
        cells = [f"  {i:>3} {_swatch(c, color)}" for i, c in enumerate(r.palette)]
        for i in range(0, len(cells), 8):
            lines.append("".join(cells[i : i + 8]))
    lines.append(f"{_label('stride')}{p.stride} px (measured: smallest shift the model is equivariant to)")
    if p.radius is None:
        lines.append(f"{_label('receptive field')}unbounded (measured: influence reached every probe border up to 1024 px)")
    else:
        lines.append(f"{_label('receptive field')}radius {p.radius} px (measured by gradient probe) -> halo {p.halo} px")
    if p.has_global:
        gr = "unbounded" if p.global_radius is None else f"radius {p.global_radius} px -> pass-1 halo {p.global_halo} px"
        lines.append(f"{_label('global branch')}yes (global_terms: {gr}); two passes, whole-image sums shared by all tiles")
    else:
        lines.append(f"{_label('global branch')}no (one pass)")
    if r.context:
        lines.append(f"{_label('coarse context')}{r.context}")
    if r.tile:
        which = "the default, tilerun/defaults.py" if r.tile == r.default_tile else f"--tile; the default is {r.default_tile}"
        lines.append(f"{_label('tile')}{r.tile} px ({which}) -> window {r.window}x{r.window} px, "
                     f"{r.batch_size} tile{'s' if r.batch_size != 1 else ''} per forward")
    else:
        lines.append(f"{_label('tile')}whole image (model not tile-exact; the default --tile would be {r.window})")
    if r.memory_bytes is not None:
        per = f"per {r.window}x{r.window} window" if r.tile else f"per {r.window}x{r.window} image"
        lines.append(f"{_label('memory per tile')}{_mb(r.memory_bytes)} {per}, batch 1 "
                     f"(~{_mb(r.memory_bytes * r.batch_size)} at batch {r.batch_size}); {r.memory_method}")
    if r.feature_bytes is not None:
        budget = f"{_mb(r.feature_cache)} by default here" if r.feature_cache else "off by default on CPU"
        lines.append(f"{_label('feature cache')}pass 1 keeps {_mb(r.feature_bytes)} of encoder features per window "
                     f"for pass 2, which then skips the encoder; {budget} (--feature-cache)")
    e = r.exact
    diffs = ", ".join(
        f"{name} differ on {v:.2%} of pixels" for name, v in (("classes", e.differing_classes), ("colours", e.differing_rgb))
        if v
    )
    verdict = "yes" if e.exact and p.tile_exact else "NO"
    detail = (f"{e.height}x{e.width} random image with holes, {e.tiles} tiles of {e.tile} px + halo {e.halo}: "
              + ("identical to one whole-image forward" if e.exact else diffs))
    lines.append(f"{_label('tile-exact')}{verdict} ({detail})")
    if not p.tile_exact:
        lines.append(" " * _LABEL + "tiles cannot reproduce this model: tilerun runs each whole image in one forward "
                     "(--tile 0); with --halo N and a big --tile it tiles approximately")
    for n in r.notes:
        lines.append(f"{_label('note')}{n}")
    lines.append(f"{_label('measured in')}{r.seconds:.1f} s")
    return "\n".join(lines)


# -- inputs: ``tilerun inspect INPUT`` ------------------------------------------------------------


@dataclass
class InputReport:
    """What `tilerun run` will read of one input (`inspect_input`)."""

    path: str
    format: str
    reader: str  # how run reads it: window by window (and with what), or decoded whole
    levels: list[dict]  # per level: width, height, mpp (µm or None)
    tiling: str
    dtype: str
    bands: str
    value_range: str
    crs: str = "none"
    nodata: str = "none"
    notes: list[str] = field(default_factory=list)


def is_input(path) -> bool:
    """Whether ``tilerun inspect``'s argument names an input (an image, a slide, a zarr folder), not a model."""
    from pathlib import Path

    from .images import IMAGE_EXTENSIONS
    from .sources import SLIDE_EXTENSIONS, ZARR_SUFFIX

    low = Path(path).name.lower()
    return low.endswith((*IMAGE_EXTENSIONS, *SLIDE_EXTENSIONS, ZARR_SUFFIX))


#: Pixels of a level read to give the value range (the smallest level at most this big).
RANGE_PIXELS = 16 * 2**20


def _range_text(arr: np.ndarray, what: str) -> str:
    arr = arr.reshape(-1, arr.shape[-1]) if arr.ndim == 3 else arr.reshape(-1, 1)
    parts = []
    for b in range(arr.shape[1]):
        col = arr[:, b]
        nan = int(np.isnan(col).sum()) if col.dtype.kind == "f" else 0
        finite = col[~np.isnan(col)] if nan else col
        lo, hi = (finite.min(), finite.max()) if finite.size else (np.nan, np.nan)
        parts.append(f"{lo}..{hi}" + (f" ({nan:,} NaN)" if nan else ""))
    return f"{', '.join(parts)} (band by band, {what})"


def _geo(page) -> tuple[str, str]:
    """CRS and nodata from GeoTIFF tags (tifffile's reading of GeoKeyDirectory and GDAL_NODATA)."""
    crs, nodata = "none", "none"
    tags = getattr(page, "geotiff_tags", None) if getattr(page, "is_geotiff", False) else None
    if tags:
        for key in ("ProjectedCSTypeGeoKey", "GeographicTypeGeoKey"):
            v = tags.get(key)
            if v is not None:
                code = int(v.value) if hasattr(v, "value") else int(v)
                crs = f"EPSG:{code}" if code != 32767 else "user-defined"
                break
        else:
            crs = "GeoTIFF tags without an EPSG code"
        if "ModelTiepoint" in tags or "ModelTransformation" in tags:
            crs += " (georeferenced: " + ("tie point + pixel scale" if "ModelTiepoint" in tags else "transformation")
            crs += ")"
    nd = page.tags.get(42113)  # GDAL_NODATA
    if nd is not None:
        nodata = str(nd.value).strip("\x00 ")
    return crs, nodata


def inspect_input(path, *, level: int = 0, mpp: float | None = None) -> InputReport:
    """Describe one input from its headers (and its smallest level's pixels, for the value range)."""
    from pathlib import Path

    from . import sources

    path = Path(path)
    choice = sources.LevelChoice(level, mpp)
    low = path.name.lower()
    if sources.windowed(path):
        src = sources.open_source(path, choice=choice)
        try:
            levels = [{"width": w, "height": h, "mpp": m} for (h, w), m in zip(src.sizes, src.mpps)]
            reader = f"window by window ({src.kind}), level {src.level} ({src.width}x{src.height})"
            crs = nodata = "none"
            notes: list[str] = []
            if isinstance(src, sources.TiffSource):
                page = src._page
                fmt = f"{'BigTIFF' if src._tif.is_bigtiff else 'TIFF'}, {page.compression.name.lower()}"
                fmt += ", pyramidal" if len(src.sizes) > 1 else ""
                tiling = (f"tiles {page.tilewidth}x{page.tilelength}" if page.is_tiled
                          else f"strips of {page.rowsperstrip} rows")
                bands = f"{page.samplesperpixel} ({page.photometric.name.lower()}" + (", last is alpha)" if src.alpha else ")")
                crs, nodata = _geo(src._tif.pages.first)
            elif isinstance(src, sources.SlideSource):
                props = src._slide.properties
                fmt = f"whole slide ({props.get('openslide.vendor', '?')})"
                tiling = f"tiles {props.get('openslide.level[0].tile-width', '?')}x{props.get('openslide.level[0].tile-height', '?')}"
                bands = "4 (RGBA from OpenSlide; alpha 0 outside the scanned area)"
            else:
                fmt = "OME-Zarr" if len(src.sizes) > 1 or src.mpp is not None else "zarr"
                tiling = f"chunks {src.chunk[1]}x{src.chunk[0]} (axes {', '.join(src._axes)})"
                bands = f"{src.samples}" + (" (last is alpha)" if src.alpha else "")
            dtype = str(src.dtype)
            small = min(range(len(src.sizes)), key=lambda i: src.sizes[i][0] * src.sizes[i][1])
            h, w = src.sizes[small]
            if h * w <= RANGE_PIXELS:
                low_src = src if small == src.level else sources.open_source(path, choice=sources.LevelChoice(small))
                value_range = _range_text(low_src.read(0, h, 0, w), f"level {small}")
            else:
                value_range = f"not read (the smallest level has {h * w:,} pixels)"
            if src.dtype not in (np.uint8, np.uint16) or src.samples not in (1, 2, 3, 4):
                notes.append("tilerun reads 8- and 16-bit grey or RGB (+ alpha) window by window today")
        finally:
            src.close()
        return InputReport(str(path), fmt, reader, levels, tiling, dtype, bands, value_range, crs, nodata, notes)
    # Everything else is decoded whole: tifffile for the TIFF layouts it reads, else Pillow.
    from PIL import Image

    from .images import InputItem, image_size

    item = InputItem(path.absolute(), Path(path.name))
    h, w = image_size(item)
    crs = nodata = "none"
    tiling = "none (decoded whole)"
    if low.endswith((".tif", ".tiff")):
        try:
            import tifffile

            with tifffile.TiffFile(path) as tif:
                page = tif.pages.first
                tiling = f"strips of {page.rowsperstrip} rows" if not page.is_tiled else tiling
                crs, nodata = _geo(page)
        except Exception:  # not a TIFF tifffile parses: Pillow's header below says what it is
            pass
    with Image.open(path) as im:
        fmt, mode, bands = im.format, im.mode, len(im.getbands())
        native = np.asarray(im) if h * w <= RANGE_PIXELS else None
    notes: list[str] = []
    value_range = _range_text(native, "the whole image") if native is not None else "not read (over 16 MP)"
    return InputReport(str(path), f"{fmt} (mode {mode})", "decoded whole", [{"width": w, "height": h, "mpp": None}],
                       tiling, str(native.dtype) if native is not None else mode, str(bands), value_range, crs,
                       nodata, notes)


def format_input_report(r: InputReport) -> str:
    lines = [f"{_label('input')}{r.path}", f"{_label('format')}{r.format}", f"{_label('read')}{r.reader}"]
    for i, lv in enumerate(r.levels):
        m = "" if lv["mpp"] is None else f", {lv['mpp']:.4g} µm/px"
        lines.append(f"{_label('level ' + str(i))}{lv['width']}x{lv['height']}{m}")
    lines += [f"{_label('tiling')}{r.tiling}", f"{_label('dtype')}{r.dtype}", f"{_label('bands')}{r.bands}",
              f"{_label('range')}{r.value_range}", f"{_label('CRS')}{r.crs}", f"{_label('nodata')}{r.nodata}"]
    lines += [f"{_label('note')}{n}" for n in r.notes]
    return "\n".join(lines)
