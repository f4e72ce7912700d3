"""Runs tiles through a model and stitches uint8 cores: exact by construction.

Two passes for a model with the global hook (``global_terms`` + ``forward(...,
global_sums=)``): pass 1 sums every tile core's global terms into the whole-image
sums; pass 2 runs every tile with those sums. A model with only the plain
``model(image, mask)`` contract gets pass 2 alone, still halo-exact.

Which tiles a process computes is the caller's choice: `Engine.global_partials`
and `Engine.compute` take any list of tiles, so the single-process driver
(`infer_image`) and the distributed driver share this code.

Memory: only the window being computed is ever float; results leave as uint8.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import groupby
from typing import Callable, Iterable, Iterator, TypeVar

import numpy as np
import torch
from torch import Tensor, nn

from .defaults import (DEFAULT_BATCH, DEFAULT_PRECISION, DEFAULT_TILE, FEATURE_CACHE_GPU_SHARE, PRECISIONS,
                       default_batch, default_tile)
from .channels import first_extreme
from .dist import _device  # the CLI's resolution of --device, "auto" included
from .geometry import Tile, grid, round_up
from .receptive import ModelProbe, probe_for, takes_context

__all__ = ["Engine", "Partials", "ImageSums", "TileResult", "infer_image", "takes_out_box", "takes_features",
           "DEFAULT_TILE", "DEFAULT_BATCH", "PRECISIONS"]

R = TypeVar("R")

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@contextlib.contextmanager
def _ieee_fp32_convs() -> Iterator[None]:
    """fp32 convolutions in fp32. cuDNN runs them in TF32 by default (10-bit mantissa), and
    windows of other shapes pick other algorithms: tiles would drift from the whole-image
    forward by far more than float rounding."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):  # torch >= 2.9
        before = conv.fp32_precision
        conv.fp32_precision = "ieee"
        try:
            yield
        finally:
            conv.fp32_precision = before
    else:
        before = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32 = before


@functools.cache  # looked up once: _release_free_heap runs every few CPU batches
def _glibc():
    """The C library when it is glibc (for its allocator controls), else None (macOS, musl, Windows)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def _release_free_heap() -> None:
    """Hand memory that glibc keeps after the probe's float64 tensors back to the OS.

    Measured: RSS 343 -> 247 MB after probing TileNet. The probe's peak has passed by
    then, but RSS that stays counts against a big image's memory budget.
    """
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


# The engine trims the heap once every this many CPU batches (all workers together), not
# after every one. A trim hands the windows' freed activations back to the OS and the next
# windows fault them in again, in 4 KB pages (a trim splits the huge ones): after every
# batch that was 15-20% of a 2-worker run's CPU time (2048^2: 2.5 s of system time a run).
# Never trimming let glibc's arenas fragment as a run went on. Measured, infer_image on an
# 8192^2 photo, 2 workers, this constant set per run (python bench/memory.py --sizes 8192
# prints the peak): every batch 102.9 s, peak RSS 1206 MB; every 4th 89.7 s, 1263 MB;
# every 16th 77.8 s, 1304 MB; never 87.7 s, 1499 MB.
TRIM_EVERY_BATCHES = 16
_batches_run = itertools.count(1)


def _after_cpu_batch() -> None:
    """Trim the heap every `TRIM_EVERY_BATCHES` batches (``next`` on a count is atomic under the GIL)."""
    if next(_batches_run) % TRIM_EVERY_BATCHES == 0:
        _release_free_heap()


def takes_out_box(model: nn.Module) -> bool:
    """Whether ``model.forward`` has an ``out_box`` parameter (see `TileNet.forward`)."""
    try:
        return "out_box" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # e.g. a TorchScript module's forward
        return False


def default_feature_cache(device: torch.device) -> int:
    """Bytes of pass-1 features an engine keeps by default: none on CPU, where RAM holds the
    uint8 images (an 8192^2 photo must stay under 1.5 GB); on CUDA a share of the card's
    memory, which tiles leave mostly idle (1024^2 tiles in batches of 8 peak at ~2 GiB),
    and at most half of what is free now: a card other processes already use keeps room
    for them. (Features that do not fit are recomputed, so a smaller budget is only slower.)"""
    if device.type != "cuda":
        return 0
    free, total = torch.cuda.mem_get_info(device)
    return min(total // FEATURE_CACHE_GPU_SHARE, free // 2)


def takes_features(model: nn.Module) -> bool:
    """Whether the model can hand its encoder's features from pass 1 to pass 2: an
    ``encode(image, mask)`` method, and ``features`` parameters on ``global_terms`` and
    ``forward`` (see `TileNet.encode`)."""
    try:
        return (callable(getattr(model, "encode", None))
                and "features" in inspect.signature(model.global_terms).parameters
                and "features" in inspect.signature(model.forward).parameters)
    except (AttributeError, TypeError, ValueError):
        return False


class _FeatureCache:
    """Pass 1's encoder features, kept on the device for pass 2, up to a byte budget.

    Keyed by (image key, the batch's tile indices): a batch finds its features only if
    pass 2 batches its tiles as pass 1 did, in the same process. What does not fit is
    not kept (pass 2 then runs the encoder again), so memory stays within the budget
    whatever the image's size. Entries of an image whose pass 2 went elsewhere (another
    rank claimed it) are dropped once pass 2 of a later image starts here.
    """

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.used = 0
        self._entries: dict[tuple, tuple[tuple[Tensor, ...], int]] = {}  # in the order pass 1 kept them
        self._lock = threading.Lock()  # CPU workers put from their threads

    def put(self, image_key: object, tiles: tuple[int, ...], features: tuple[Tensor, ...]) -> bool:
        size = sum(t.numel() * t.element_size() for t in features)
        with self._lock:
            if self.used + size > self.budget:
                return False
            self._entries[(image_key, tiles)] = (features, size)
            self.used += size
            return True

    def take(self, image_key: object, tiles: tuple[int, ...]) -> tuple[Tensor, ...] | None:
        with self._lock:
            got = self._entries.pop((image_key, tiles), None)
            if got is None:
                return None
            self.used -= got[1]
            return got[0]

    def start_image(self, image_key: object) -> None:
        """Pass 2 of ``image_key`` starts: drop what earlier images kept (never to be taken here)."""
        with self._lock:
            images = list(dict.fromkeys(k[0] for k in self._entries))  # in the order pass 1 kept them
        if image_key in images:
            for key in images[: images.index(image_key)]:
                self.discard(key)

    def discard(self, image_key: object = None) -> None:
        """Drop what ``image_key`` kept (None: everything)."""
        with self._lock:
            for k in [k for k in self._entries if image_key is None or k[0] == image_key]:
                self.used -= self._entries.pop(k)[1]


# A block of a whole-image context's cell sums: its grid (`TileNet.context_grids`), its first
# cell (row, column) there and its sums.
CellBlock = tuple[int, int, int, np.ndarray]


@dataclass
class Partials:
    """Pass 1's sums over some tiles' cores of one image (`Engine.global_partials`): per tile
    index, its float64 global terms; and for a model with a whole-image context, the integer
    cell sums of those cores (`TileNet.context_cells`), a block per core and cell grid. None:
    not computed (the model has no such context)."""

    shape: tuple[int, int]
    terms: dict[int, Tensor]
    cells: list[CellBlock] | None = None


@dataclass
class ImageSums:
    """Pass 1's result for a whole image (`Engine.reduce_partials`): the global sums every
    tile's forward takes, and the whole cell sums its context is filled from (None: the
    engine reads the image for them)."""

    terms: Tensor
    cells: list[np.ndarray] | None = None


@dataclass
class TileResult:
    tile: Tile
    classes: np.ndarray | None  # uint8 [h, w] core, or None if the model gives no logits
    rgb: np.ndarray | None  # uint8 [h, w, 3] core, or None if the model gives no image


def _split_outputs(out) -> tuple[Tensor | None, Tensor | None]:
    """The contract: (logits, rgb), or a lone tensor (3 channels = rgb, else logits)."""
    if isinstance(out, (tuple, list)):
        if len(out) != 2:
            raise TypeError(f"model must return (logits, rgb); got a sequence of {len(out)}")
        return out[0], out[1]
    if isinstance(out, Tensor):
        return (None, out) if out.shape[1] == 3 else (out, None)
    raise TypeError(f"model must return tensors, got {type(out).__name__}")


@dataclass
class _InFlight:
    """A batch whose forward is queued; its uint8 results land in host memory by ``ready``."""

    batch: list[Tile]
    classes: Tensor | None  # uint8 [B, h, w] on the host
    rgb: Tensor | None  # uint8 [B, h, w, 3] on the host
    ready: "torch.cuda.Event | None"  # None on CPU: the results are already there
    cores_only: bool  # the model gave the tiles' cores, not their whole windows

    def results(self) -> Iterator[TileResult]:
        if self.ready is not None:
            self.ready.synchronize()
        cls_u8 = None if self.classes is None else self.classes.numpy()
        rgb_u8 = None if self.rgb is None else self.rgb.numpy()
        for i, t in enumerate(self.batch):
            ys, xs = (slice(None), slice(None)) if self.cores_only else t.core_in_window()
            yield TileResult(
                t,
                None if cls_u8 is None else cls_u8[i, ys, xs],
                None if rgb_u8 is None else rgb_u8[i, ys, xs],
            )


class Engine:
    """A model prepared for tiled inference: probed once, reused for every image.

    ``tile`` and ``batch_size`` default to the measured values for the device kind
    (`tilerun.defaults`). ``precision`` is ``fp32`` (exact), or ``bf16`` / ``fp16``
    autocast (CUDA; ``bf16`` also on CPU): faster, no longer bit-comparable with an
    fp32 whole-image forward. ``channels_last`` (default: on for CPU and for CUDA in
    bf16/fp16) runs convolutions in NHWC, ~1.9x faster for TileNet on CPU; it converts the
    model's weights in place, which changes no result beyond float rounding.
    ``workers`` (CPU) forwards run at once, each on one thread; ``workers`` windows
    are in memory at once (default: torch's intra-op thread count; GPU: 1).
    ``feature_cache``: bytes of pass 1's encoder features kept on the device for pass 2
    of the same tiles (models with `TileNet.encode`'s hook), so that pass 2 does not run
    the encoder again; what does not fit is recomputed. Default: 0 on CPU (its RAM holds
    the uint8 images), a quarter of the GPU's memory on CUDA (`default_feature_cache`).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        tile: int | None = None,
        halo: int | None = None,
        batch_size: int | None = None,
        device: str | torch.device = "cpu",
        probe: ModelProbe | None = None,
        precision: str = DEFAULT_PRECISION,
        channels_last: bool | None = None,
        workers: int | None = None,
        feature_cache: int | None = None,
    ) -> None:
        self.device = torch.device(device)
        if tile is None:
            tile = default_tile(self.device.type)
        if batch_size is None:
            batch_size = default_batch(self.device.type)
        if batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
        if precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if precision == "fp16" and self.device.type != "cuda":
            # CPU autocast to float16 exists but runs slower than fp32 on CPUs without
            # AVX512-FP16 kernels in oneDNN; bf16 is the CPU's reduced precision.
            raise ValueError(f"--precision fp16 needs a CUDA device (got {self.device}); use bf16 or fp32")
        self.precision = precision
        if channels_last is None:
            # Measured: CPU ~1.9x faster in NHWC. H100 (bench/engine_vs_whole.py --device cuda): fp32 tiles ran
            # 1.16-1.18x faster in NCHW; bf16 0.99-1.06x faster in NHWC: NHWC for half precisions.
            channels_last = self.device.type == "cpu" or precision != "fp32"
        self.channels_last = channels_last
        if workers is None:
            # CPU: one single-threaded forward per core beats one forward on all cores,
            # ~1.3x for TileNet on 2 cores (python bench/engine_vs_whole.py): a layer's ops are too small to
            # split well, independent tiles are not. The device queue is the GPU's parallelism.
            workers = torch.get_num_threads() if self.device.type == "cpu" else 1
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers = workers
        self.model = model.eval().to(self.device)
        if channels_last:
            # Weights in NHWC make every convolution pick NHWC (oneDNN / cuDNN), whatever
            # the input's layout, and the activations keep it from layer to layer.
            self.model.to(memory_format=torch.channels_last)
        if probe is None:
            probe, measured = probe_for(model)  # measured once per model and weights (on disk too), then reused
            if measured:
                # The probe's float64 tensors. Not after every Engine: a trim hands back the last
                # image's memory too, which the next one faults in again (python bench/infer_loop.py).
                _release_free_heap()
        self.probe = probe
        stride = self.probe.stride
        if tile < 0 or tile % stride:
            raise ValueError(f"--tile must be 0 (whole image) or a positive multiple of the model stride {stride}, got {tile}")
        self.tile = tile
        if halo is None:
            if not self.probe.tile_exact:
                # Not tile-exact (unbounded local field, or global terms of unbounded reach):
                # only a whole image per forward reproduces it.
                self.tile, halo = 0, 0
            else:
                halo = self.probe.halo
        elif halo < 0:
            raise ValueError(f"--halo must be >= 0, got {halo}")
        self.halo = round_up(halo, stride) if halo else 0
        ghalo = self.probe.global_halo
        self.global_halo = self.halo if ghalo is None else ghalo
        if feature_cache is None:
            feature_cache = default_feature_cache(self.device)
        if feature_cache < 0:
            raise ValueError(f"feature_cache must be >= 0 bytes, got {feature_cache}")
        # Kept features are the pass-2 window's: pass 1 then runs on pass 2's windows (the
        # full halo), its batches grouped as pass 2 groups them. Not with a --halo below the
        # global terms' own reach: pass 1 keeps the halo that makes its sums exact.
        self.keeps_features = (bool(feature_cache) and self.probe.has_global and takes_features(self.model)
                               and self.halo >= self.global_halo)
        if self.keeps_features:
            self.global_halo = self.halo
        self._features = _FeatureCache(feature_cache if self.keeps_features else 0)
        self.batch_size = batch_size
        # A model whose forward takes ``out_box`` computes only the tiles' cores past the
        # layers that need the halo (TileNet: its full-res decoder runs on 1.04x the core's
        # pixels instead of 1.46x at tile 384).
        self.cores_only = takes_out_box(self.model)
        # A model with a whole-image context (TileNet.coarse_context) gets it once per image.
        self.takes_context = takes_context(self.model)
        self._context: tuple[object, Tensor | None] | None = None

    @property
    def stride(self) -> int:
        return self.probe.stride

    @property
    def uses_global(self) -> bool:
        return self.probe.has_global

    def tiles(self, height: int, width: int, *, halo: int | None = None) -> list[Tile]:
        return grid(height, width, tile=self.tile, halo=self.halo if halo is None else halo, stride=self.stride)

    # -- tensors ------------------------------------------------------------------
    def _autocast(self):
        if self.precision == "fp32":
            return _ieee_fp32_convs() if self.device.type == "cuda" else contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=_AUTOCAST_DTYPES[self.precision])

    def _batches(self, tiles: Iterable[Tile], *, cores: bool = False) -> Iterator[list[Tile]]:
        """Consecutive tiles of one window shape, up to batch_size (no padding: padding would change borders).

        ``cores``: also of one core position in the window (one ``out_box`` per forward).
        """
        key = (lambda t: (t.window_shape, t.core_in_window())) if cores else (lambda t: t.window_shape)
        for _, same in groupby(tiles, key=key):
            same = list(same)
            for i in range(0, len(same), self.batch_size):
                yield same[i : i + self.batch_size]

    def _host(self, shape: tuple[int, ...]) -> Tensor:
        """A uint8 host buffer; pinned for CUDA so that copies run asynchronously.

        Pinned blocks come from PyTorch's caching host allocator: a freed block is
        handed out again (reused, no new cudaHostAlloc) once the copies recorded on it
        have finished, so a buffer is never refilled under an in-flight transfer.
        """
        return torch.empty(shape, dtype=torch.uint8, pin_memory=self.device.type == "cuda")

    def _windows(self, image: np.ndarray, mask: np.ndarray,
                 batch: list[Tile]) -> tuple[Tensor, Tensor, Tensor, Tensor, bool, tuple[np.ndarray, np.ndarray]]:
        """The batch's windows on the device: as floats, x [B,3,h,w] in [0,1] (NHWC-strided) and
        m [B,1,h,w]; as they came, uint8 [B,h,w,3] and uint8 0/1 [B,h,w]; whether any pixel of
        them is missing (from the host's copy: no device sync); and the host's uint8 copies.
        ``image`` is a decoded array or a `sources.WindowedImage` (then ``mask`` is its ``.mask``).

        Only uint8 crosses to the device (a quarter of float32's bytes); the float
        conversion happens there.
        """
        h, w = batch[0].window_shape
        imgs = self._host((len(batch), h, w, 3))
        msks = self._host((len(batch), h, w))
        imgs_np, msks_np = imgs.numpy(), msks.numpy()
        read = getattr(image, "read_window", None)  # `sources.WindowedImage`: decodes just this window
        for i, t in enumerate(batch):
            if read is not None:
                imgs_np[i], msks_np[i] = read(t.wy0, t.wy1, t.wx0, t.wx1)
                continue
            imgs_np[i] = image[t.wy0 : t.wy1, t.wx0 : t.wx1]
            msks_np[i] = mask[t.wy0 : t.wy1, t.wx0 : t.wx1]
        holes = bool(msks_np.any())
        cuda = self.device.type == "cuda"
        imgs = imgs.to(self.device, non_blocking=cuda)
        msks = msks.to(self.device, non_blocking=cuda)
        # permute of NHWC data is already channels_last-strided; .float() keeps the strides.
        x = imgs.permute(0, 3, 1, 2).float().div_(255)
        if not self.channels_last:
            x = x.contiguous()
        m = msks[:, None].float()
        return x, m, imgs, msks, holes, (imgs_np, msks_np)

    # -- pass 1 ---------------------------------------------------------------------
    def global_partials(self, image: np.ndarray, mask: np.ndarray, tiles: Iterable[Tile],
                        key: object = None) -> Partials:
        """Pass 1 over ``tiles``: per tile index, the float64 sum of the global terms over that
        tile's core; and for a model with a whole-image context, the cell sums of those cores,
        from the windows pass 1 reads anyway: no process reads the whole image for its context.

        ``key`` (any hashable naming this image, given again to `compute`): keep the
        encoder's features for pass 2 as far as ``feature_cache`` allows.
        """
        h, w = mask.shape
        out = Partials((h, w), {})
        # Pass 1 needs only the encoder's (smaller) halo, unless its features are kept for pass 2.
        gtiles = {t.index: t for t in grid(h, w, tile=self.tile, halo=self.global_halo, stride=self.stride)}
        s = self.stride
        cells = self.takes_context and callable(getattr(self.model, "context_cells", None))

        def run(batch: list[Tile]) -> tuple[list[tuple[int, Tensor]], list[CellBlock]]:
            x, m, *_, (imgs, msks) = self._windows(image, mask, batch)
            with self._autocast():
                if self.keeps_features:
                    features = self.model.encode(x, m)
                    terms = self.model.global_terms(x, m, features=features)
                    if key is not None:
                        self._features.put(key, tuple(t.index for t in batch), features)
                else:
                    terms = self.model.global_terms(x, m)
            rows, blocks = [], []
            for i, t in enumerate(batch):
                ys, xs = t.core_in_window_at(s)
                rows.append((t.index, terms[i, :, ys, xs].double().sum(dim=(1, 2))))
                if cells:  # on the host's copy, while the device runs the forward
                    ys, xs = t.core_in_window()
                    sums = self.model.context_cells(imgs[i, ys, xs], msks[i, ys, xs].view(bool), t.y0, t.x0)
                    blocks += [(g, r, c, a) for g, (r, c, a) in enumerate(sums)]
            return rows, blocks

        batches = self._batches([gtiles[t.index] for t in tiles], cores=self.keeps_features and self.cores_only)
        done = list(self._map_batches(run, batches))
        rows = [row for r, _ in done for row in r]
        if rows:
            # One device->host copy at the end: a copy per batch would make the host wait
            # for every batch before queueing the next.
            for (index, _), row in zip(rows, torch.stack([r for _, r in rows]).cpu()):
                out.terms[index] = row
        if cells:
            out.cells = [b for _, blocks in done for b in blocks]
        return out

    def reduce_partials(self, partials: Partials | Iterable[Partials]) -> ImageSums:
        """Whole-image sums from the `Partials` of every tile: the global terms added in tile
        order, so that every process gets the same bits; the cell sums (whole numbers) in any."""
        parts = [partials] if isinstance(partials, Partials) else list(partials)
        terms = {k: v for p in parts for k, v in p.terms.items()}
        sums = ImageSums(torch.stack([terms[k] for k in sorted(terms)]).sum(0))
        if parts and all(p.cells is not None for p in parts) and self.takes_context:
            # uint16 holds a whole cell's sum (`TileNet.context_cells`); the blocks cover disjoint pixels.
            grids = [np.zeros(shape, np.uint16) for shape in self.model.context_grids(*parts[0].shape)]
            for p in parts:
                for g, r, c, a in p.cells:
                    grids[g][:, r : r + a.shape[1], c : c + a.shape[2]] += a
            sums.cells = grids
        return sums

    # -- pass 2 ---------------------------------------------------------------------
    def release_features(self, key: object = None) -> None:
        """Drop the features pass 1 kept for image ``key`` (None: for every image)."""
        self._features.discard(key)

    def context(self, image: np.ndarray, mask: np.ndarray, key: object = None,
                cells: list[np.ndarray] | None = None) -> Tensor | None:
        """The model's whole-image context on the device (None without one), kept for ``key``.

        Filled from pass 1's whole cell sums ``cells`` (`ImageSums.cells`), or without them
        from the whole image: integers, then fixed float64 operations, so every process and
        every chunk of an image gets the same bits either way.
        """
        if not self.takes_context:
            return None
        # ``==``: each claim of a spread image brings its own (job, image) tuple.
        if key is None or self._context is None or self._context[0] != key:
            if cells:
                ctx = self.model.context_of_cells(cells, *mask.shape)
            else:
                ctx = self.model.coarse_context(image, mask)
            if isinstance(ctx, tuple):
                ctx = tuple(t.to(self.device) for t in ctx)
            elif ctx is not None:
                ctx = ctx.to(self.device)
            self._context = (key, ctx)
        return self._context[1]

    def _launch(self, image: np.ndarray, mask: np.ndarray, batch: list[Tile], global_sums: Tensor | None,
                key: object = None, context: Tensor | None = None) -> _InFlight:
        """Queue one batch's forward and the copies of its uint8 results to the host.

        ``global_sums`` is already float32 on the device: a blocking copy here would
        synchronise the stream once a batch and empty the pipeline.
        """
        x, m, img_u8, msk_u8, holes, _ = self._windows(image, mask, batch)
        kwargs = {}
        if global_sums is not None:
            kwargs["global_sums"] = global_sums[None].expand(len(batch), -1)
        out_box = None
        if self.cores_only:
            ys, xs = batch[0].core_in_window()
            kwargs["out_box"] = out_box = (ys.start, ys.stop, xs.start, xs.stop)
        if context is not None:
            kwargs["context"], kwargs["origin"] = context, [(t.wy0, t.wx0) for t in batch]
        if key is not None:
            features = self._features.take(key, tuple(t.index for t in batch))
            if features is not None:
                kwargs["features"] = features
        with self._autocast():
            out = self.model(x, m, **kwargs)
        logits, rgb = _split_outputs(out)
        cuda = self.device.type == "cuda"
        cls_h = rgb_h = None
        if logits is not None:
            cls_d = first_extreme(logits, largest=True).to(torch.uint8)
            cls_h = self._host(tuple(cls_d.shape)).copy_(cls_d, non_blocking=cuda)
        if rgb is not None:
            if out_box is not None:
                y0, y1, x0, x1 = out_box
                img_u8, msk_u8 = img_u8[:, y0:y1, x0:x1], msk_u8[:, y0:y1, x0:x1]
            if not holes:
                # Nothing missing: the output is the input's bytes, so the model's colours
                # need no conversion or merge (on CPU, most of the engine's own time per
                # pixel with a cheap model: python bench/scale_out.py).
                rgb_d = img_u8
            else:
                # Known pixels are the input's bytes, exactly (whatever the model's float round
                # trip did to them); only holes take the model's colours. Here rather than on the
                # host: numpy's boolean indexing took ~70 ms a 1024^2 tile, which on a GPU was
                # most of the run (python bench/engine_vs_whole.py --device cuda).
                rgb_d = rgb.float().clamp_(0, 1).mul_(255).round_().to(torch.uint8).permute(0, 2, 3, 1)
                rgb_d = torch.where(msk_u8[..., None].bool(), rgb_d, img_u8)
            rgb_h = rgb_d if self.device.type == "cpu" else self._host(tuple(rgb_d.shape)).copy_(rgb_d, non_blocking=cuda)
        ready = None
        if cuda:
            ready = torch.cuda.Event()
            ready.record()
        else:
            # The window's activations are free now; glibc keeps them in the worker threads'
            # arenas until a trim (see TRIM_EVERY_BATCHES).
            del x, m, out, logits, rgb, img_u8, msk_u8
            _after_cpu_batch()
        return _InFlight(batch, cls_h, rgb_h, ready, out_box is not None)

    def compute(
        self, image: np.ndarray, mask: np.ndarray, tiles: Iterable[Tile], global_sums: ImageSums | None = None,
        key: object = None,
    ) -> Iterator[TileResult]:
        """Run ``tiles`` and yield their uint8 cores (known pixels of the RGB copied from ``image``).

        ``global_sums``: the image's, from `reduce_partials`. A model with the global hook may
        go without them only when one tile covers the whole image: its forward then sums the
        whole image itself.
        Batches run ahead of the caller (see `_map_batches`): on CUDA the next batch
        is queued before this one's results are handed out, so the device keeps
        working while the caller stitches or encodes. ``key``: as given to
        `global_partials`, to use the features it kept.
        """
        tiles = list(tiles)
        h, w = mask.shape
        whole = len(tiles) == 1 and (tiles[0].y0, tiles[0].y1, tiles[0].x0, tiles[0].x1) == (0, h, 0, w)
        if self.uses_global and global_sums is None and not whole:
            raise ValueError("this model needs the whole-image global sums: run global_partials first")
        terms = None if global_sums is None else global_sums.terms.to(self.device, torch.float32)
        if key is not None:
            self._features.start_image(key)
        batches = self._batches(tiles, cores=self.cores_only)
        context = self.context(image, mask, key, None if global_sums is None else global_sums.cells)
        for launched in self._map_batches(lambda b: self._launch(image, mask, b, terms, key, context), batches):
            yield from launched.results()

    def _map_batches(self, fn: Callable[[list[Tile]], R], batches: Iterable[list[Tile]]) -> Iterator[R]:
        """``fn`` over ``batches``, results in order, a bounded number of batches ahead.

        One worker (GPU): ``fn`` queues device work, so running the next batch's ``fn``
        before handing out this one's result keeps the device busy while the caller
        stitches. Several (CPU): ``workers`` threads, one intra-op thread each, at most
        ``workers`` batches in flight (memory: that many windows).
        """
        batches = list(batches)  # a few Tile lists: cheap, and the count decides the path
        if self.workers == 1 or len(batches) == 1:
            # One batch (a caller handing out work a chunk at a time): all intra-op threads on it.
            pending: list[R] = []
            for batch in batches:
                with torch.inference_mode():
                    pending.append(fn(batch))
                if len(pending) > 1:
                    yield pending.pop(0)
            yield from pending
            return

        def run(batch: list[Tile]) -> R:
            with torch.inference_mode():  # thread-local, like autocast: entered in the worker
                return fn(batch)

        threads = torch.get_num_threads()
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="tilerun-cpu", initializer=torch.set_num_threads, initargs=(1,))
        inflight: deque[Future] = deque()
        try:
            for batch in batches:
                if len(inflight) >= self.workers:
                    yield inflight.popleft().result()
                inflight.append(pool.submit(run, batch))
            while inflight:
                yield inflight.popleft().result()
        finally:
            for f in inflight:
                f.cancel()
            pool.shutdown(wait=True)
            torch.set_num_threads(threads)  # the workers' setting is process-wide; give the caller its own back

    @property
    def tiles_per_call(self) -> int:
        """Tiles a `compute` / `global_partials` call should get to keep every worker busy.

        A call with a single batch runs it on all intra-op threads instead; a
        distributed driver that hands out chunks should make them this size.
        """
        return self.batch_size * self.workers

    def needs_global_pass(self, height: int, width: int) -> bool:
        """Whether pass 1 is needed: the model has the global hook and the image is more than one tile."""
        return self.uses_global and len(self.tiles(height, width)) > 1


def check_image(image: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be a uint8 HxWx3 array, got {image.dtype} {image.shape}")
    if mask is None:
        return np.zeros(image.shape[:2], dtype=bool)
    mask = np.asarray(mask)
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask must be HxW = {image.shape[:2]}, got {mask.shape}")
    return mask.astype(bool, copy=False)


class Stitcher:
    """uint8 output arrays filled core by core (the cores tile the image, so every pixel is written)."""

    def __init__(self, height: int, width: int) -> None:
        self.classes: np.ndarray | None = None
        self.rgb: np.ndarray | None = None
        self._shape = (height, width)

    def add(self, r: TileResult) -> None:
        t = r.tile
        if r.classes is not None:
            if self.classes is None:
                self.classes = np.zeros(self._shape, np.uint8)
            self.classes[t.y0 : t.y1, t.x0 : t.x1] = r.classes
        if r.rgb is not None:
            if self.rgb is None:
                self.rgb = np.empty((*self._shape, 3), np.uint8)
            self.rgb[t.y0 : t.y1, t.x0 : t.x1] = r.rgb


def infer_image(
    model: nn.Module | Engine,
    image: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    tile: int | None = None,
    halo: int | None = None,
    batch_size: int | None = None,
    device: str | torch.device = "auto",
    precision: str = DEFAULT_PRECISION,
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Tiled inference of one image: ``(class_map uint8 [H,W], inpainted uint8 [H,W,3])``.

    ``image`` is uint8 HxWx3, ``mask`` bool HxW (True = missing). ``device`` as the CLI's
    ``--device``: ``auto`` is CUDA when available, else the CPU; the model is moved there.
    The model's probe is measured once and reused by later calls while its weights stay the
    same (`tilerun.receptive.probe_for`). An `Engine` may be passed instead of a model (then
    the other keyword arguments are ignored). An output the model does not give is None.
    """
    if isinstance(model, Engine):
        engine = model
    else:
        engine = Engine(model, tile=tile, halo=halo, batch_size=batch_size, device=_device(str(device), 0),
                        precision=precision)
    mask = check_image(image, mask)
    image = np.ascontiguousarray(image)
    h, w = mask.shape
    tiles = engine.tiles(h, w)
    key = object()  # this call's image, for the features pass 1 keeps
    try:
        # One tile is the whole image: its own forward sums the global terms, pass 1 would be wasted.
        sums = None
        if engine.needs_global_pass(h, w):
            sums = engine.reduce_partials(engine.global_partials(image, mask, tiles, key=key))
        st = Stitcher(h, w)
        for r in engine.compute(image, mask, tiles, sums, key=key):
            st.add(r)
    finally:
        engine.release_features(key)
    return st.classes, st.rgb
