"""The design document's model: Encoder -> Predictor (global + per-pixel classes) -> Generator -> Decoder.

Fully convolutional with a finite receptive field, except one global branch: the
Predictor's summary of the whole image, a masked mean of the encoder features. That
mean is written as a ratio of *sums* over feature cells (`global_terms`), so the tiling
engine can add the sums of every tile's core and hand each tile the exact whole-image
value (`forward(..., global_sums=...)`).

Conventions: image float [N,3,H,W] in [0,1]; mask float [N,1,H,W], 1 = missing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["TileNetConfig", "TileNet"]


@dataclass(frozen=True)
class TileNetConfig:
    classes: int = 16
    stem: int = 32  # full-resolution channels
    mid: int = 48  # half-resolution channels
    width: int = 64  # quarter-resolution (z) channels
    global_dim: int = 64
    predictor_dilations: tuple[int, ...] = (1, 2)
    generator_dilations: tuple[int, ...] = (1, 2)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TileNetConfig":
        d = dict(d)
        for k in ("predictor_dilations", "generator_dilations"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


def _conv(cin: int, cout: int, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=dilation, dilation=dilation)


class Encoder(nn.Module):
    """Convolutions + pooling: full-res skip, half-res skip, quarter-res features z."""

    def __init__(self, cfg: TileNetConfig) -> None:
        super().__init__()
        self.stem = _conv(4, cfg.stem)
        self.down1 = _conv(cfg.stem, cfg.mid)
        self.down2a = _conv(cfg.mid, cfg.width)
        self.down2b = _conv(cfg.width, cfg.width)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        s0 = F.relu(self.stem(x))
        s1 = F.relu(self.down1(F.avg_pool2d(s0, 2)))
        z = F.relu(self.down2a(F.avg_pool2d(s1, 2)))
        z = F.relu(self.down2b(z))
        return s0, s1, z


class Predictor(nn.Module):
    """Global features of the whole image + per-cell class logits (also where pixels are missing)."""

    def __init__(self, cfg: TileNetConfig) -> None:
        super().__init__()
        self.global_mlp = nn.Sequential(
            nn.Linear(cfg.width, cfg.global_dim), nn.ReLU(), nn.Linear(cfg.global_dim, 2 * cfg.width)
        )
        self.convs = nn.ModuleList(_conv(cfg.width, cfg.width, d) for d in cfg.predictor_dilations)
        self.logits = nn.Conv2d(cfg.width, cfg.classes, 1)

    def forward(self, z: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        # FiLM: the global vector scales and shifts every feature cell alike.
        gamma, beta = self.global_mlp(g)[:, :, None, None].chunk(2, dim=1)
        h = z * (1 + gamma) + beta
        for conv in self.convs:
            h = F.relu(conv(h))
        return h, self.logits(h)


class Generator(nn.Module):
    """Local detail from z and the predictor's class distribution."""

    def __init__(self, cfg: TileNetConfig) -> None:
        super().__init__()
        self.inp = nn.Conv2d(cfg.width * 2 + cfg.classes, cfg.width, 1)
        self.convs = nn.ModuleList(_conv(cfg.width, cfg.width, d) for d in cfg.generator_dilations)

    def forward(self, z: Tensor, h: Tensor, logits: Tensor) -> Tensor:
        x = F.relu(self.inp(torch.cat([z, h, logits.softmax(1)], 1)))
        for conv in self.convs:
            x = x + F.relu(conv(x))
        return x


class Decoder(nn.Module):
    """Upsample to full resolution; RGB and per-pixel class logits."""

    def __init__(self, cfg: TileNetConfig) -> None:
        super().__init__()
        self.up1 = _conv(cfg.width + cfg.mid, cfg.mid)
        self.up0 = _conv(cfg.mid + cfg.stem, cfg.stem)
        self.rgb = nn.Conv2d(cfg.stem, 3, 1)
        self.cls = nn.Conv2d(cfg.stem, cfg.classes, 1)

    def forward(self, x: Tensor, s1: Tensor, s0: Tensor, coarse_logits: Tensor) -> tuple[Tensor, Tensor]:
        x = F.interpolate(x, size=s1.shape[-2:], mode="nearest")
        x = F.relu(self.up1(torch.cat([x, s1], 1)))
        x = F.interpolate(x, size=s0.shape[-2:], mode="nearest")
        x = F.relu(self.up0(torch.cat([x, s0], 1)))
        logits = self.cls(x) + F.interpolate(coarse_logits, size=s0.shape[-2:], mode="nearest")
        return logits, torch.sigmoid(self.rgb(x))


class TileNet(nn.Module):
    """``logits, rgb = model(image, mask)``; see the module docstring for shapes."""

    stride = 4

    def __init__(self, cfg: TileNetConfig | None = None, palette: list[tuple[int, int, int]] | None = None) -> None:
        super().__init__()
        self.cfg = cfg or TileNetConfig()
        self.palette = palette or default_palette(self.cfg.classes)
        if len(self.palette) != self.cfg.classes:
            raise ValueError(f"palette has {len(self.palette)} colours for {self.cfg.classes} classes")
        self.encoder = Encoder(self.cfg)
        self.predictor = Predictor(self.cfg)
        self.generator = Generator(self.cfg)
        self.decoder = Decoder(self.cfg)

    # -- helpers -----------------------------------------------------------------
    def _prepare(self, image: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Blank missing pixels and pad bottom/right to the stride (padding counts as missing)."""
        if image.ndim != 4 or image.shape[1] != 3:
            raise ValueError(f"image must be [N,3,H,W], got {tuple(image.shape)}")
        if mask.shape != (image.shape[0], 1, *image.shape[2:]):
            raise ValueError(f"mask must be [N,1,H,W] matching the image, got {tuple(mask.shape)}")
        mask = mask.to(image.dtype)
        x = torch.cat([image * (1 - mask), mask], 1)
        h, w = image.shape[-2:]
        ph, pw = -h % self.stride, -w % self.stride
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
            x[:, 3:, h:, :] = 1
            x[:, 3:, :, w:] = 1
        return x, x[:, 3:]

    def _terms(self, z: Tensor, mask: Tensor) -> Tensor:
        known = 1 - F.avg_pool2d(mask, self.stride)
        return torch.cat([z * known, known], 1)

    # -- the global hook used by the tiling engine --------------------------------
    def global_terms(self, image: Tensor, mask: Tensor) -> Tensor:
        """Per feature cell (stride ``self.stride``), additive terms of the global summary."""
        x, m = self._prepare(image, mask)
        _, _, z = self.encoder(x)
        return self._terms(z, m)

    def forward(self, image: Tensor, mask: Tensor, global_sums: Tensor | None = None) -> tuple[Tensor, Tensor]:
        h, w = image.shape[-2:]
        x, m = self._prepare(image, mask)
        s0, s1, z = self.encoder(x)
        if global_sums is None:
            global_sums = self._terms(z, m).sum(dim=(2, 3))
        c = self.cfg.width
        # A masked mean: the features of known pixels, averaged over the whole image.
        g = global_sums[:, :c] / global_sums[:, c:].clamp_min(1e-6)
        hfeat, coarse = self.predictor(z, g)
        detail = self.generator(z, hfeat, coarse)
        logits, rgb = self.decoder(detail, s1, s0, coarse)
        logits, rgb = logits[..., :h, :w], rgb[..., :h, :w]
        known = 1 - m[..., :h, :w]
        rgb = image * known + rgb * (1 - known)  # known pixels pass through unchanged
        return logits, rgb


def default_palette(k: int) -> list[tuple[int, int, int]]:
    """Distinct colours for an untrained model (a trained one stores its k-means colours)."""
    import colorsys

    return [
        tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(i / max(k, 1), 0.65, 0.95 - 0.4 * (i % 2)))
        for i in range(k)
    ]
