"""Measuring a model's receptive field and stride by probing it.

Nothing here trusts a declared number: the halo the engine uses comes from
gradients of the model's own outputs, so a model that grows a layer, or one
brought by the user, still tiles exactly.

* **Radius**: the gradient of (randomly weighted) output pixels with respect to
  the input is nonzero exactly on the pixels that influence them. The union over a
  few random inputs, with holes at several densities, guards against a ReLU that
  happens to be dead for one input and against paths a model opens only where much
  is missing. Once the stride s is known, the radius is that of a whole aligned
  s x s block measured from its edges: every phase of the stride is covered.
* **Stride**: the smallest shift s (1, 2, 4, ...) under which the model is
  translation-equivariant: ``f(shift(x, s)) == shift(f(x), s)`` away from borders.
  Tile origins must be multiples of it.
* Not tile-exact (the engine then runs whole images): a model whose output pixel
  depends on inputs at every distance we try (global pooling, attention), one with
  no such stride (positional inputs), or one whose stride grid moves with the image
  size (padding at the top/left).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from .geometry import round_up

__all__ = ["Receptive", "measure_radius", "measure_stride", "grid_anchored", "probe_model", "ModelProbe",
           "probe_cached", "cache_dir"]

Fn = Callable[[Tensor, Tensor], Tensor]

MAX_PROBE = 1024  # largest probe side; a radius beyond ~half of it counts as unbounded
HOLE_DENSITIES = (0.0, 0.3, 0.9)  # share of missing pixels in probe trial t (cycled)


@dataclass(frozen=True)
class Receptive:
    radius: int | None  # None: unbounded (not tile-exact)
    stride: int

    @property
    def halo(self) -> int | None:
        """The radius rounded up to the stride: the smallest exact halo."""
        return None if self.radius is None else round_up(self.radius, self.stride)


def _influence(fn: Fn, size: int, cell: int, seed: int, trials: int, block: int = 1) -> tuple[int, int, int, int] | None:
    """Bounding box (y0, y1, x0, x1, inclusive) of inputs influencing the ``block`` x ``block``
    output cells from (cell, cell)."""
    g = torch.Generator().manual_seed(seed)
    box = None
    for t in range(trials):
        image = torch.rand(1, 3, size, size, generator=g, dtype=torch.float64).requires_grad_(True)
        # Holes at several densities: paths through the mask channel count too, and a model
        # may gate a path on how much is known nearby (TileNet's pre-fill reaches its widest
        # scale only where the finer ones see < 30% known pixels): a path no probe input opens
        # is a receptive field the halo misses.
        density = HOLE_DENSITIES[t % len(HOLE_DENSITIES)]
        mask = (torch.rand(1, 1, size, size, generator=g, dtype=torch.float64) < density).double()
        mask.requires_grad_(True)
        out = fn(image, mask)
        outs = [o for o in out if o is not None] if isinstance(out, (tuple, list)) else [out]
        sl = slice(cell, cell + block)
        total = sum((o[0, :, sl, sl] * torch.randn(o.shape[1], block, block, generator=g, dtype=o.dtype)).sum() for o in outs)
        if not isinstance(total, Tensor) or not total.requires_grad:
            continue  # the output does not depend on the input at all (autograd.grad would raise)
        grads = torch.autograd.grad(total, [image, mask], allow_unused=True)
        hit = torch.zeros(size, size, dtype=torch.bool)
        for gr in grads:
            if gr is not None:
                hit |= gr[0].abs().amax(0) > 0
        ys, xs = torch.nonzero(hit, as_tuple=True)
        if len(ys) == 0:
            continue
        b = (int(ys.min()), int(ys.max()), int(xs.min()), int(xs.max()))
        box = b if box is None else (min(box[0], b[0]), max(box[1], b[1]), min(box[2], b[2]), max(box[3], b[3]))
    return box


def measure_radius(
    fn: Fn, *, stride: int = 1, out_stride: int = 1, trials: int = 3, start: int = 64, block: int = 1
) -> int | None:
    """Largest distance (pixels) from an output footprint to an input that influences it.

    ``fn(image, mask)`` returns a tensor (or tuple of tensors) at ``out_stride``
    relative to the input. The footprint is ``block`` x ``block`` output cells starting
    on the ``stride`` grid. The probe grows until the influence stops short of its
    border; ``None`` if it never does (unbounded receptive field).
    """
    size = start
    while size <= MAX_PROBE:
        size = round_up(size, 2 * stride * out_stride)
        cell = size // 2 // out_stride  # centre cell in output coordinates
        box = _influence(fn, size, cell, seed=size, trials=trials, block=block)
        if box is None:
            return 0
        y0, y1, x0, x1 = box
        if y0 > 0 and x0 > 0 and y1 < size - 1 and x1 < size - 1:
            lo, hi = cell * out_stride, (cell + block) * out_stride - 1  # the cells' input footprint
            return max(lo - y0, y1 - hi, lo - x0, x1 - hi, 0)
        size *= 2
    return None


def measure_stride(fn: Fn, *, radius: int, max_stride: int = 32) -> int:
    """Smallest shift under which ``fn`` is translation-equivariant (its alignment stride)."""
    g = torch.Generator().manual_seed(7)
    margin = radius + max_stride
    size = round_up(2 * margin + 64, max_stride)
    image = torch.rand(1, 3, size + max_stride, size + max_stride, generator=g, dtype=torch.float64)
    mask = (torch.rand(1, 1, size + max_stride, size + max_stride, generator=g, dtype=torch.float64) > 0.8).double()

    def first(out):
        if isinstance(out, (tuple, list)):
            return next(o for o in out if o is not None)
        return out

    with torch.no_grad():
        ref = first(fn(image[..., :size, :size], mask[..., :size, :size]))
        s = 1
        while s <= max_stride:
            out = first(fn(image[..., s : s + size, s : s + size], mask[..., s : s + size, s : s + size]))
            # Interior of the shifted output equals the reference interior moved by s.
            a = ref[..., margin + s : size - margin, margin + s : size - margin]
            b = out[..., margin : size - margin - s, margin : size - margin - s]
            if torch.allclose(a, b, atol=1e-9, rtol=1e-7):
                return s
            s *= 2
    raise ValueError(f"model is not translation-equivariant for any stride up to {max_stride}")


def _first(out):
    if isinstance(out, (tuple, list)):
        return next(o for o in out if o is not None)
    return out


def grid_anchored(fn: Fn, *, radius: int, stride: int) -> bool:
    """Whether ``fn``'s stride grid starts at the top-left pixel whatever the image size.

    Tiles are cut on a grid counted from the image's top-left corner, and a tile on the
    bottom or right edge ends where the image ends, at any size. A model that pads to
    its stride at the bottom/right keeps that grid; one that centres its padding (or pads
    the top/left) moves it with the image size, so a tile, being of another size than
    the image, would see another grid. Checked by cropping 1 and stride-1 pixels off the
    bottom/right: the interior must not change.
    """
    if stride == 1:
        return True
    g = torch.Generator().manual_seed(11)
    margin = radius + 2 * stride
    size = round_up(2 * margin + 16, stride)
    image = torch.rand(1, 3, size, size, generator=g, dtype=torch.float64)
    mask = (torch.rand(1, 1, size, size, generator=g, dtype=torch.float64) > 0.8).double()
    with torch.no_grad():
        ref = _first(fn(image, mask))[..., margin : size - margin, margin : size - margin]
        for k in sorted({1, stride - 1}):
            out = _first(fn(image[..., : size - k, : size - k], mask[..., : size - k, : size - k]))
            if not torch.allclose(out[..., margin : size - margin, margin : size - margin], ref, atol=1e-9, rtol=1e-7):
                return False
    return True


@dataclass(frozen=True)
class ModelProbe:
    """What the engine needs to know about a model, all measured."""

    stride: int
    radius: int | None  # of the full forward (with global sums fixed, if the model has the hook)
    global_radius: int | None  # of global_terms, when the model has the global hook
    has_global: bool

    @property
    def halo(self) -> int | None:
        return None if self.radius is None else round_up(self.radius, self.stride)

    @property
    def global_halo(self) -> int | None:
        return None if self.global_radius is None else round_up(self.global_radius, self.stride)

    @property
    def tile_exact(self) -> bool:
        return self.radius is not None and (not self.has_global or self.global_radius is not None)


def has_global_hook(model: torch.nn.Module) -> bool:
    return callable(getattr(model, "global_terms", None))


def probe_model(model: torch.nn.Module, *, trials: int = 3) -> ModelProbe:
    """Measure stride and receptive fields of ``model`` on CPU in float64 (a copy; the model is untouched)."""
    import copy

    m = copy.deepcopy(model).to("cpu", torch.float64).eval()
    hook = has_global_hook(m)
    if hook:
        # Fix the global sums so that only the local receptive field shows.
        with torch.no_grad():
            terms = m.global_terms(torch.rand(1, 3, 32, 32, dtype=torch.float64), torch.zeros(1, 1, 32, 32, dtype=torch.float64))
        fixed = terms.sum(dim=(2, 3))

        def fwd(image, mask):
            return m(image, mask, global_sums=fixed.expand(image.shape[0], -1))

        # The terms' stride is the ratio of input to output size.
        term_stride = 32 // terms.shape[-1]
    else:
        fwd = m
    with torch.enable_grad():
        radius = measure_radius(fwd, trials=trials)
    try:
        stride = measure_stride(fwd, radius=radius) if radius is not None else 1
    except ValueError:
        # No shift (power of 2 up to 32) leaves it translation-equivariant: positional
        # encodings, coordinate channels, an odd stride. No tiling reproduces it; whole images do.
        return ModelProbe(stride=1, radius=None, global_radius=None, has_global=hook)
    global_radius = None
    if hook:
        with torch.enable_grad():
            global_radius = measure_radius(m.global_terms, stride=stride, out_stride=term_stride, trials=trials)
        stride = max(stride, term_stride)
    if radius is not None and stride > 1:
        # The halo must cover every pixel of a core, and a core starts on the stride grid: pixel
        # y0 + j sits j further from its window's edge than y0, and a model whose pixels reach
        # differently by phase (bilinear or transposed-conv upsampling after a stride-2 conv
        # with TF "same" padding) needs more than one pixel shows. So the radius is the reach
        # of a whole aligned stride x stride block, measured from the block's edges.
        with torch.enable_grad():
            radius = measure_radius(fwd, stride=stride, block=stride, trials=trials, start=2 * radius + 4 * stride + 2)
    if radius is not None and not grid_anchored(fwd, radius=radius, stride=stride):
        radius = None  # not tile-exact: the engine then runs whole images
    return ModelProbe(stride=stride, radius=radius, global_radius=global_radius, has_global=hook)


# -- the probe remembered ---------------------------------------------------------------
# The CLI probes its model every run: 2.9 s of float64 forwards and gradients on this
# project's CPU, more than half of a small job's start-up. A probe is a function of the
# model's bytes and of the code that runs and measures it, so it is kept on disk under a
# hash of both: a changed weight file, any change to tilerun's code or another torch
# version is a new key, and the probe runs again. A model named by an import path has no
# such bytes (its factory's code and arguments can change freely): it is always probed.
CACHE_ENV = "TILERUN_CACHE_DIR"  # where the probes are kept; set to "" to keep none


def cache_dir() -> Path | None:
    """``$TILERUN_CACHE_DIR``, else ``$XDG_CACHE_HOME/tilerun``, else ``~/.cache/tilerun``;
    None when ``TILERUN_CACHE_DIR`` is set empty or there is no home folder."""
    if CACHE_ENV in os.environ:
        return Path(os.environ[CACHE_ENV]) if os.environ[CACHE_ENV] else None
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "tilerun"
    try:
        return Path.home() / ".cache" / "tilerun"
    except RuntimeError:  # no HOME and no passwd entry (some containers): keep nothing
        return None


@functools.cache
def _code_identity() -> str:
    """A hash of tilerun's own source files and torch's version."""
    h = hashlib.sha256(torch.__version__.encode())
    root = Path(__file__).resolve().parent
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def probe_cached(model: torch.nn.Module, identity: str | None, *,
                 announce: Callable[[], None] | None = None) -> tuple[ModelProbe, Path | None]:
    """`probe_model`, or what it measured before for the same ``identity`` (a hash of the
    model's file, see `tilerun.model.model_identity`; None: always probe) and the same
    code. Returns the probe and the cache file it came from (None: measured now). A cache
    that cannot be read or written is skipped: the probe then runs, as without one.
    ``announce()`` is called just before a probe runs (the CLI says why it waits)."""
    measure = announce or (lambda: None)
    folder = cache_dir()
    if identity is None or folder is None:
        measure()
        return probe_model(model), None
    key = hashlib.sha256(f"{identity}\0{_code_identity()}".encode()).hexdigest()[:32]
    path = folder / "probes" / f"{key}.json"
    try:
        fields = json.loads(path.read_text())
        probe = ModelProbe(**fields)
        if isinstance(probe.has_global, bool) and all(
                isinstance(getattr(probe, k), int | None) for k in ("stride", "radius", "global_radius")):
            return probe, path
    except (OSError, ValueError, TypeError):  # absent, unreadable or not a probe: measure
        pass
    measure()
    probe = probe_model(model)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(dataclasses.asdict(probe)))
        os.replace(tmp, path)  # atomic: a concurrent run reads the old file or the new one
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return probe, None
