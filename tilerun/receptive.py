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
import inspect
import json
import logging
import os
import sys
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from .geometry import round_up

__all__ = ["Receptive", "measure_radius", "measure_stride", "grid_anchored", "probe_model", "ModelProbe",
           "probe_cached", "probe_for", "reproduces", "cache_dir"]

log = logging.getLogger("tilerun")

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


def takes_context(model: torch.nn.Module) -> bool:
    """Whether ``model`` takes a whole-image context (`TileNet.coarse_context`): a
    ``coarse_context(image, mask)`` method and ``context`` and ``origin`` parameters on forward."""
    if not callable(getattr(model, "coarse_context", None)):
        return False
    params = inspect.signature(model.forward).parameters
    return "context" in params and "origin" in params


def _probe_forms(model: torch.nn.Module) -> tuple[Fn, Fn | None, int]:
    """A float64 CPU copy of ``model`` as the probes call it: its forward (with the global sums
    fixed when it has the hook, so that only the local receptive field shows), its
    ``global_terms`` (None without the hook) and the terms' stride. The model is untouched."""
    import copy

    m = copy.deepcopy(model).to("cpu", torch.float64).eval()
    # A whole-image context is an input like the global sums: fixed (the model's own context of
    # one grey pixel), so that only the local receptive field shows.
    ctx = {}
    if takes_context(m):
        grey = m.coarse_context(np.full((1, 1, 3), 128, np.uint8), None)
        if grey is not None:
            ctx = {"context": tuple(t.double() for t in grey) if isinstance(grey, tuple) else grey.double()}
    if not has_global_hook(m):
        return (lambda image, mask: m(image, mask, **ctx)) if ctx else m, None, 1
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        terms = m.global_terms(torch.rand(1, 3, 32, 32, generator=g, dtype=torch.float64),
                               torch.zeros(1, 1, 32, 32, dtype=torch.float64))
    fixed = terms.sum(dim=(2, 3))

    def fwd(image, mask):
        return m(image, mask, global_sums=fixed.expand(image.shape[0], -1), **ctx)

    return fwd, m.global_terms, 32 // terms.shape[-1]  # the terms' stride: input over output size


def probe_model(model: torch.nn.Module, *, trials: int = 3) -> ModelProbe:
    """Measure stride and receptive fields of ``model`` on CPU in float64 (a copy; the model is untouched)."""
    fwd, global_terms, term_stride = _probe_forms(model)
    hook = global_terms is not None
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
            global_radius = measure_radius(global_terms, stride=stride, out_stride=term_stride, trials=trials)
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
# version is a new key, and the probe runs again. The library's entry points (`Engine`,
# `infer_image`) take a model object: `probe_for` keys it by its weights, structure and
# source code (`_model_key`, `_code_key`).
CACHE_ENV = "TILERUN_CACHE_DIR"  # where the probes are kept; set to "" to keep none
_FIELDS = frozenset(f.name for f in dataclasses.fields(ModelProbe))
MAX_STRIDE = 32  # measure_stride's largest shift


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


def _implausible(probe: ModelProbe, model: torch.nn.Module) -> str | None:
    """Why ``probe`` cannot be what `probe_model` measures for ``model``; None if it can."""

    def bad_length(v) -> bool:
        return v is not None and (type(v) is not int or not 0 <= v < MAX_PROBE)

    s = probe.stride
    if type(s) is not int or s < 1 or s > MAX_STRIDE or s & (s - 1):
        return f"stride {s!r} is not a power of two up to {MAX_STRIDE}"
    if bad_length(probe.radius) or bad_length(probe.global_radius):
        return f"radius {probe.radius!r} / global radius {probe.global_radius!r} not None or 0..{MAX_PROBE - 1}"
    if type(probe.has_global) is not bool or probe.has_global != has_global_hook(model):
        return f"has_global {probe.has_global!r}, but the model {'has' if has_global_hook(model) else 'has no'} global_terms"
    if not probe.has_global and probe.global_radius is not None:
        return "a global radius for a model without global_terms"
    return None


def reproduces(model: torch.nn.Module, probe: ModelProbe) -> bool:
    """Whether a window cut ``probe.stride`` pixels in from an image's top-left and bottom-right,
    keeping ``probe``'s halos, gives what the whole image gives on its core (float64, random
    images with holes at each of HOLE_DENSITIES): a cheap check that catches a halo or
    stride too small for ``model`` (a radius too large only costs time). A probe that is not
    tile-exact has nothing to check: whole images are exact.

    Every entry read from disk passes it: checksums and ownership stop edits and other
    users, not a plausible value under a key that missed a change (code an in-memory model
    calls from outside its package). For the default model it costs a tenth of the probe
    it saves (`python bench/probe_check.py`: 2.27 s vs 23.2 s on this loaded machine)."""
    if not probe.tile_exact:
        return True
    fwd, global_terms, term_stride = _probe_forms(model)
    s = probe.stride
    checks = [(fwd, probe.halo, 1)]
    if global_terms is not None:
        checks.append((global_terms, probe.global_halo, term_stride))
    # A core of two stride cells (every phase); 64 px at least, as the probe's smallest canvas.
    size = max(64, round_up(2 * (max(h for _, h, _ in checks) + s) + 2 * s, 2 * s))
    g = torch.Generator().manual_seed(13)
    image = torch.rand(len(HOLE_DENSITIES), 3, size, size, generator=g, dtype=torch.float64)
    density = torch.tensor(HOLE_DENSITIES, dtype=torch.float64)[:, None, None, None]
    mask = (torch.rand(len(HOLE_DENSITIES), 1, size, size, generator=g, dtype=torch.float64) < density).double()
    window = (..., slice(s, size - s), slice(s, size - s))
    with torch.no_grad():
        for fn, halo, out_stride in checks:
            whole, part = _first(fn(image, mask)), _first(fn(image[window], mask[window]))
            a, b, c = (s + halo) // out_stride, (size - s - halo) // out_stride, halo // out_stride
            if not torch.allclose(part[..., c : c + b - a, c : c + b - a], whole[..., a:b, a:b], atol=1e-9, rtol=1e-7):
                return False
    return True


def _checksum(fields: dict, key: str) -> str:
    return hashlib.sha256(json.dumps({**fields, "key": key}, sort_keys=True).encode()).hexdigest()


def _read_entry(path: Path, key: str, model: torch.nn.Module) -> tuple[ModelProbe | None, str | None]:
    """The probe kept at ``path`` and None, or None and why it is not taken (None: no entry).

    An entry is trusted only if this user owns it and no one else can write it (the folder
    may be shared: XDG_CACHE_HOME, TILERUN_CACHE_DIR), its checksum over its fields and key
    holds (a hand-edited, truncated or moved entry fails), its values are ones `probe_model`
    can give, and `reproduces` confirms its halo on the model."""
    try:
        st = path.stat()
        if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
            return None, f"owned by uid {st.st_uid}, not by this user (uid {os.geteuid()})"
        if st.st_mode & 0o022:
            return None, f"writable by others (mode {st.st_mode & 0o777:o})"
        entry = json.loads(path.read_text())
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError) as e:  # unreadable, or not JSON
        return None, f"unreadable ({type(e).__name__}: {e})"
    if not isinstance(entry, dict) or set(entry) != _FIELDS | {"key", "check"}:
        return None, "not a probe entry"
    fields = {k: entry[k] for k in _FIELDS}
    if entry["check"] != _checksum(fields, entry["key"]):
        return None, "checksum mismatch (edited or damaged)"
    if entry["key"] != key:
        return None, "the entry of another model or code (moved or copied)"
    probe = ModelProbe(**fields)
    if why := _implausible(probe, model):
        return None, why
    if not reproduces(model, probe):
        return None, f"halo {probe.halo} / stride {probe.stride} does not reproduce the model's whole-image output"
    return probe, None


def _write_entry(path: Path, key: str, probe: ModelProbe, model: torch.nn.Module) -> None:
    if _implausible(probe, model):  # a stride the checks would refuse (global terms at an odd stride)
        return
    fields = dataclasses.asdict(probe)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # 0o644 whatever the umask allows beyond it: a group-writable entry (umask 002) is not trusted.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        with os.fdopen(fd, "w") as f:
            json.dump({**fields, "key": key, "check": _checksum(fields, key)}, f)
        os.replace(tmp, path)  # atomic: a concurrent run reads the old file or the new one
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def probe_cached(model: torch.nn.Module, identity: str | None, *,
                 announce: Callable[[], None] | None = None) -> tuple[ModelProbe, Path | None]:
    """`probe_model`, or what it measured before for the same ``identity`` (a hash of the
    model's file, see `tilerun.model.model_identity`, or of a model object, see `probe_for`;
    None: always probe) and the same code. Returns the probe and the cache file it came from
    (None: measured now). A cache that cannot be read or written is skipped: the probe then
    runs, as without one. An entry that fails `_read_entry`'s checks is discarded with one
    warning, measured again and rewritten. ``announce()`` is called just before a probe
    runs (the CLI says why it waits)."""
    measure = announce or (lambda: None)
    folder = cache_dir()
    if identity is None or folder is None:
        measure()
        return probe_model(model), None
    key = hashlib.sha256(f"{identity}\0{_code_identity()}".encode()).hexdigest()[:32]
    path = folder / "probes" / f"{key}.json"
    probe, why = _read_entry(path, key, model)
    if probe is not None:
        return probe, path
    if why is not None:
        log.warning("probe cache %s: %s; measuring the model again", path, why)
    measure()
    probe = probe_model(model)
    _write_entry(path, key, probe, model)
    return probe, None


# -- one probe per model object ----------------------------------------------------------
# `infer_image(model, image)` builds an Engine per call; without this each call would probe
# again (seconds a photo). A model object keeps its probe for as long as its weights
# and structure hash the same (`_model_key`); another process finds it on disk when the
# model's code is known too (`_code_key`). bench/infer_loop.py: the loop vs one Engine.
_probes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (model key, fingerprint, probe)
_probes_lock = threading.Lock()
# Below this many bytes of parameters and buffers (TileNet: 1.2 MiB) every call hashes every
# byte, whatever wrote them. Above it, sha256's ~1 GB/s would cost each call more than its
# forwards: the bytes are hashed again only when a tensor is replaced or its version
# counter moves (an optimizer step, load_state_dict, an in-place op under no_grad), not on
# a write through ``.data``, which bumps no counter.
HASH_EVERY_CALL_BYTES = 64 * 2**20


def _tensor_bytes(t: Tensor) -> np.ndarray:
    """``t``'s values in logical (row-major) order on the host: the same for a copy on
    another device or in another memory format (the Engine makes weights channels_last).
    Reordered by numpy, on this thread: torch's copy starts a parallel kernel per tensor,
    which on a loaded machine made the key cost more than a small photo's inference."""
    t = t.detach().to("cpu")
    try:
        a = t.numpy()
    except TypeError:  # no numpy dtype (bfloat16, float8): the same bits as integers
        a = t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]).numpy()
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8)


def _plain(v) -> str | None:
    """A stable text for a config value (numbers, strings, their containers, dataclasses);
    None for anything else (its repr could hold a memory address)."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return repr(v)
    if isinstance(v, (tuple, list)):
        parts = [_plain(x) for x in v]
        return None if None in parts else f"{type(v).__name__}({', '.join(parts)})"
    if isinstance(v, dict):
        parts = [(_plain(k), _plain(x)) for k, x in v.items()]
        return None if any(None in p for p in parts) else "{" + ", ".join(f"{k}: {x}" for k, x in sorted(parts)) + "}"
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return _plain(dataclasses.asdict(v))
    return None


def _structure_key(model: torch.nn.Module) -> bytes:
    """Every submodule's name, class and plain attributes (`_plain`; not ``training``: the
    probe runs in eval mode), and tensors held as plain attributes."""
    h = hashlib.sha256()
    for name, sub in model.named_modules(remove_duplicate=False):
        cls = type(sub)
        h.update(f"\0{name}\0{cls.__module__}.{cls.__qualname__}".encode())
        for k, v in sorted(vars(sub).items()):
            if k.startswith("_") or k == "training":
                continue
            if isinstance(v, Tensor):
                h.update(f"\0{k}\0{v.dtype}{tuple(v.shape)}".encode())
                h.update(_tensor_bytes(v))
            elif (text := _plain(v)) is not None:
                h.update(f"\0{k}={text}".encode())
    return h.digest()


def _tensors(model: torch.nn.Module) -> list[tuple[str, Tensor]]:
    # Buffers outside the state dict (persistent=False) shape the output too.
    return [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]


def _fingerprint(tensors: list[tuple[str, Tensor]]) -> tuple:
    return tuple((n, t.data_ptr(), t._version, t.dtype, tuple(t.shape), t.device) for n, t in tensors)


def _model_key(model: torch.nn.Module, before: tuple[str, tuple] | None) -> tuple[str, tuple | None]:
    """A hash of ``model``'s tensors (values, names, dtypes, shapes) and structure, and the
    fingerprint it was computed at when the model is big (`HASH_EVERY_CALL_BYTES`).
    ``before``: the key and fingerprint of the last call, reused while the fingerprint holds."""
    tensors = _tensors(model)
    big = sum(t.numel() * t.element_size() for _, t in tensors) > HASH_EVERY_CALL_BYTES
    fingerprint = _fingerprint(tensors) if big else None
    if big and before is not None and before[1] == fingerprint:
        weights = before[0].partition(":")[0]
    else:
        h = hashlib.sha256()
        for name, t in tensors:
            h.update(f"\0{name}\0{t.dtype}{tuple(t.shape)}".encode())
            h.update(_tensor_bytes(t))
        weights = h.hexdigest()
    return f"{weights}:{_structure_key(model).hex()}", fingerprint


@functools.cache
def _file_digest(path: Path, mtime_ns: int, size: int) -> bytes:
    return hashlib.sha256(path.read_bytes()).digest()


def _source_key(module_name: str) -> str | None:
    """A hash of the source files of the package (or lone module) that defines a class
    (None: no file, such as a class defined in a notebook or at a prompt). The whole package,
    not the one file: a model's forward calls helpers from its neighbours. Each file is read
    once per process and again when its size or modification time changes (an edited and
    reloaded module)."""
    top = module_name.partition(".")[0]
    mod = sys.modules.get(top)
    if mod is None:
        return None
    if roots := [Path(p) for p in getattr(mod, "__path__", [])]:
        files = sorted((f.relative_to(r).as_posix(), f) for r in roots for f in r.rglob("*.py"))
    elif getattr(mod, "__file__", None):
        files = [(Path(mod.__file__).name, Path(mod.__file__))]
    else:
        return None
    h = hashlib.sha256(top.encode())
    try:
        for name, f in files:
            st = f.stat()
            h.update(f"\0{name}\0".encode() + _file_digest(f, st.st_mtime_ns, st.st_size))
    except OSError:
        return None
    return h.hexdigest()


def _code_key(model: torch.nn.Module) -> str | None:
    """A hash of the code ``model`` runs beyond tilerun's and torch's own (both in every
    key already): the source of the packages defining its classes (`_source_key`), and the
    compiled code of TorchScript and torch.fx / torch.export graphs. None if some of it
    cannot be known: the probe is then kept on the model object only, not on disk."""
    h = hashlib.sha256()
    for sub in model.modules():
        if isinstance(sub, torch.jit.ScriptModule):
            try:  # every compiled method, not only forward: forward calls them
                for name in sub._c._method_names():
                    h.update(sub._c._get_method(name).code.encode())
            except (AttributeError, RuntimeError):  # a torch without these (private) accessors
                return None
            continue
        if isinstance(sub, torch.fx.GraphModule):
            h.update(sub.code.encode())
        for cls in type(sub).__mro__:
            top = cls.__module__.partition(".")[0]
            if top in ("builtins", "torch", "tilerun") or cls.__module__ == "typing":
                continue
            key = _source_key(cls.__module__)
            if key is None:
                return None
            h.update(key.encode())
    return h.hexdigest()


def probe_for(model: torch.nn.Module) -> tuple[ModelProbe, bool]:
    """``model``'s probe and whether it was measured now (not remembered), once per model
    object and state of its weights: kept on the object (`_model_key`: changed weights or
    layers measure it again) and on disk under its code too (`probe_cached`; not when that
    code cannot be known, see `_code_key`)."""
    with _probes_lock:  # one probe at a time: a second thread waits for the first one's result
        before = _probes.get(model)
        key, fingerprint = _model_key(model, before and (before[0], before[1]))
        if before is not None and before[0] == key:
            return before[2], False
        code = _code_key(model)
        identity = None if code is None else hashlib.sha256(f"model-object\0{key}\0{code}".encode()).hexdigest()
        probe, kept = probe_cached(model, identity)
        _probes[model] = (key, fingerprint, probe)
        return probe, kept is None
