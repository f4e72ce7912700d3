"""Self-supervised training of TileNet: random crops, random holes, colour classes.

The model learns two things from unlabelled photos:

* **classes**: K colour classes found by k-means over the training pixels; the truth of
  a pixel is the palette colour nearest its true colour, everywhere (holes included),
  so the class map is a posterised picture of the image with the holes predicted;
* **inpainting**: L1 between the filled and the true pixels, on the holes only
  (known pixels pass through the model unchanged, so an L1 on them is identically 0).

Under torchrun each process trains a replica on its own batches and
DistributedDataParallel averages the gradients (the design document's "one replica per
server, merged into one model"); without torchrun it is one process.

Exact resume: a batch is a pure function of ``(seed, step, rank)`` and the learning
rate a pure function of ``step``, so a checkpoint needs only the weights, the
optimizer state and the step; there is no data-loader RNG state to carry. Both files
are safetensors (plain tensors + a JSON header): loading them never unpickles code.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from .errors import TilerunError
from .masks import random_mask
from .model import TileNet, TileNetConfig, load_tilenet, read_metadata, save_tilenet
from .model.weights import INIT_SEED

__all__ = [
    "DEFAULT_PREFILL",
    "DEFAULT_PREFILL_ITERATIONS",
    "default_net_config",
    "TrainConfig",
    "TrainResult",
    "TrainingError",
    "load_training_images",
    "kmeans_palette",
    "make_batch",
    "nearest_class",
    "compute_loss",
    "optimizer_path",
    "train",
    "merge",
    "switch",
]

log = logging.getLogger("tilerun")


# The pre-fill of trained models: local means out to a tent of radius 14, then 22 harmonic
# sweeps; the reach (14 + 22 = 36 pixels, +1 for the decoder layer it enters) stays inside
# the network's own 39-pixel receptive field, so it costs no halo. On the held-out photos
# this pre-fill alone beats biharmonic inpainting (python bench/quality.py).
DEFAULT_PREFILL = (1, 3, 7)
DEFAULT_PREFILL_ITERATIONS = 22
# The slope continuation (`TileNetConfig.slope_radii`): the pre-fill's scales, with the weight
# that scored best of 0.4-0.6 on the validation strokes (docs/model.md).
DEFAULT_SLOPE_RADII = (1, 3, 7)
DEFAULT_SLOPE_WEIGHT = 0.4


def default_net_config(classes: int, *, class_prior: bool = True, coarse_scale: int = 0,
                       class_fill: bool = False, slope_fill: bool = False,
                       coarse_biharmonic: bool = False, class_cells: int = 4) -> TileNetConfig:
    """The architecture `tilerun train` trains (and the shipped weights have), for ``classes`` classes;
    ``coarse_scale``: the whole-image coarse context's cell size (0: none); ``class_fill``: the
    class prior from the filled class shares (`TileNetConfig.class_fill`); ``slope_fill``: the
    border's slopes continued into the holes (`TileNetConfig.slope_radii`); ``coarse_biharmonic``:
    the coarse context filled biharmonically (`TileNetConfig.coarse_biharmonic`); ``class_cells``: the
    class shares' cells, in colour cells across (`TileNetConfig.class_cells`)."""
    return TileNetConfig(classes=classes, prefill_radii=DEFAULT_PREFILL,
                         prefill_iterations=DEFAULT_PREFILL_ITERATIONS, class_prior=class_prior,
                         coarse_scale=coarse_scale, class_fill=class_fill,
                         slope_radii=DEFAULT_SLOPE_RADII if slope_fill else (),
                         slope_weight=DEFAULT_SLOPE_WEIGHT if slope_fill else 0.0,
                         coarse_biharmonic=coarse_biharmonic, class_cells=class_cells)


class TrainingError(TilerunError, ValueError):
    """Bad training input, or a checkpoint that cannot be resumed with these settings."""


@dataclass(frozen=True)
class TrainConfig:
    """The recipe. Everything here except ``checkpoint_every`` changes the result."""

    steps: int = 2000
    crop: int = 128
    batch_size: int = 8  # per process
    classes: int = 16
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup: int = 50
    seed: int = 0
    l1_weight: float = 5.0  # hole L1 (in [0,1] units) against the class cross-entropy
    # Hole MSE: what PSNR measures. With L1 alone the residual RGB head hardly moved off the
    # pre-fill in 1500 steps (hole PSNR within 0.02 dB of the pre-fill on held-out photos).
    l2_weight: float = 0.0
    grad_weight: float = 0.0  # L1 of the horizontal/vertical gradients on holes
    # Weight of the RGB correction's idle part in the holes (|correction| where its weight, the
    # local pre-fill's reach, leaves it out): untrained there, it grew to tens of grey levels
    # deep in boxes and showed as a light band where the weight falls (docs/training.md).
    idle_weight: float = 0.0
    max_hole: float = 0.5
    # Share of crops that also get one big hole, a box or a free-form blob 25-70% of the crop
    # across: wider than the network's reach, so that it learns to use the coarse context there.
    big_holes: float = 0.0
    # Beyond the horizontal flip: the 8 rotations/flips of the square crop and, for half the
    # crops, a random order of the RGB channels. On held-out photos the network's gain over its
    # pre-fill was ~0 dB while it was +0.4 dB on new crops of the training photos: it learned
    # the nine training photos, not inpainting.
    augment: bool = False
    # The global features and the coarse context from the whole training picture (with the crop's
    # holes in it) instead of from the crop: inference takes them from the whole image, and a
    # network that knew only a crop's summary drew a light frame inside a big box's border
    # when given a whole picture's (docs/training.md).
    picture_context: bool = False
    kmeans_samples: int = 100_000
    # "bf16": autocast on CPU (AMX) or CUDA; the weights and the optimizer stay fp32.
    precision: str = "fp32"
    checkpoint_every: int = 100

    def __post_init__(self) -> None:
        for name in ("steps", "crop", "batch_size", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise TrainingError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.crop % TileNet.stride:
            raise TrainingError(f"--crop must be a multiple of the model stride {TileNet.stride}, got {self.crop}")
        if not 2 <= self.classes <= 256:
            raise TrainingError(f"--classes must be in 2..256 (an 8-bit palette), got {self.classes}")
        if self.lr <= 0:
            raise TrainingError(f"--lr must be > 0, got {self.lr}")
        if self.precision not in ("fp32", "bf16"):
            raise TrainingError(f"--precision must be fp32 or bf16, got {self.precision!r}")

    def lr_at(self, step: int) -> float:
        """Linear warm-up, then cosine decay to a tenth: a function of the step alone (exact resume)."""
        warm = min(1.0, (step + 1) / max(1, self.warmup))
        return self.lr * warm * (0.1 + 0.45 * (1 + math.cos(math.pi * min(step, self.steps) / self.steps)))

    def recipe(self) -> dict:
        d = asdict(self)
        d.pop("checkpoint_every")
        return d


@dataclass(frozen=True)
class TrainResult:
    path: Path
    steps: int
    last_loss: float
    seconds: float


# -- data ---------------------------------------------------------------------------------
def load_training_images(paths: Sequence[str | os.PathLike], *, exclude: Sequence[str] = (),
                         min_side: int = 1) -> list[tuple[str, np.ndarray]]:
    """``(name, uint8 HxWx3)`` for every image under ``paths`` whose name matches no ``exclude`` glob.

    Images whose short side is under ``min_side`` (the crop) are skipped with a warning.
    """
    from .images import find_inputs, load_image

    out = []
    for root in paths:
        for item in find_inputs(root):
            name = item.path.name
            if any(fnmatch.fnmatch(name, pat) or fnmatch.fnmatch(item.key, pat) for pat in exclude):
                continue
            rgb, _ = load_image(item)
            if min(rgb.shape[:2]) < min_side:
                log.warning("skipping %s: %dx%d is smaller than the %d-pixel crop", item.path, rgb.shape[1],
                            rgb.shape[0], min_side)
                continue
            out.append((item.key, rgb))
    if not out:
        raise TrainingError(f"no training images of at least {min_side}x{min_side} pixels in {', '.join(map(str, paths))}")
    return out


def _with_half_scales(images: list[np.ndarray], crop: int) -> list[np.ndarray]:
    """Add a half-size copy of every image that still holds two crops across: scale augmentation."""
    from PIL import Image

    out = list(images)
    for im in images:
        h, w = im.shape[:2]
        if min(h, w) >= 2 * crop:
            out.append(np.asarray(Image.fromarray(im).resize((w // 2, h // 2), Image.Resampling.BOX)))
    return out


def kmeans_palette(images: Sequence[np.ndarray], k: int, *, seed: int = 0, samples: int = 100_000,
                   iterations: int = 30) -> np.ndarray:
    """K colours (uint8 [k,3], sorted dark to light) by k-means++ and Lloyd over sampled pixels.

    Every image contributes the same number of pixels, so one big photo does not own the palette.
    """
    rng = np.random.default_rng(seed)
    per = max(1, samples // len(images))
    pix = np.concatenate([im.reshape(-1, 3)[rng.integers(0, im.shape[0] * im.shape[1], per)] for im in images])
    pix = pix.astype(np.float32)
    if len(np.unique(pix, axis=0)) < k:
        raise TrainingError(f"--classes {k} is more than the {len(np.unique(pix, axis=0))} distinct training colours")
    centres = [pix[rng.integers(len(pix))]]
    d2 = ((pix - centres[0]) ** 2).sum(1)
    for _ in range(1, k):
        centres.append(pix[rng.choice(len(pix), p=d2 / d2.sum())])
        d2 = np.minimum(d2, ((pix - centres[-1]) ** 2).sum(1))
    c = np.stack(centres)
    for _ in range(iterations):
        lab = _nearest(pix, c)
        for j in range(k):
            sel = pix[lab == j]
            if len(sel):
                c[j] = sel.mean(0)
    c = np.clip(np.round(c), 0, 255).astype(np.uint8)
    return c[np.argsort(c.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32), kind="stable")]


def _nearest(pix: np.ndarray, centres: np.ndarray) -> np.ndarray:
    d = (pix**2).sum(1)[:, None] - 2 * pix @ centres.T + (centres**2).sum(1)[None]
    return d.argmin(1)


def nearest_class(rgb: Tensor, palette: Tensor) -> Tensor:
    """Class index [N,H,W] of the palette colour nearest each pixel; rgb [N,3,H,W] and palette [K,3] in [0,1]."""
    d = ((rgb[:, None] - palette[None, :, :, None, None]) ** 2).sum(2)
    return d.argmin(1)


def make_batch(images: Sequence[np.ndarray], *, step: int, rank: int, cfg: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """Crops uint8 [B,crop,crop,3] and holes bool [B,crop,crop]: a pure function of (seed, step, rank)."""
    rng = np.random.default_rng([cfg.seed, step, rank])
    c = cfg.crop
    imgs = np.empty((cfg.batch_size, c, c, 3), np.uint8)
    masks = np.empty((cfg.batch_size, c, c), bool)
    for b in range(cfg.batch_size):
        im = images[int(rng.integers(len(images)))]
        y = int(rng.integers(0, im.shape[0] - c + 1))
        x = int(rng.integers(0, im.shape[1] - c + 1))
        imgs[b] = _flipped(rng, im[y : y + c, x : x + c], cfg)
        masks[b] = _crop_holes(rng, cfg)
    return imgs, masks


def _flipped(rng: np.random.Generator, a: np.ndarray, cfg: TrainConfig) -> np.ndarray:
    """``a`` mirrored half the time; with ``augment`` also turned and, half the time, recoloured."""
    if rng.random() < 0.5:
        a = a[:, ::-1]
    if cfg.augment:
        a = np.rot90(a, int(rng.integers(4)))
        if rng.random() < 0.5:
            a = a[..., rng.permutation(3)]
    return a


def _crop_holes(rng: np.random.Generator, cfg: TrainConfig) -> np.ndarray:
    """A crop's holes: the training mix, and with ``big_holes`` sometimes one big hole more."""
    mask = random_mask(rng, cfg.crop, cfg.crop, max_coverage=cfg.max_hole)
    if cfg.big_holes and rng.random() < cfg.big_holes:
        mask |= big_hole(rng, cfg.crop)
    return mask


def make_picture_batch(images: Sequence[np.ndarray], *, step: int, rank: int,
                       cfg: TrainConfig) -> tuple[np.ndarray, np.ndarray, list[np.ndarray], list[tuple[int, int]]]:
    """`make_batch` for ``picture_context``: the crops, their holes, and per crop its whole picture
    (flipped, turned and its channels permuted with it) and the crop's (y, x) in it. A pure
    function of (seed, step, rank), drawn from its own stream."""
    rng = np.random.default_rng([cfg.seed, step, rank, 1])
    c = cfg.crop
    imgs = np.empty((cfg.batch_size, c, c, 3), np.uint8)
    masks = np.empty((cfg.batch_size, c, c), bool)
    pictures, origins = [], []
    for b in range(cfg.batch_size):
        pic = np.ascontiguousarray(_flipped(rng, images[int(rng.integers(len(images)))], cfg))
        y = int(rng.integers(0, pic.shape[0] - c + 1))
        x = int(rng.integers(0, pic.shape[1] - c + 1))
        imgs[b] = pic[y : y + c, x : x + c]
        masks[b] = _crop_holes(rng, cfg)
        pictures.append(pic)
        origins.append((y, x))
    return imgs, masks, pictures, origins


def picture_inputs(net: TileNet, pictures: list[np.ndarray], masks: np.ndarray, origins: list[tuple[int, int]],
                   device: torch.device) -> dict:
    """``forward``'s keywords that give each crop its whole picture's global sums and coarse
    context, as the engine gives a tile its image's (no gradient flows through them)."""
    c = masks.shape[-1]
    sums, contexts = [], []
    with torch.no_grad():
        for pic, hole, (y, x) in zip(pictures, masks, origins):
            full = np.zeros(pic.shape[:2], bool)
            full[y : y + c, x : x + c] = hole
            t = torch.tensor(pic, device=device).permute(2, 0, 1)[None].float().div_(255)
            sums.append(net.global_terms(t, torch.from_numpy(full).to(device)[None, None].float()).sum(dim=(2, 3)))
            if net.cfg.coarse_scale:
                ctx = net.coarse_context(pic, full)
                contexts.append(ctx if isinstance(ctx, tuple) else (ctx,))
    kw: dict = {"global_sums": torch.cat(sums), "origin": list(origins)}
    if contexts:
        # One batch: each picture's cells padded to the largest grid by repeating its last row and
        # column, which is what `far_field` reads past a grid's edge anyway.
        parts = []
        for k in range(len(contexts[0])):
            hc = max(ctx[k].shape[-2] for ctx in contexts)
            wc = max(ctx[k].shape[-1] for ctx in contexts)
            parts.append(torch.cat([F.pad(ctx[k], (0, wc - ctx[k].shape[-1], 0, hc - ctx[k].shape[-2]), mode="replicate")
                                    for ctx in contexts]))
        kw["context"] = tuple(parts) if len(parts) > 1 else parts[0]
    return kw


def big_hole(rng: np.random.Generator, side: int) -> np.ndarray:
    """One box, or one free-form blob (a union of a few overlapping ellipses), 25-70% of ``side`` across."""
    size = rng.uniform(0.25, 0.7) * side
    yy, xx = np.mgrid[:side, :side]
    cy, cx = rng.uniform(size / 2, side - size / 2, 2)
    if rng.random() < 0.5:
        return (np.abs(yy - cy) <= size / 2) & (np.abs(xx - cx) <= size / 2)
    hole = np.zeros((side, side), bool)
    for _ in range(int(rng.integers(2, 5))):
        ry, rx = rng.uniform(0.2, 0.5, 2) * size
        oy, ox = rng.uniform(-0.25, 0.25, 2) * size
        hole |= ((yy - cy - oy) / ry) ** 2 + ((xx - cx - ox) / rx) ** 2 <= 1
    return hole


def compute_loss(model, image: Tensor, mask: Tensor, palette: Tensor, cfg: TrainConfig,
                 **forward: object) -> tuple[Tensor, dict[str, float]]:
    """Cross-entropy on the colour classes everywhere + weighted L1 (and MSE) on the holes;
    ``forward``: more keywords for the model (`picture_inputs`)."""
    terms: dict[str, Tensor] | None = {} if cfg.idle_weight else None  # the idle part only when weighted
    logits, rgb = model(image, mask, terms=terms, **forward)
    ce = F.cross_entropy(logits, nearest_class(image, palette))
    holes = mask.expand_as(rgb)
    n = holes.sum().clamp_min(1)
    l1 = ((rgb - image).abs() * holes).sum() / n
    loss = ce + cfg.l1_weight * l1
    parts = {"ce": ce.item(), "l1": l1.item()}
    if cfg.l2_weight:
        l2 = ((rgb - image).square() * holes).sum() / n
        loss = loss + cfg.l2_weight * l2
        parts["l2"] = l2.item()
    if cfg.grad_weight:
        # Gradients of the error, counted where either pixel of the pair is a hole.
        err = rgb - image
        gx = (err[..., :, 1:] - err[..., :, :-1]).abs() * torch.maximum(holes[..., :, 1:], holes[..., :, :-1])
        gy = (err[..., 1:, :] - err[..., :-1, :]).abs() * torch.maximum(holes[..., 1:, :], holes[..., :-1, :])
        grad = (gx.sum() + gy.sum()) / (2 * n)
        loss = loss + cfg.grad_weight * grad
        parts["grad"] = grad.item()
    if terms and "idle_correction" in terms:
        idle = terms["idle_correction"]
        loss = loss + cfg.idle_weight * idle
        parts["idle"] = idle.item()
    parts["loss"] = loss.item()
    return loss, parts


# -- checkpoints ----------------------------------------------------------------------------
def optimizer_path(out: str | os.PathLike) -> Path:
    """The optimizer state beside ``out``: model.safetensors -> model.optim.safetensors."""
    out = Path(out)
    return out.with_name(out.name.removesuffix(".safetensors") + ".optim.safetensors")


def _save_optimizer(opt: torch.optim.Optimizer, path: Path, step: int) -> None:
    sd = opt.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for key, value in st.items():
            t = value if isinstance(value, Tensor) else torch.tensor(value)
            tensors[f"{idx}.{key}"] = t.detach().contiguous().cpu()
    groups = [{k: v for k, v in g.items()} for g in sd["param_groups"]]
    meta = {"format": "tilerun.optimizer/1", "step": str(step), "param_groups": json.dumps(groups)}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)


def _load_optimizer(opt: torch.optim.Optimizer, path: Path, step: int, device: torch.device) -> None:
    try:
        meta = read_metadata(path)
        tensors = load_file(str(path), device=str(device))
    except (SafetensorError, OSError, TilerunError) as e:
        raise TrainingError(f"{path}: cannot read the optimizer state to resume ({e})") from e
    if meta.get("format") != "tilerun.optimizer/1" or meta.get("step") != str(step):
        raise TrainingError(f"{path}: optimizer state is for step {meta.get('step')}, the weights for step {step}; "
                            "the checkpoint pair is inconsistent (rerun without --resume)")
    state: dict[int, dict[str, Tensor]] = {}
    for key, t in tensors.items():
        idx, name = key.split(".", 1)
        # Adam keeps `step` on the CPU (torch's default for capturable=False).
        state.setdefault(int(idx), {})[name] = t.cpu() if name == "step" else t
    opt.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})


def _resume_state(out: Path, cfg: TrainConfig, net_cfg: TileNetConfig) -> tuple[int, dict]:
    """(step, metadata) of the checkpoint at ``out``, checked against this run's recipe."""
    meta = read_metadata(out)
    try:
        train_meta = json.loads(meta["training"])
        step = int(train_meta["step"])
        saved_cfg = TileNetConfig.from_dict(json.loads(meta["config"]))
    except (KeyError, TypeError, ValueError) as e:
        raise TrainingError(f"{out}: not a tilerun training checkpoint ({e})") from e
    if saved_cfg != net_cfg:
        raise TrainingError(f"{out}: checkpoint architecture {saved_cfg} differs from {net_cfg}")
    diff = {k: (v, cfg.recipe()[k]) for k, v in train_meta["recipe"].items() if cfg.recipe().get(k) != v}
    if diff:
        pretty = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise TrainingError(f"{out}: --resume needs the checkpoint's recipe; differs in {pretty}")
    return step, train_meta


_RECEPTIVE: dict[str, dict] = {}


def _receptive_field(net: TileNet) -> dict:
    """The measured receptive field of ``net``'s architecture (probed once per config and process:
    the probe costs seconds and the radius is a property of the layers, not of the weights)."""
    key = json.dumps(net.cfg.to_dict(), sort_keys=True)
    if key not in _RECEPTIVE:
        from .receptive import probe_model

        p = probe_model(net)
        _RECEPTIVE[key] = {"radius": p.radius, "halo": p.halo, "global_radius": p.global_radius, "stride": p.stride}
    return _RECEPTIVE[key]


def _saved_palette(path: Path, classes: int, what: str) -> np.ndarray:
    """The palette (uint8 [K,3]) stored in tilerun weights at ``path``; it must have ``classes`` colours."""
    try:
        palette = np.array(json.loads(read_metadata(path)["palette"]), dtype=np.uint8).reshape(-1, 3)
    except (KeyError, TypeError, ValueError) as e:
        raise TrainingError(f"{what} {path}: not tilerun weights ({e})") from e
    if len(palette) != classes:
        raise TrainingError(f"{what} {path} has {len(palette)} classes; pass --classes {len(palette)}")
    return palette


def _provenance(path: Path, what: str) -> dict:
    """What the metadata of the tilerun weights at ``path`` says about their training (for the next stage's)."""
    try:
        training = json.loads(read_metadata(path).get("training", "{}"))
    except ValueError as e:
        raise TrainingError(f"{what} {path}: not tilerun weights ({e})") from e
    if "merged" in training:
        return {"file": path.name, "merged": training["merged"]}
    return {"file": path.name, "step": training.get("step"), "recipe": training.get("recipe"),
            "seconds": training.get("seconds"), "init_from": training.get("init_from")}


def _init_from(net: TileNet, path: Path) -> dict:
    """Load ``path``'s weights into ``net`` (non-strict for parameters only ``net`` has); provenance for metadata."""
    provenance = _provenance(path, "--init-from")
    try:
        missing, unexpected = net.load_state_dict(load_file(str(path)), strict=False)
    except RuntimeError as e:  # shape mismatch
        raise TrainingError(f"--init-from {path}: weights do not fit this architecture ({e})") from e
    if unexpected:
        raise TrainingError(f"--init-from {path}: parameters this architecture lacks: {', '.join(unexpected)}")
    if missing:
        log.info("--init-from %s: new parameters keep their init: %s", path, ", ".join(missing))
    return provenance


def merge(paths: Sequence[str | os.PathLike], *, out: str | os.PathLike) -> Path:
    """Write the mean of the weights of ``paths`` to ``out``: replicas merged into one model.

    The design document's last step: replicas trained in parallel (here: runs from one
    start with other seeds) and merged. Averaging the weights of fine-tunes of one start
    lands between them in a flat region of the loss (Wortsman et al. 2022, "Model soups");
    measured for the shipped weights in docs/training.md. The replicas must share the
    architecture and the palette (their classes mean the same colours).
    """
    paths = [Path(p) for p in paths]
    if len(paths) < 2:
        raise TrainingError(f"merge needs at least two weights files, got {len(paths)}")
    nets = [load_tilenet(p) for p in paths]
    first = nets[0]
    for p, net in zip(paths[1:], nets[1:]):
        if net.cfg != first.cfg:
            raise TrainingError(f"{p}: another architecture than {paths[0]} ({net.cfg} vs {first.cfg}); "
                                "merge only replicas of one run")
        if net.palette != first.palette:
            raise TrainingError(f"{p}: another palette than {paths[0]}; merge only replicas started from one "
                                "checkpoint (--init-from keeps its palette)")
    states = [n.state_dict() for n in nets]
    mean = {k: (torch.stack([s[k].double() for s in states]).mean(0).to(v.dtype) if v.is_floating_point() else v)
            for k, v in states[0].items()}
    merged = TileNet(first.cfg, first.palette)
    merged.load_state_dict(mean)
    meta = first.metadata
    extra = {"classes": first.cfg.classes, "training": {"merged": [_provenance(p, "merge:") for p in paths]}}
    if "receptive_field" in meta:  # the same layers, so the same field
        extra["receptive_field"] = json.loads(meta["receptive_field"])
    out = Path(out)
    save_tilenet(merged, out, extra=extra)
    return out


def switch(path: str | os.PathLike, settings: Sequence[str], *, out: str | os.PathLike) -> Path:
    """Write ``path``'s weights to ``out`` with `TileNetConfig` fields switched (``FIELD=VALUE``,
    `TileNetConfig.with_settings`): settings that add no parameter, such as the coarse context's
    cell sizes or its fills, which change the classical parts around the same network. Its
    metadata keeps the training's and adds what was switched."""
    path = Path(path)
    net = load_tilenet(path)
    try:
        cfg = net.cfg.with_settings(list(settings))
    except ValueError as e:
        raise TrainingError(f"switch {path}: {e}") from e
    new = TileNet(cfg, net.palette)
    try:
        new.load_state_dict(net.state_dict())
    except RuntimeError as e:
        raise TrainingError(f"switch {path}: {' '.join(settings)} changes the network's parameters; "
                            "train with them instead (tilerun train --init-from)") from e
    meta = net.metadata
    training = json.loads(meta.get("training", "{}"))
    training["switched"] = training.get("switched", []) + list(settings)
    # Measured anew: a switch may change the pre-fill's reach.
    extra = {"classes": cfg.classes, "training": training, "receptive_field": _receptive_field(new)}
    out = Path(out)
    save_tilenet(new, out, extra=extra)
    return out


# -- the loop -------------------------------------------------------------------------------
def train(
    image_paths: Sequence[str | os.PathLike],
    *,
    out: str | os.PathLike,
    cfg: TrainConfig = TrainConfig(),
    net_cfg: TileNetConfig | None = None,
    exclude: Sequence[str] = (),
    resume: bool = False,
    init_from: str | os.PathLike | None = None,
    stop_at: int | None = None,
    device: str = "auto",
    progress: bool = True,
) -> TrainResult:
    """Train a TileNet on the images under ``image_paths`` into ``out`` (.safetensors).

    ``stop_at`` ends this run after that step (checkpointed) without changing the
    recipe, e.g. to split training over several runs; ``resume`` continues from ``out``.
    ``init_from`` starts from another run's weights and palette instead of the init (the
    images may differ: a later stage can add photos); parameters the architecture has
    and that file lacks keep their init.
    """
    from .dist import session

    out = Path(out)
    net_cfg = net_cfg or default_net_config(cfg.classes)
    if net_cfg.classes != cfg.classes:
        raise TrainingError(f"--classes {cfg.classes} but the architecture has {net_cfg.classes} classes")
    if resume and not out.is_file():
        raise TrainingError(f"--resume: no checkpoint at {out}")
    if not resume and out.exists():
        raise TrainingError(f"{out} exists; pass --resume to continue it, or choose another --out")
    end = cfg.steps if stop_at is None else min(cfg.steps, stop_at)
    t_start = time.perf_counter()
    with session(device=device) as ctx:
        named = load_training_images(image_paths, exclude=exclude, min_side=cfg.crop)
        images = _with_half_scales([im for _, im in named], cfg.crop)
        if resume:
            palette_u8 = _saved_palette(out, cfg.classes, "--resume")
        elif init_from is not None:
            # A later stage keeps the classes its start was trained on, even on other images:
            # a fresh k-means over them would give the class head other colours to mean.
            palette_u8 = _saved_palette(Path(init_from), cfg.classes, "--init-from")
        else:
            palette_u8 = kmeans_palette([im for _, im in named], cfg.classes, seed=cfg.seed, samples=cfg.kmeans_samples)
        # Every rank computes the same palette and work list from the same inputs; check it.
        ctx.agree(json.dumps([n for n, _ in named]) + palette_u8.tobytes().hex(), "the training images and palette")
        palette = [tuple(int(v) for v in c) for c in palette_u8]

        # The same init on every rank (DDP also broadcasts rank 0's weights).
        torch.manual_seed(INIT_SEED + cfg.seed)
        net = TileNet(net_cfg, palette)
        start, seconds_before, init_meta = 0, 0.0, None
        if resume:
            start, train_meta = _resume_state(out, cfg, net_cfg)
            seconds_before = float(train_meta.get("seconds", 0.0))
            init_meta = train_meta.get("init_from")
            net.load_state_dict(load_file(str(out)))
        elif init_from is not None:
            init_meta = _init_from(net, Path(init_from))
        net.to(ctx.device)
        opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        if resume:
            _load_optimizer(opt, optimizer_path(out), start, ctx.device)
        model = net
        if ctx.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            model = DDP(net, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
        pal_t = torch.tensor(palette_u8, dtype=torch.float32, device=ctx.device) / 255

        receptive = _receptive_field(net) if ctx.is_writer else None

        def checkpoint(step: int, seconds: float) -> None:
            if ctx.is_writer:
                _save_optimizer(opt, optimizer_path(out), step)
                save_tilenet(net, out, extra={
                    "classes": cfg.classes,
                    "receptive_field": receptive,
                    "training": {
                        "step": step,
                        "recipe": cfg.recipe(),
                        "images": [n for n, _ in named],
                        "excluded": list(exclude),
                        "world_size": ctx.world_size,
                        "device": ctx.device.type,
                        "machine": f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}",
                        "seconds": round(seconds, 1),
                        "init_from": init_meta,
                    },
                })
            if ctx.distributed:
                torch.distributed.barrier()

        bar = None
        if progress and ctx.is_writer:
            from tqdm import tqdm

            bar = tqdm(total=end, initial=start, desc="train", unit="step", dynamic_ncols=True, mininterval=2.0)
        parts = {"loss": float("nan")}
        t_run = time.perf_counter()
        model.train()
        try:
            for step in range(start, end):
                for g in opt.param_groups:
                    g["lr"] = cfg.lr_at(step)
                forward = {}
                if cfg.picture_context:
                    imgs, masks, pictures, origins = make_picture_batch(images, step=step, rank=ctx.rank, cfg=cfg)
                    forward = picture_inputs(net, pictures, masks, origins, ctx.device)
                else:
                    imgs, masks = make_batch(images, step=step, rank=ctx.rank, cfg=cfg)
                x = torch.from_numpy(imgs).to(ctx.device).permute(0, 3, 1, 2).float().div_(255)
                m = torch.from_numpy(masks).to(ctx.device)[:, None].float()
                with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
                    loss, parts = compute_loss(model, x, m, pal_t, cfg, **forward)
                if not math.isfinite(parts["loss"]):
                    raise TrainingError(f"loss became {parts['loss']} at step {step}; lower --lr")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix({k: f"{v:.4f}" for k, v in parts.items()}, refresh=False)
                done = step + 1
                if done % cfg.checkpoint_every == 0 or done == end:
                    checkpoint(done, seconds_before + time.perf_counter() - t_run)
                    if ctx.is_writer:
                        log.info("step %d: %s (checkpoint %s)", done, " ".join(f"{k} {v:.4f}" for k, v in parts.items()), out)
        finally:
            if bar is not None:
                bar.close()
        return TrainResult(out, end, parts["loss"], time.perf_counter() - t_start)
