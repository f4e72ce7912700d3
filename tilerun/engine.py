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

from dataclasses import dataclass
from itertools import groupby
from typing import Iterable, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from .geometry import Tile, grid, round_up
from .receptive import ModelProbe, probe_model

__all__ = ["Engine", "TileResult", "infer_image", "DEFAULT_TILE", "DEFAULT_BATCH"]

from .defaults import DEFAULT_BATCH, DEFAULT_TILE


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


class Engine:
    """A model prepared for tiled inference: probed once, reused for every image."""

    def __init__(
        self,
        model: nn.Module,
        *,
        tile: int = DEFAULT_TILE,
        halo: int | None = None,
        batch_size: int = DEFAULT_BATCH,
        device: str | torch.device = "cpu",
        probe: ModelProbe | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self.probe = probe or probe_model(model)
        stride = self.probe.stride
        if tile < 0 or tile % stride:
            raise ValueError(f"--tile must be 0 (whole image) or a positive multiple of the model stride {stride}, got {tile}")
        self.tile = tile
        if halo is None:
            if self.probe.halo is None:
                # Not tile-exact: only a whole image per forward reproduces it.
                self.tile, halo = 0, 0
            else:
                halo = self.probe.halo
        elif halo < 0:
            raise ValueError(f"--halo must be >= 0, got {halo}")
        self.halo = round_up(halo, stride) if halo else 0
        ghalo = self.probe.global_halo
        self.global_halo = self.halo if ghalo is None else ghalo
        self.batch_size = batch_size

    @property
    def stride(self) -> int:
        return self.probe.stride

    @property
    def uses_global(self) -> bool:
        return self.probe.has_global

    def tiles(self, height: int, width: int, *, halo: int | None = None) -> list[Tile]:
        return grid(height, width, tile=self.tile, halo=self.halo if halo is None else halo, stride=self.stride)

    # -- tensors ------------------------------------------------------------------
    def _batches(self, tiles: Iterable[Tile]) -> Iterator[list[Tile]]:
        """Consecutive tiles of one window shape, up to batch_size (no padding: padding would change borders)."""
        for _, same in groupby(tiles, key=lambda t: t.window_shape):
            same = list(same)
            for i in range(0, len(same), self.batch_size):
                yield same[i : i + self.batch_size]

    def _windows(self, image: np.ndarray, mask: np.ndarray, batch: list[Tile], halo_tiles: list[Tile]) -> tuple[Tensor, Tensor]:
        imgs = np.stack([image[t.wy0 : t.wy1, t.wx0 : t.wx1] for t in halo_tiles])
        msks = np.stack([mask[t.wy0 : t.wy1, t.wx0 : t.wx1] for t in halo_tiles])
        x = torch.from_numpy(imgs).to(self.device).permute(0, 3, 1, 2).float().div_(255)
        m = torch.from_numpy(msks).to(self.device)[:, None].float()
        return x, m

    # -- pass 1 ---------------------------------------------------------------------
    @torch.inference_mode()
    def global_partials(self, image: np.ndarray, mask: np.ndarray, tiles: Iterable[Tile]) -> dict[int, Tensor]:
        """Per tile index, the float64 sum of the global terms over that tile's core."""
        h, w = mask.shape
        out: dict[int, Tensor] = {}
        # Pass 1 needs only the encoder's (smaller) halo.
        gtiles = {t.index: t for t in grid(h, w, tile=self.tile, halo=self.global_halo, stride=self.stride)}
        for batch in self._batches([gtiles[t.index] for t in tiles]):
            x, m = self._windows(image, mask, batch, batch)
            terms = self.model.global_terms(x, m)
            s = self.stride
            for i, t in enumerate(batch):
                ys, xs = t.core_in_window_at(s)
                out[t.index] = terms[i, :, ys, xs].double().sum(dim=(1, 2)).cpu()
        return out

    @staticmethod
    def reduce_partials(partials: dict[int, Tensor]) -> Tensor:
        """Whole-image sums, added in tile order so that every process gets the same bits."""
        return torch.stack([partials[k] for k in sorted(partials)]).sum(0)

    # -- pass 2 ---------------------------------------------------------------------
    @torch.inference_mode()
    def compute(
        self, image: np.ndarray, mask: np.ndarray, tiles: Iterable[Tile], global_sums: Tensor | None = None
    ) -> Iterator[TileResult]:
        """Run ``tiles`` and yield their uint8 cores."""
        if self.uses_global and global_sums is None:
            raise ValueError("this model needs the whole-image global sums: run global_partials first")
        for batch in self._batches(tiles):
            x, m = self._windows(image, mask, batch, batch)
            if self.uses_global:
                g = global_sums.to(self.device, torch.float32)[None].expand(len(batch), -1)
                out = self.model(x, m, global_sums=g)
            else:
                out = self.model(x, m)
            logits, rgb = _split_outputs(out)
            cls_u8 = None if logits is None else logits.argmax(1).to(torch.uint8).cpu().numpy()
            rgb_u8 = None if rgb is None else rgb.clamp(0, 1).mul(255).round_().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            for i, t in enumerate(batch):
                ys, xs = t.core_in_window()
                yield TileResult(
                    t,
                    None if cls_u8 is None else cls_u8[i, ys, xs],
                    None if rgb_u8 is None else rgb_u8[i, ys, xs],
                )


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
    """uint8 output arrays filled core by core; known pixels copied from the input."""

    def __init__(self, image: np.ndarray, mask: np.ndarray) -> None:
        self.image, self.mask = image, mask
        h, w = mask.shape
        self.classes: np.ndarray | None = None
        self.rgb: np.ndarray | None = None
        self._shape = (h, w)

    def add(self, r: TileResult) -> None:
        t = r.tile
        if r.classes is not None:
            if self.classes is None:
                self.classes = np.zeros(self._shape, np.uint8)
            self.classes[t.y0 : t.y1, t.x0 : t.x1] = r.classes
        if r.rgb is not None:
            if self.rgb is None:
                self.rgb = self.image.copy()
            core = self.rgb[t.y0 : t.y1, t.x0 : t.x1]
            hole = self.mask[t.y0 : t.y1, t.x0 : t.x1]
            core[hole] = r.rgb[hole]  # known pixels stay exactly the input


def infer_image(
    model: nn.Module | Engine,
    image: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    tile: int = DEFAULT_TILE,
    halo: int | None = None,
    batch_size: int = DEFAULT_BATCH,
    device: str | torch.device = "cpu",
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Tiled inference of one image: ``(class_map uint8 [H,W], inpainted uint8 [H,W,3])``.

    ``image`` is uint8 HxWx3, ``mask`` bool HxW (True = missing). An `Engine` may be
    passed instead of a model to reuse its probe across images (then the other
    keyword arguments are ignored). An output the model does not give is None.
    """
    engine = model if isinstance(model, Engine) else Engine(model, tile=tile, halo=halo, batch_size=batch_size, device=device)
    mask = check_image(image, mask)
    image = np.ascontiguousarray(image)
    h, w = mask.shape
    tiles = engine.tiles(h, w)
    sums = engine.reduce_partials(engine.global_partials(image, mask, tiles)) if engine.uses_global else None
    st = Stitcher(image, mask)
    for r in engine.compute(image, mask, tiles, sums):
        st.add(r)
    return st.classes, st.rgb
