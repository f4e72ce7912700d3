"""The design document's model: Encoder -> Predictor (global + per-pixel classes) -> Generator -> Decoder.

Fully convolutional with a finite receptive field, except one global branch: the
Predictor's summary of the whole image, a masked mean of the encoder features. That
mean is written as a ratio of *sums* over feature cells (`global_terms`), so the tiling
engine can add the sums of every tile's core and hand each tile the exact whole-image
value (`forward(..., global_sums=...)`). `forward(..., out_box=...)` computes only part
of the outputs: everything after the encoder runs on that box plus what the later
layers reach (`TileNet.margins`), so a tile's halo costs the encoder, not the decoder.

Conventions: image float [N,3,H,W] in [0,1]; mask float [N,1,H,W], 1 = missing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Callable

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..channels import first_extreme
from ..geometry import round_up

__all__ = ["TileNetConfig", "TileNet", "local_fill", "harmonic_fill", "coarse_sums", "class_counts", "coarse_fill",
           "far_field", "palette_classes"]


@dataclass(frozen=True)
class TileNetConfig:
    classes: int = 16
    stem: int = 32  # full-resolution channels
    mid: int = 48  # half-resolution channels
    width: int = 64  # quarter-resolution (z) channels
    global_dim: int = 64
    predictor_dilations: tuple[int, ...] = (1, 2)
    generator_dilations: tuple[int, ...] = (1, 2)
    # Radii of the local pre-fill (see `local_fill`); () = no pre-fill, RGB from a sigmoid head.
    prefill_radii: tuple[int, ...] = ()
    # Chebyshev-accelerated Jacobi sweeps of Laplace's equation over the holes after the
    # local pre-fill (see `harmonic_fill`); each adds one pixel to the pre-fill's reach.
    prefill_iterations: int = 0
    # Add log P(class) of the pre-filled colours to the class logits (needs prefill_radii):
    # known pixels keep their own class, holes start from the class of their fill.
    class_prior: bool = False
    # Whole-image coarse context (see `coarse_context`): the side, in pixels, of the cells of a
    # filled coarse image of the whole input that is the pre-fill's far field; 0 = none (grey).
    coarse_scale: int = 0
    # The class prior from a fill of the known pixels' classes (their share of each class, filled
    # like the colours, its far field the whole image's class shares per cell of
    # class_cells x coarse_scale px) instead of the class of the fill colour: the most
    # frequent class around a hole rather than the class of its mean colour.
    class_fill: bool = False
    # The class shares' cells, in colour cells across: 1 to 4 (pass 1 carries a cell's counts as
    # uint16). 16 shares a cell cost 16/3 of the colours' memory at the same scale; 2 (32 px) since
    # stage 13, 4 (64 px) in older weights (docs/model.md).
    class_cells: int = 4
    # Radii of the slope continuation (see `slope_fill`); () = none. ``slope_weight`` scales it
    # in the holes' pre-fill: the border's gradients carried into thin holes, as biharmonic
    # inpainting does.
    slope_radii: tuple[int, ...] = ()
    slope_weight: float = 0.0
    # The colours' coarse fill continues the known cells' slopes across the holes (biharmonic,
    # see `coarse_fill`) instead of blending their colours (harmonic): a gradient that runs into
    # a box goes on through it.
    coarse_biharmonic: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.class_cells <= 4:
            raise ValueError(f"class_cells must be 1 to 4 (a class cell of at most 64^2 px), got {self.class_cells}")

    @property
    def class_scale(self) -> int:
        """The side, in pixels, of the class shares' cells."""
        return self.coarse_scale * self.class_cells

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TileNetConfig":
        d = dict(d)
        for k in ("predictor_dilations", "generator_dilations", "prefill_radii", "slope_radii"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)

    def with_settings(self, settings: list[str]) -> "TileNetConfig":
        """This configuration with fields switched by ``FIELD=VALUE`` strings: ``true``/``false``
        for a flag, a number, or ``1/3/7`` for a tuple of whole numbers."""
        types = {f.name: f.type for f in fields(self)}
        changes: dict = {}
        for kv in settings:
            name, eq, value = kv.partition("=")
            if not eq or name not in types:
                raise ValueError(f"{kv!r}: not FIELD=VALUE with FIELD one of {', '.join(types)}")
            kind = types[name]
            try:
                if kind == "bool":
                    changes[name] = {"true": True, "false": False}[value.lower()]
                elif kind.startswith("tuple"):
                    changes[name] = tuple(int(v) for v in value.split("/") if v)
                else:
                    changes[name] = {"int": int, "float": float}[kind](value)
            except (KeyError, ValueError) as e:
                raise ValueError(f"{kv!r}: {name} takes a {kind}") from e
        return replace(self, **changes)


def _conv2d(x: Tensor, weight: Tensor, bias: Tensor | None = None, padding=0, dilation=1) -> Tensor:
    """``F.conv2d(x, weight, bias, 1, padding, dilation)``, on CPU in float32 always through oneDNN.

    ATen sends a float32 convolution of ONE image to oneDNN only above 20480 input values
    (N * C * H * W), below that to its own im2col + GEMM (``_ConvBackend.Slow2d``, see
    ``use_mkldnn`` in aten/src/ATen/native/Convolution.cpp); a batch of 2 or more always
    goes to oneDNN. On an AVX2 CPU (AMD EPYC) the two round differently, ~half of a
    stem's outputs in the last bit, so a feature cell's bits depended on the size of the
    window around it and on the batch: with ``--feature-cache`` (pass 1 on pass 2's
    windows) a pixel came out one grey level apart. oneDNN's value of an output pixel does
    not depend on the window's size or the batch (tests/test_exact.py,
    ``test_encoder_features_do_not_depend_on_the_window``). Above the threshold this is the
    kernel ATen picks anyway: the same bits, the same speed. float64 (the probes), autocast
    (bf16) and ``torch.backends.mkldnn.enabled = False`` keep ATen's choice.
    """
    if (x.device.type == "cpu" and x.dtype == torch.float32 and torch.backends.mkldnn.enabled
            and torch.backends.mkldnn.is_available() and not torch.is_autocast_enabled("cpu")):
        pad = (padding, padding) if isinstance(padding, int) else tuple(padding)
        dil = (dilation, dilation) if isinstance(dilation, int) else tuple(dilation)
        return torch.mkldnn_convolution(x, weight, bias, pad, (1, 1), dil, 1)
    return F.conv2d(x, weight, bias, 1, padding, dilation)


class _Conv3x3(nn.Conv2d):
    """A 3x3 convolution (stride 1, padding = dilation) through `_conv2d`."""

    def __init__(self, cin: int, cout: int, dilation: int = 1) -> None:
        super().__init__(cin, cout, 3, padding=dilation, dilation=dilation)

    def forward(self, x: Tensor) -> Tensor:
        return _conv2d(x, self.weight, self.bias, self.padding, self.dilation)


def _conv(cin: int, cout: int, dilation: int = 1) -> nn.Conv2d:
    return _Conv3x3(cin, cout, dilation)


def _conv_of_cat(conv: nn.Conv2d, parts: list[Tensor], coarse: Tensor | None = None) -> Tensor:
    """``conv(torch.cat([upsample(coarse), *parts], 1))`` without building the concatenation,
    ``upsample`` being 2x nearest (``coarse``'s channels come first in the weights).

    A convolution is linear in its input channels, so it is the sum of one convolution
    per part with that part's slice of the weights. At full resolution the concatenated
    tensor would be written and read once more than the parts (memory-bound work that
    cost as much as the convolution itself on CPU). ``coarse`` is never upsampled: see
    `_add_conv_of_upsampled`.
    """
    start = 0 if coarse is None else coarse.shape[1]
    out = None
    for i, x in enumerate(parts):
        w = conv.weight[:, start : start + x.shape[1]]
        start += x.shape[1]
        y = _conv2d(x, w, conv.bias if i == 0 else None, conv.padding, conv.dilation)
        out = y if out is None else out.add_(y)
    if coarse is not None:
        _add_conv_of_upsampled(out, coarse, conv.weight[:, : coarse.shape[1]])
    return out


def _add_conv_of_upsampled(out: Tensor, x: Tensor, w: Tensor) -> Tensor:
    """``out += conv3x3(upsample2x_nearest(x), w, padding=1)``, at ``x``'s resolution.

    After a nearest 2x upsampling, the 3x3 taps of an output pixel on an even row read
    two source rows (i - 1 with the kernel's row 0, i with rows 1 + 2), on an odd row
    i (rows 0 + 1) and i + 1 (row 2); columns alike. So each of the four output phases
    is a 2x2 convolution of ``x`` with summed weights: 4 taps a pixel instead of 9, and
    no upsampled tensor (on CPU the decoder's biggest convolutions and copies). All four
    run as one convolution with 4x the output channels; padding 1 lines up the even
    phases' windows at offset 0 and the odd ones' at 1. Equal to the upsampled form up
    to float rounding; the zero padding at the borders is the same zeros.
    """
    def fold(k: Tensor, dim: int, odd: int) -> Tensor:  # 3 taps along dim -> the 2 an output phase reads
        t0, t1, t2 = k.unbind(dim)
        return torch.stack((t0 + t1, t2) if odd else (t0, t1 + t2), dim)

    h, w_ = x.shape[-2:]
    cout = w.shape[0]
    phases = [fold(fold(w, 2, a), 3, b) for a in (0, 1) for b in (0, 1)]
    y = _conv2d(x, torch.cat(phases).contiguous(memory_format=torch.channels_last), padding=1)
    grid = out.unflatten(2, (h, 2)).unflatten(4, (w_, 2))  # [N, C, h, 2, w, 2]: output row 2i + a, column 2j + b
    for k, (a, b) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
        grid[:, :, :, a, :, b].add_(y[:, k * cout : (k + 1) * cout, a : a + h, b : b + w_])
    return out


def _conv1x1(parts: list[Tensor], weight: Tensor, bias: Tensor) -> Tensor:
    """``F.conv2d(torch.cat(parts, 1), weight, bias)`` for a 1x1 ``weight`` [out, in, 1, 1].

    On NHWC-strided parts (cropped ones are copied, still NHWC): one matrix product per
    part over its pixels, summed, with no concatenation (the result NHWC-strided too).
    PyTorch sends 1x1 convolutions on CPU to its unblocked fallback, ~2x slower, and a
    concatenation of mixed layouts cost ~7 ms a window at quarter resolution.
    """
    n, _, h, w = parts[0].shape
    pixels = [x.permute(0, 2, 3, 1) for x in parts]
    if not all(x.stride(-1) == 1 for x in pixels):  # NCHW: the convolution's own path
        return F.conv2d(torch.cat(parts, 1) if len(parts) > 1 else parts[0], weight, bias)
    out, start = None, 0
    for x in pixels:
        c = x.shape[-1]
        wt = weight[:, start : start + c, 0, 0].t()
        start += c
        x = x.reshape(n * h * w, c)
        # In place, so not autocast: the later parts take the first product's dtype.
        out = torch.addmm(bias, x, wt) if out is None else out.addmm_(x.to(out.dtype), wt.to(out.dtype))
    return out.view(n, h, w, -1).permute(0, 3, 1, 2)


# Below this share of known pixels in its window a scale defers to the next coarser one
# (measured on held-out photos: 0.3 beat 0.1 and 0.5 by ~0.2 dB hole PSNR).
PREFILL_MIN_KNOWN = 0.3


def _box(x: Tensor, r: int) -> Tensor:
    """Mean over a (2r+1)^2 window, separable; zero padding = "unknown" outside the image.

    Two depthwise convolutions with ones (a row, then a column), in float32 even under
    autocast (a half-precision sum of 225 values would be off by ~1%). On NHWC-strided
    ``x`` they are ~1.7x faster on CPU than sums over windows built by doubling, and like
    those they never subtract (a running sum's differences would cancel).
    """
    c, k = x.shape[1], 2 * r + 1
    ones = torch.ones(c, 1, 1, k, dtype=x.dtype, device=x.device)
    with torch.autocast(x.device.type, enabled=False):
        rows = F.conv2d(x, ones, padding=(0, r), groups=c)
        return F.conv2d(rows, ones.view(c, 1, k, 1), padding=(r, 0), groups=c).div_(k * k)


def local_fill(image: Tensor, known: Tensor, radii: tuple[int, ...], far=None,
               with_reach: bool = False) -> Tensor | tuple[Tensor, Tensor | None]:
    """A classical, *local* pre-fill of the holes: multi-scale normalised convolution.

    At each scale the mean of the known pixels in a tent window (a box blur applied
    twice, radius 2r); the finest scale with enough known pixels wins, blended into
    the coarser ones. Unlike Telea or biharmonic inpainting, which propagate across a
    whole hole, its receptive field is finite (2 * max(radii)), so tiling stays exact.
    Pixels with no known pixel within reach get grey, or with ``far`` (a function giving
    [N, 3, H, W] float32: the upsampled whole-image coarse fill, `far_field`) its colour,
    which the coarsest scale then blends into as the finer ones blend into it.
    ``with_reach``: also the weight of the coarsest scale's local mean against the far field,
    [N, 1, H, W] in [0, 1] (None where nothing comes from the far field).
    """
    # Nothing to fill: the formula below would give image * 1 + fill * 0. CPU only: on a GPU
    # the test would make the host wait for the device.
    if known.device.type == "cpu" and bool(known.all()):
        return (image, None) if with_reach else image
    # Numerator and denominator filtered together, NHWC (see `_box`).
    c = image.shape[1]
    both = torch.cat([image * known, known], 1).contiguous(memory_format=torch.channels_last)
    fill = reach = None
    for r in sorted(radii, reverse=True):
        pooled = _box(_box(both, r), r)
        num, den = pooled[:, :c], pooled[:, c:]
        mean = num / den.clamp_min(1e-6)
        if fill is None:
            weight = (den / PREFILL_MIN_KNOWN).clamp_(0, 1)
            # The far field only where it counts; CPU only (the test would make the host wait for a GPU).
            if far is None or (known.device.type == "cpu" and bool((weight == 1).all())):
                fill = torch.where(den > 1e-6, mean, 0.5)
            else:
                fill = torch.lerp(far(), mean, weight)
                reach = weight
        else:  # a * mean + (1 - a) * fill in one op: each op broadcasting den over NHWC's inner axis is slow
            fill = torch.lerp(fill, mean, (den / PREFILL_MIN_KNOWN).clamp_(0, 1))
    # known is 0 or 1, so this is image * known + fill * (1 - known) to the bit, in one op.
    out = torch.where(known.bool(), image, fill)
    return (out, reach) if with_reach else out


def _holes_box(known: Tensor, margin: int) -> tuple[int, int, int, int] | None:
    """(y0, y1, x0, x1): the bounding box of the holes of ``known`` [N, 1, H, W] (of any batch
    item), widened by ``margin`` and cut at the edges; None without a hole."""
    holes = (known[:, 0] == 0).any(0)
    rows, cols = holes.any(1).nonzero()[:, 0], holes.any(0).nonzero()[:, 0]
    if not len(rows):
        return None
    h, w = holes.shape
    return (max(int(rows[0]) - margin, 0), min(int(rows[-1]) + 1 + margin, h),
            max(int(cols[0]) - margin, 0), min(int(cols[-1]) + 1 + margin, w))


def _slope_kernels(r: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """The tent of `local_fill`'s scale ``r`` (a box of radius r applied twice) along one axis,
    t(d) for d = -2r..2r, and -d t(d): the weights of a border pixel's slope at offset -d."""
    k = 2 * r + 1
    d = torch.arange(-2 * r, 2 * r + 1, dtype=dtype, device=device)
    t = (k - d.abs()) / (k * k)
    return t, -d * t


def slope_fill(image: Tensor, known: Tensor, radii: tuple[int, ...]) -> Tensor:
    """A first-order continuation of the known pixels into the holes: [N, 3, H, W], zero on
    known pixels, to add to a fill of the colours.

    A border pixel b with slope g predicts u(b) + g . (p - b) at p; a fill of the colours
    averages the u(b), this averages the g . (p - b) with `local_fill`'s tent weights, finest
    scale with enough known pixels first. Per axis that is a convolution of the slopes with
    the tent times the offset: separable, so two depthwise passes of 7 channels (the slopes
    along x and y, the known count; run as 8) per scale. Slopes are central differences where both
    neighbours are known, one-sided where one is, else 0. Pixels with no known pixel within
    reach get 0: the continuation does not carry slopes across wide holes, where they would
    overshoot. Like `local_fill`, each output depends on its (4 max(radii) + 3)^2 neighbourhood only.
    Elementwise work on planes, the convolutions NHWC (see `_box`): mixing the two layouts
    in one operation is slow on CPU. On CPU only the holes' bounding box, widened by the
    reach, is computed: the same values there (each depends on its neighbourhood alone), and
    zeros, the value of known pixels, around it.
    """
    if known.device.type == "cpu":  # (CPU: the tests would make the host wait for a GPU)
        box = _holes_box(known, 2 * max(radii) + 1)
        if box is None:
            return torch.zeros_like(image)
        y0, y1, x0, x1 = box
        if (y1 - y0) * (x1 - x0) < known.shape[-2] * known.shape[-1]:
            out = torch.zeros_like(image)
            out[..., y0:y1, x0:x1] = _slope_fill(image[..., y0:y1, x0:x1], known[..., y0:y1, x0:x1], radii)
            return out
    return _slope_fill(image, known, radii)


def _slope_fill(image: Tensor, known: Tensor, radii: tuple[int, ...]) -> Tensor:
    """`slope_fill` of every pixel."""
    c = image.shape[1]
    known = known.contiguous()
    u = image.contiguous() * known
    p, kp = F.pad(u, (1, 1, 1, 1)), F.pad(known, (1, 1, 1, 1))

    def slope(a: Tensor, b: Tensor, ka: Tensor, kb: Tensor) -> Tensor:  # a: the next pixel, b: the previous
        # Known neighbours' differences, averaged: (a - b) / 2, a - u, u - b or 0 (a and b are 0 where unknown).
        return (a - u).mul_(ka).add_((u - b).mul_(kb)).div_((ka + kb).clamp_(min=1)).mul_(known)

    gx = slope(p[..., 1:-1, 2:], p[..., 1:-1, :-2], kp[..., 1:-1, 2:], kp[..., 1:-1, :-2])
    gy = slope(p[..., 2:, 1:-1], p[..., :-2, 1:-1], kp[..., 2:, 1:-1], kp[..., :-2, 1:-1])
    # The known count repeated up to a multiple of 8 channels: oneDNN's depthwise convolutions
    # of 8 NHWC channels run faster than of 7 on CPU (the spare copies are never read; one
    # window's forward: `python bench/window_ab.py --ref 04fccfc~1`).
    spare = -(2 * c + 1) % 8
    x = torch.cat([gx, gy] + [known] * (1 + spare), 1).contiguous(memory_format=torch.channels_last)
    groups = x.shape[1]
    out = None
    with torch.autocast(x.device.type, enabled=False):
        for r in sorted(radii, reverse=True):
            t, dt = _slope_kernels(r, x.dtype, x.device)
            rows = torch.cat([dt.expand(c, -1), t.expand(groups - c, -1)])[:, None, None, :]
            cols = torch.cat([t.expand(c, -1), dt.expand(c, -1), t.expand(groups - 2 * c, -1)])[:, None, :, None]
            y = F.conv2d(F.conv2d(x, rows, padding=(0, 2 * r), groups=groups), cols, padding=(2 * r, 0),
                         groups=groups)[:, : 2 * c + 1].contiguous()
            den = y[:, 2 * c :]
            mean = y[:, :c].add(y[:, c : 2 * c]).div_(den.clamp_min(1e-6))
            weight = den.div(PREFILL_MIN_KNOWN).clamp_(0, 1)
            out = mean.mul_(weight) if out is None else out.lerp_(mean, weight)
    return out.mul_(1 - known)


# Spectral radius assumed for the Jacobi iteration in `harmonic_fill`: that of a hole some
# 40 pixels across (the biggest training boxes). Measured on held-out photos, 0.99 and
# 0.995 are within 0.04 dB of each other.
HARMONIC_RHO = 0.995


def _omegas(iterations: int, rho: float) -> list[float]:
    """Chebyshev's over-relaxation factor of each sweep."""
    out, omega = [], 1.0
    for i in range(iterations):
        if i == 1:
            omega = 1 / (1 - rho**2 / 2)
        elif i > 1:
            omega = 1 / (1 - rho**2 * omega / 4)
        out.append(omega)
    return out


# Below this share of hole pixels `harmonic_fill` sweeps the holes alone (gathering their
# neighbours) instead of the whole array. Measured on a 432^2 window, one thread: 8% holes
# 21.5 ms vs 52.5 ms, 20% 38.6 vs 53.2, 3% 10.5 vs 59.6.
SPARSE_SWEEPS_BELOW = 0.25


# At most this many channels per dense sweep on CPU (see `harmonic_fill`).
DENSE_SWEEP_CHANNELS = 3


def harmonic_fill(fill: Tensor, known: Tensor, iterations: int, rho: float = HARMONIC_RHO) -> Tensor:
    """Relax the holes of ``fill`` towards harmonic (Laplace) inpainting in ``iterations`` sweeps.

    Harmonic inpainting itself solves a global equation (a hole's middle depends on its
    whole border); a fixed number of sweeps keeps the reach finite (one pixel per sweep)
    so tiling stays exact. Chebyshev acceleration of the Jacobi sweeps (Golub & Van Loan,
    "Matrix Computations", section 11.2.8) converges in about the square root of the
    sweeps plain Jacobi needs: on held-out photos, 22 sweeps after ``local_fill`` came
    within 0.1 dB of the converged solution, which itself beat biharmonic inpainting.
    Known pixels (``known`` = 1) never change. On CPU only the holes' bounding box is swept,
    and sparse holes on their own (`_harmonic_fill_holes`), with the same operations in the
    same order: the same bits.
    """
    # CPU only: on a GPU the dense sweeps are cheap, and counting the holes would make the
    # host wait for the device.
    if iterations and fill.device.type == "cpu":
        # Only the holes' bounding box and the ring of known pixels around it take part: a known
        # pixel never changes, and the window's edge, where the ring is cut, mirrors as before.
        box = _holes_box(known, 1)
        if box is None:
            return fill
        y0, y1, x0, x1 = box
        if (y1 - y0) * (x1 - x0) < known.shape[-2] * known.shape[-1]:
            out = fill.clone()
            out[..., y0:y1, x0:x1] = harmonic_fill(fill[..., y0:y1, x0:x1], known[..., y0:y1, x0:x1], iterations, rho)
            return out
        if (1 - known).mean() < SPARSE_SWEEPS_BELOW:
            return _harmonic_fill_holes(fill, known, iterations, rho)
    if fill.device.type == "cpu" and fill.shape[1] > DENSE_SWEEP_CHANNELS:
        # A few channels at a time stay in the cache (the 16 class shares of a window do not),
        # and a channel that is zero everywhere stays zero (the share of a class the window
        # lacks): it is not swept. Same bits: the sweeps are elementwise per channel.
        live = (fill != 0).flatten(2).any(2).any(0).nonzero()[:, 0]
        out = torch.zeros_like(fill)
        if len(live):
            swept = fill.index_select(1, live).split(DENSE_SWEEP_CHANNELS, 1)
            out[:, live] = torch.cat([_dense_sweeps(part, known, iterations, rho) for part in swept], 1)
        return out
    return _dense_sweeps(fill, known, iterations, rho)


def _neighbour_mean(u: Tensor) -> Tensor:
    """Mean of the 4 neighbours; the image border mirrors its edge pixels (no flux across it)."""
    p = F.pad(u, (1, 1, 1, 1), mode="replicate")
    return (p[..., :-2, 1:-1] + p[..., 2:, 1:-1] + p[..., 1:-1, :-2] + p[..., 1:-1, 2:]) * 0.25


def _mirror_edges(p: Tensor | np.ndarray) -> None:
    """Set the one-pixel border of ``p`` [..., h + 2, w + 2] to the edge of its inside (what
    ``replicate`` padding gives; the corners are never read)."""
    p[..., 0, 1:-1] = p[..., 1, 1:-1]
    p[..., -1, 1:-1] = p[..., -2, 1:-1]
    p[..., 1:-1, 0] = p[..., 1:-1, 1]
    p[..., 1:-1, -1] = p[..., 1:-1, -2]


def _dense_sweeps(fill: Tensor, known: Tensor, iterations: int, rho: float) -> Tensor:
    """`harmonic_fill`'s sweeps over every pixel of ``fill``.

    Each sweep is prev + omega * (the Jacobi sweep on the hole pixels - prev), the Jacobi sweep
    being the `_neighbour_mean`. Without autograd the iterates live inside three padded buffers
    used in turn, so a sweep reads its neighbours without padding a copy and allocates nothing:
    the same operations in the same order.
    """
    n, c, h, w = fill.shape
    hole = 1 - known
    if torch.is_grad_enabled() and (fill.requires_grad or known.requires_grad):
        # Autograd (training, the receptive-field probe) keeps every iterate: fresh tensors.
        x = prev = fill
        for omega in _omegas(iterations, rho):
            nxt = _neighbour_mean(x).sub_(x).mul_(hole).add_(x).sub_(prev).mul_(omega).add_(prev)
            prev, x = x, nxt
        return x
    pads = [fill.new_empty(n, c, h + 2, w + 2) for _ in range(3)]
    p = pads[0]
    x = p[..., 1:-1, 1:-1]
    x.copy_(fill)
    _mirror_edges(p)
    prev = x
    for i, omega in enumerate(_omegas(iterations, rho)):
        q = pads[(i + 1) % 3]  # the buffer of the iterate before prev: free again
        nxt = torch.add(p[..., :-2, 1:-1], p[..., 2:, 1:-1], out=q[..., 1:-1, 1:-1])
        nxt.add_(p[..., 1:-1, :-2]).add_(p[..., 1:-1, 2:]).mul_(0.25)
        nxt.sub_(x).mul_(hole).add_(x).sub_(prev).mul_(omega).add_(prev)
        _mirror_edges(q)
        p, prev, x = q, x, nxt
    return x.contiguous() if iterations else fill


def _harmonic_fill_holes(fill: Tensor, known: Tensor, iterations: int, rho: float) -> Tensor:
    """`harmonic_fill` on the hole pixels alone: each sweep gathers their 4 neighbours (`_sweep_holes`).

    Many channels (the class shares) are swept as rows of pixels, so that a gather reads a
    pixel's channels together; a few (the colours) as planes, which saves the transposes.
    """
    n, c, h, w = fill.shape
    rows = c > DENSE_SWEEP_CHANNELS
    d = 0 if rows else 1  # the pixels' dimension of ``flat``
    # A copy (written in place); as rows, contiguous: a reshape of one image's planes can be a
    # view with the planes' strides, which clone() would keep.
    if rows:
        flat = fill.permute(0, 2, 3, 1).reshape(n * h * w, c).clone(memory_format=torch.contiguous_format)
    else:
        flat = fill.transpose(0, 1).reshape(c, n * h * w).clone()
    _sweep_holes(flat, d, *_hole_indices(known)[1:], iterations, rho)
    return flat.reshape(n, h, w, c).permute(0, 3, 1, 2) if rows else flat.reshape(c, n, h, w).transpose(0, 1)


def _hole_indices(known: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """For ``known`` [N, 1, H, W], the batch, row and column of each hole pixel, [K, 3] (in
    that order), their flat indices, [K], and those of their 4 neighbours, [4K] (up, down,
    left, right; the edge mirrored, as ``replicate`` padding does)."""
    n, _, h, w = known.shape
    where = (known[:, 0] == 0).nonzero()
    b, y, x = where.unbind(1)

    def at(yy: Tensor, xx: Tensor) -> Tensor:
        return (b * h + yy.clamp(0, h - 1)) * w + xx.clamp(0, w - 1)

    return where, at(y, x), torch.cat([at(y - 1, x), at(y + 1, x), at(y, x - 1), at(y, x + 1)])


def _sweep_holes(flat: Tensor, d: int, here: Tensor, around: Tensor, iterations: int, rho: float) -> Tensor:
    """`harmonic_fill`'s sweeps on the pixels ``here`` of ``flat`` (pixels along dimension ``d``),
    in place; returns their final values.

    The dense sweep leaves known pixels exactly as they are ((mean - x) * 0 + x - prev = 0
    there), so only holes change, and each reads its neighbours ``around``. The arithmetic per
    hole pixel is the dense one, op for op ((up + down) + left) + right, * 0.25, - x, + x,
    - prev, * omega, + prev), so the results are identical; the multiplication by the hole
    mask (1 there) is exact and left out.
    """
    cur = flat.index_select(d, here)
    prev = cur
    k = len(here)
    for omega in _omegas(iterations, rho):
        g = flat.index_select(d, around)  # one gather per sweep
        mean = g.narrow(d, 0, k).add(g.narrow(d, k, k)).add_(g.narrow(d, 2 * k, k)).add_(g.narrow(d, 3 * k, k)).mul_(0.25)
        nxt = mean.sub_(cur).add_(cur).sub_(prev).mul_(omega).add_(prev)
        flat.index_copy_(d, here, nxt)
        prev, cur = cur, nxt
    return cur


# -- the whole-image coarse context ----------------------------------------------------
# A cell of the coarse image counts as known (its mean colour kept) from this share of known
# pixels; below it its mean is blended with the fill from the level above.
COARSE_MIN_KNOWN = 0.3
# Jacobi sweeps of Laplace's equation per pyramid level, after the level above initialised it
# (nested iteration): a fixed count, so every process does the same operations.
COARSE_SWEEPS = 24
# The biharmonic coarse fill (`_biharmonic_cells`): Chebyshev iterations per pyramid level, tuned
# for holes up to BIHARMONIC_CELLS cells across at that level (the level above has solved the
# wider ones), and the weight of a partly known cell's mean against the smoothness. On the
# validation boxes, with the stage-10 network, 30 iterations and 100 gave the same hole PSNR
# within 0.01 dB, 15 lost 0.16 dB, and weights of 20, 80 and 320 were within 0.04 dB
# (`python bench/quality.py --split val --no-classical --model
# stage10.safetensors:coarse_biharmonic=true`, with these constants changed).
BIHARMONIC_ITERATIONS = 30
BIHARMONIC_CELLS = 8
BIHARMONIC_DATA_WEIGHT = 80.0


def coarse_sums(image: np.ndarray, mask: np.ndarray | None, scale: int, *, band: int = 256) -> np.ndarray:
    """Per ``scale`` x ``scale`` cell of a uint8 [H, W, 3] image, the int64 sums of its known
    pixels' colours and their count: [4, ceil(H/scale), ceil(W/scale)] (``mask`` True = missing).

    Integer sums are exact in any order, so cells may be summed by bands, tiles or processes
    and give the same numbers as `coarse_sums_of` on the float image. Reads the image in
    bands of ``band`` rows (a multiple of ``scale``): no full-size temporary.
    """
    if scale * scale * 255 >= 2**16:
        raise ValueError(f"coarse_scale {scale} too large for the uint16 cell sums (at most 16)")
    h, w = image.shape[:2]
    hc, wc = -(-h // scale), -(-w // scale)
    out = np.zeros((4, hc, wc), np.int64)
    band = max(scale, band - band % scale)
    for r0 in range(0, h, band):
        r1 = min(h, r0 + band)
        known = np.ones((r1 - r0, w), bool) if mask is None else ~mask[r0:r1]
        part = np.empty((r1 - r0, w, 4), np.uint16)
        np.multiply(image[r0:r1], known[..., None], out=part[..., :3])
        part[..., 3] = known
        # Cell sums by reduceat (ragged last cells included); at most 256 x 255 per cell: uint16 holds it.
        cells = np.add.reduceat(np.add.reduceat(part, np.arange(0, r1 - r0, scale), axis=0),
                                np.arange(0, w, scale), axis=1)
        out[:, r0 // scale : r0 // scale + cells.shape[0]] = cells.transpose(2, 0, 1)
    return out


def _cell_aligned(image: np.ndarray, mask: np.ndarray | None, dy: int, dx: int) -> tuple[np.ndarray, np.ndarray | None]:
    """``image`` and ``mask`` behind ``dy`` rows and ``dx`` columns of missing pixels, so that a
    block that starts inside a cell has its cells' edges where the whole image has them."""
    if not (dy or dx):
        return image, mask
    h, w = image.shape[:2]
    img = np.zeros((h + dy, w + dx, 3), np.uint8)
    img[dy:, dx:] = image
    m = np.ones((h + dy, w + dx), bool)
    m[dy:, dx:] = False if mask is None else mask
    return img, m


def coarse_sums_of(image: Tensor, mask: Tensor, scale: int) -> Tensor:
    """`coarse_sums` of float images [N, 3, H, W] in [0, 1] (mask [N, 1, H, W], 1 = missing):
    int64 [N, 4, hc, wc]. A colour is its uint8 value, round(255 x): what the engine reads."""
    n, _, h, w = image.shape
    with torch.no_grad():
        known = (mask < 0.5).double()
        x = torch.cat([(image.double() * 255).round() * known, known], 1)
        x = F.pad(x, (0, -w % scale, 0, -h % scale))
        hc, wc = x.shape[-2] // scale, x.shape[-1] // scale
        # Whole numbers below 2^53: exact in float64 in any order of summation.
        return x.reshape(n, 4, hc, scale, wc, scale).sum(dim=(3, 5)).round().long()


def palette_classes(rgb: Tensor, palette: Tensor) -> Tensor:
    """The index of the palette colour nearest each pixel (squared distance, the first on a tie):
    int64 [N, 1, H, W] for ``rgb`` [N, 3, H, W] and ``palette`` [K, 3], both holding whole numbers
    0-255 (uint8 values) in float32.

    Every partial sum is a whole number below 2^24, exact in float32 in any order: the engine's
    uint8 windows, a whole-image forward and the coarse context's bands give the same classes.
    """
    with torch.autocast(rgb.device.type, enabled=False):
        palette = palette.float()
        # |x - p|^2 less |x|^2, the same for every class: -2 x.p + |p|^2, one 1x1 convolution.
        d2 = F.conv2d(rgb.float(), -2 * palette[:, :, None, None], (palette * palette).sum(1))
    return first_extreme(d2, largest=False, keepdim=True)


def class_counts(image: np.ndarray, mask: np.ndarray | None, scale: int, palette: np.ndarray, *,
                 band: int = 256) -> np.ndarray:
    """Per ``scale`` x ``scale`` cell of a uint8 [H, W, 3] image, how many known pixels have each
    palette class (`palette_classes`), and how many are known: int64 [K + 1, hc, wc].

    Read in bands of ``band`` rows (rounded to a multiple of ``scale``), classified a few rows at
    a time: no full-size temporary. Whole numbers: the same as `class_counts_of`.
    """
    h, w = image.shape[:2]
    k = len(palette)
    hc, wc = -(-h // scale), -(-w // scale)
    out = np.zeros((k + 1, hc, wc), np.int64)
    pal = torch.as_tensor(np.asarray(palette), dtype=torch.float32)
    band = max(scale, band - band % scale)
    step = max(1, (1 << 18) // max(w, 1))  # rows classified at once: [K, rows, W] float32 distances, ~16 MB
    cell_col = np.arange(w) // scale
    for r0 in range(0, h, band):
        r1 = min(h, r0 + band)
        cls = np.empty((r1 - r0, w), np.int64)
        for a in range(r0, r1, step):
            b = min(r1, a + step)
            # A copy of the rows: the engine's image can be read-only (from_numpy of it would warn).
            rgb = torch.tensor(image[a:b]).permute(2, 0, 1)[None].float()
            cls[a - r0 : b - r0] = palette_classes(rgb, pal)[0, 0].numpy()
        known = np.ones((r1 - r0, w), bool) if mask is None else ~mask[r0:r1]
        cell = (np.arange(r0, r1) // scale - r0 // scale)[:, None] * wc + cell_col[None, :]
        rows = -(-(r1 - r0) // scale)
        per_class = np.bincount((cls * (rows * wc) + cell)[known], minlength=k * rows * wc).reshape(k, rows, wc)
        out[:k, r0 // scale : r0 // scale + rows] = per_class
        out[k, r0 // scale : r0 // scale + rows] = per_class.sum(0)
    return out


def class_counts_of(image: Tensor, mask: Tensor, scale: int, palette: Tensor) -> Tensor:
    """`class_counts` of float images [N, 3, H, W] in [0, 1] (mask [N, 1, H, W], 1 = missing):
    int64 [N, K + 1, hc, wc]; a colour is its uint8 value, round(255 x)."""
    n, _, h, w = image.shape
    k = palette.shape[0]
    with torch.no_grad():
        cls = palette_classes((image.float() * 255).round(), palette.float())
        known = (mask < 0.5).double()
        x = torch.cat([F.one_hot(cls[:, 0], k).permute(0, 3, 1, 2).double() * known, known], 1)
        x = F.pad(x, (0, -w % scale, 0, -h % scale))
        hc, wc = x.shape[-2] // scale, x.shape[-1] // scale
        return x.reshape(n, k + 1, hc, scale, wc, scale).sum(dim=(3, 5)).round().long()


def _sum2x2(t: Tensor) -> Tensor:
    """2x2 block sums of [..., h, w] (odd sizes padded with zeros)."""
    h, w = t.shape[-2:]
    t = F.pad(t, (0, w % 2, 0, h % 2))
    return t.unflatten(-2, (-1, 2)).unflatten(-1, (-1, 2)).sum(dim=(-3, -1))


def _np_neighbour_mean(u: np.ndarray) -> np.ndarray:
    """`_neighbour_mean` in numpy for [C, h, w]: the same operations in the same order."""
    p = np.pad(u, ((0, 0), (1, 1), (1, 1)), mode="edge")
    return (p[:, :-2, 1:-1] + p[:, 2:, 1:-1] + p[:, 1:-1, :-2] + p[:, 1:-1, 2:]) * 0.25


def _np_sum2x2(t: np.ndarray) -> np.ndarray:
    """2x2 block sums of [..., h, w] (odd sizes padded with zeros)."""
    h, w = t.shape[-2:]
    t = np.pad(t, [(0, 0)] * (t.ndim - 2) + [(0, h % 2), (0, w % 2)])
    return t.reshape(*t.shape[:-2], (h + 1) // 2, 2, (w + 1) // 2, 2).sum(axis=(-3, -1))


class _Laplacian:
    """The grid graph's Laplacian of [C, h, w] arrays of one shape (edges: no flux), symmetric:
    the sum of the neighbours' differences. Into buffers it keeps: no temporaries (at 2500^2
    cells, 150 MB each)."""

    def __init__(self, shape: tuple[int, ...], scratch: np.ndarray) -> None:
        c, h, w = shape
        self.pad = np.empty((c, h + 2, w + 2))
        self.scaled = scratch  # free between calls

    def __call__(self, u: np.ndarray, out: np.ndarray) -> np.ndarray:
        p = self.pad
        p[:, 1:-1, 1:-1] = u
        _mirror_edges(p)
        np.add(p[:, :-2, 1:-1], p[:, 2:, 1:-1], out=out)
        out += p[:, 1:-1, :-2]
        out += p[:, 1:-1, 2:]
        out -= np.multiply(4, u, out=self.scaled)
        return out


def _biharmonic_cells(u: np.ndarray, mean: np.ndarray, known: np.ndarray, iterations: int) -> np.ndarray:
    """``u`` [C, h, w], in place, relaxed towards the biharmonic fill of the cells that are not fully known
    (``known`` < 1; their share of known pixels, as in `coarse_fill`): the minimum of the squared
    Laplacian summed over every cell, plus BIHARMONIC_DATA_WEIGHT * k / (1 - k) times each partly
    known cell's squared distance to its ``mean``. Chebyshev iteration on that symmetric positive
    definite system, preconditioned by its interior diagonal, for the spectrum of a hole
    BIHARMONIC_CELLS cells across: no inner products, only elementwise float64 operations in a
    fixed order, so every process gets the same bits.
    """
    free = known < 1
    weight = np.where(free, BIHARMONIC_DATA_WEIGHT * known / np.maximum(1 - known, 1e-12), 0.0)
    diag = 20.0 + weight  # the squared Laplacian's diagonal is 20 inside the grid
    # Eigenvalues of diag^-1 A: up to 64 / 20 (the Laplacian's are up to 8); down to about
    # (2 pi^2 / n^2)^2 / 20 for the smoothest mode of an n x n hole.
    lo, hi = (2 * np.pi**2 / BIHARMONIC_CELLS**2) ** 2 / 20, 3.2
    theta, delta = (hi + lo) / 2, (hi - lo) / 2
    sigma = theta / delta
    rho = 1 / sigma
    # In place, into buffers kept across iterations: a 40,000^2 image has 2500^2 cells a channel.
    inner, ad, step = np.empty_like(u), np.empty_like(u), np.empty_like(u)
    laplacian = _Laplacian(u.shape, scratch=step)
    r = (-laplacian(laplacian(u, inner), ad) - weight * (u - mean)) * free
    d = r / diag / theta
    for _ in range(iterations):
        u += d
        laplacian(laplacian(d, inner), ad)
        ad += np.multiply(weight, d, out=step)
        ad *= free
        r -= ad
        rho_next = 1 / (2 * sigma - rho)
        d *= rho_next * rho
        np.divide(r, diag, out=step)
        step *= 2 * rho_next / delta
        d += step
        rho = rho_next
    return u


def coarse_fill(sums: Tensor | np.ndarray, height: int, width: int, scale: int, sweeps: int = COARSE_SWEEPS, *,
                empty: float = 127.5, unit: float = 255.0, biharmonic: bool = False) -> Tensor:
    """The coarse image of cell sums ``sums`` [C + 1, hc, wc] (`coarse_sums`: colours, then the
    known count; `class_counts`: class counts, then the known count) with every hole filled:
    float64 [C, hc, wc], the cell means divided by ``unit`` (colours in [0, 1], class shares);
    ``empty`` where nothing at all is known.

    A converged harmonic fill by nested iteration: a pyramid of the sums (2x2 block sums,
    whole numbers, exact), the top's mean, then at each finer level the level above
    upsampled, blended with the cell means by their share of known pixels
    (`COARSE_MIN_KNOWN`), and ``sweeps`` Jacobi sweeps that relax the cells that are not
    fully known. ``biharmonic``: then each level's biharmonic fill (`_biharmonic_cells`),
    clipped to [0, ``unit``]. Elementwise float64 numpy operations in a fixed order and number:
    every process computing it from the same sums gets the same bits.
    """
    sums = (sums.cpu().numpy() if isinstance(sums, Tensor) else np.asarray(sums)).astype(np.float64)
    hc, wc = sums.shape[-2:]
    rows = np.minimum(height - np.arange(hc) * scale, scale).astype(np.float64)
    cols = np.minimum(width - np.arange(wc) * scale, scale).astype(np.float64)
    levels = [(sums, rows[:, None] * cols[None, :])]
    while max(levels[-1][1].shape) > 1:
        s, t = levels[-1]
        levels.append((_np_sum2x2(s), _np_sum2x2(t)))
    del sums  # each level's sums go once its means are taken
    u = None
    while levels:
        s, total = levels.pop()
        count = s[-1]
        mean = s[:-1] / np.maximum(count, 1)
        if u is None:
            u = np.where(count > 0, mean, empty)
            continue
        a = np.clip(count / np.maximum(total * COARSE_MIN_KNOWN, 1e-9), 0, 1)
        del s, count, total
        # A fully known cell keeps its mean. The others change, each seeing its neighbours up to
        # 2 cells away (the biharmonic's Laplacian of the Laplacian): the level above is
        # upsampled, and the sweeps run, on their bounding box widened by 2 alone, with the same
        # bits as on the whole level. A 40,000^2 scene has 2500^2 cells a channel: without holes
        # the fill is the cell means (python bench/context_cost.py --fill-only --size 40000).
        box = _holes_box(torch.from_numpy(a == 1)[None, None], 2)
        coarser, u = u, mean
        if box is None:
            continue
        y0, y1, x0, x1 = box
        a, mean = a[y0:y1, x0:x1], mean[:, y0:y1, x0:x1]
        up = coarser[:, y0 // 2 : (y1 + 1) // 2, x0 // 2 : (x1 + 1) // 2].repeat(2, axis=1).repeat(2, axis=2)
        up = up[:, y0 % 2 : y0 % 2 + y1 - y0, x0 % 2 : x0 % 2 + x1 - x0]
        held = a * mean
        free = 1 - a
        v = held + free * up
        del up, coarser
        for _ in range(sweeps):
            v = held + free * _np_neighbour_mean(v)
        del held, free
        if biharmonic:
            v = np.clip(_biharmonic_cells(v, mean, a, BIHARMONIC_ITERATIONS), 0, unit)
        u[:, y0:y1, x0:x1] = v
    u /= unit
    return torch.from_numpy(u)


def blocky_far_field(context: Tensor, y0: int, y1: int, x0: int, x1: int, scale: int, block: int = 4) -> Tensor:
    """`far_field` taken once per ``block`` x ``block`` block of whole-image pixels (at the block's
    centre) and repeated over it: [C, y1-y0, x1-x0], still a function of position alone, at
    1/block^2 of the interpolation (the class shares: 16 channels)."""
    coarse, by0, bx0 = _far_blocks(context, y0, y1, x0, x1, scale, block)
    full = coarse.repeat_interleave(block, 1).repeat_interleave(block, 2)
    return full[:, y0 - by0 * block : y1 - by0 * block, x0 - bx0 * block : x1 - bx0 * block]


def blocky_far_field_at(context: Tensor, y0: int, y1: int, x0: int, x1: int, scale: int, ys: Tensor, xs: Tensor,
                        block: int = 4) -> Tensor:
    """`blocky_far_field` of the region at its pixels (``ys``, ``xs``) (region coordinates) only:
    [len(ys), C], the same values."""
    coarse, by0, bx0 = _far_blocks(context, y0, y1, x0, x1, scale, block)
    return coarse[:, (ys + y0) // block - by0, (xs + x0) // block - bx0].t()


def _far_blocks(context: Tensor, y0: int, y1: int, x0: int, x1: int, scale: int, block: int) -> tuple[Tensor, int, int]:
    """`far_field` at the centres of the ``block`` x ``block`` blocks that cover the region, and
    the first block's row and column."""
    by0, bx0 = y0 // block, x0 // block
    return far_field(context, by0, -(-y1 // block), bx0, -(-x1 // block), scale // block), by0, bx0


def far_field(context: Tensor, y0: int, y1: int, x0: int, x1: int, scale: int) -> Tensor:
    """Pixels [y0, y1) x [x0, x1) (whole-image coordinates) of the coarse image ``context``
    [C, hc, wc] upsampled bilinearly (cell centres at scale * (i + 1/2), edges clamped): [C, y1-y0, x1-x0].

    A pixel's value is a function of its position in the image alone (the same elementwise
    operations on the same cells), so a tile's window gets the bits the whole image would.
    """
    hc, wc = context.shape[-2:]

    def taps(a: int, b: int, n: int):
        t = (torch.arange(a, b, dtype=torch.float64, device=context.device) + 0.5) / scale - 0.5
        i0 = t.floor()
        f = t - i0
        i0 = i0.long()
        return i0.clamp(0, n - 1), (i0 + 1).clamp(0, n - 1), f

    r0, r1, fy = taps(y0, y1, hc)
    c0, c1, fx = taps(x0, x1, wc)
    lo, hi = int(c0.min()), int(c1.max()) + 1  # only the columns these pixels read
    band = context[:, :, lo:hi]
    rows = band[:, r0] * (1 - fy)[:, None] + band[:, r1] * fy[:, None]
    return rows[:, :, c0 - lo] * (1 - fx) + rows[:, :, c1 - lo] * fx


class Encoder(nn.Module):
    """Convolutions + pooling: full-res skip, half-res skip, quarter-res features z."""

    def __init__(self, cfg: TileNetConfig) -> None:
        super().__init__()
        self.stem = _conv(4, cfg.stem)
        self.down1 = _conv(cfg.stem, cfg.mid)
        self.down2a = _conv(cfg.mid, cfg.width)
        self.down2b = _conv(cfg.width, cfg.width)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        s0 = F.relu(self.stem(x), inplace=True)
        s1 = F.relu(self.down1(F.avg_pool2d(s0, 2)), inplace=True)
        z = F.relu(self.down2a(F.avg_pool2d(s1, 2)), inplace=True)
        z = F.relu(self.down2b(z), inplace=True)
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
        # FiLM: the global vector scales and shifts every feature cell alike. One image's vector
        # at a time: a batch of one runs the Linear layers on a matrix-vector kernel, a bigger
        # batch on a matrix-matrix one, and the two round differently (MKL; the engine's
        # batches of 1 and 8 were apart in the last bits of every tile).
        gamma, beta = torch.cat([self.global_mlp(row) for row in g.split(1)])[:, :, None, None].chunk(2, dim=1)
        h = z * (1 + gamma) + beta
        for conv in self.convs:
            h = F.relu(conv(h), inplace=True)
        return h, _conv1x1([h], self.logits.weight, self.logits.bias)


class Generator(nn.Module):
    """Local detail from z and the predictor's class distribution."""

    def __init__(self, cfg: TileNetConfig) -> None:
        super().__init__()
        self.inp = nn.Conv2d(cfg.width * 2 + cfg.classes, cfg.width, 1)
        self.convs = nn.ModuleList(_conv(cfg.width, cfg.width, d) for d in cfg.generator_dilations)

    def forward(self, z: Tensor, h: Tensor, logits: Tensor) -> Tensor:
        # The softmax over NHWC's innermost axis: ``softmax(1)`` would return NCHW.
        probs = logits.permute(0, 2, 3, 1).softmax(-1).permute(0, 3, 1, 2)
        x = F.relu(_conv1x1([z, h, probs], self.inp.weight, self.inp.bias), inplace=True)
        for conv in self.convs:
            x = x + F.relu(conv(x), inplace=True)
        return x


class Decoder(nn.Module):
    """Upsample to full resolution; RGB and per-pixel class logits."""

    def __init__(self, cfg: TileNetConfig) -> None:
        super().__init__()
        self.residual = bool(cfg.prefill_radii)
        self.up1 = _conv(cfg.width + cfg.mid, cfg.mid)
        self.up0 = _conv(cfg.mid + cfg.stem + (3 if self.residual else 0), cfg.stem)
        self.rgb = nn.Conv2d(cfg.stem, 3, 1)
        self.cls = nn.Conv2d(cfg.stem, cfg.classes, 1)
        if cfg.class_prior:
            if not self.residual:
                raise ValueError("class_prior needs prefill_radii")
            self.prior_scale = nn.Parameter(torch.ones(()))
        if self.residual:
            # Zero-init (as torchvision's zero_init_residual): an untrained model outputs
            # the pre-fill itself, and training learns corrections to it.
            nn.init.zeros_(self.rgb.weight)
            nn.init.zeros_(self.rgb.bias)

    def half(self, x: Tensor, s1: Tensor) -> Tensor:
        """Quarter-res features x -> half-res features (x upsampled, joined with the skip s1)."""
        return F.relu(_conv_of_cat(self.up1, [s1], coarse=x), inplace=True)

    def full(self, x: Tensor, s0: Tensor, fill: Tensor | None) -> Tensor:
        """Half-res features x -> full-res features (x upsampled, joined with s0 and the pre-fill)."""
        # The pre-fill enters only this last 3x3 layer, so its radius adds just 1 pixel
        # to its own and stays inside the network's receptive field.
        return F.relu(_conv_of_cat(self.up0, [s0, fill] if self.residual else [s0], coarse=x), inplace=True)

    def heads(self, x: Tensor, coarse_logits: Tensor, fill: Tensor | None,
              reach: Tensor | None = None, idle: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
        """Full-res features -> (class logits, RGB, the RGB correction's idle part); coarse_logits
        at quarter res; ``reach``: the weight of the RGB correction (where the pre-fill comes from
        the far field, the network sees no known pixel and the fill stands). The idle part, asked
        for with ``idle`` (training) and a weight: |correction| x (1 - reach), what the weight
        leaves out; else None."""
        k = self.cls.out_channels
        both = _conv1x1([x], torch.cat([self.cls.weight, self.rgb.weight]), torch.cat([self.cls.bias, self.rgb.bias]))
        logits, rgb = both[:, :k], both[:, k:]
        # + the coarse logits upsampled 4x (nearest), as a broadcast over 4x4 blocks: no upsampled copy.
        q = coarse_logits.shape[-2:]
        logits.unflatten(2, (q[0], 4)).unflatten(4, (q[1], 4)).add_(coarse_logits[:, :, :, None, :, None])
        unused = None
        if self.residual:
            if reach is not None:
                if idle:
                    unused = rgb.abs() * (1 - reach)
                rgb = rgb * reach
            rgb = (fill + rgb).clamp(0, 1)
        else:
            rgb = torch.sigmoid(rgb)
        return logits, rgb, unused


Box = tuple[int, int, int, int]  # y0, y1, x0, x1 in full-resolution pixels


def _sub(t: Tensor, outer: Box, inner: Box, scale: int) -> Tensor:
    """The part of ``t`` (covering ``outer`` at 1/``scale`` resolution) that covers ``inner``."""
    return t[..., (inner[0] - outer[0]) // scale : (inner[1] - outer[0]) // scale,
             (inner[2] - outer[2]) // scale : (inner[3] - outer[2]) // scale]


class TileNet(nn.Module):
    """``logits, rgb = model(image, mask)``; see the module docstring for shapes."""

    stride = 4

    def __init__(self, cfg: TileNetConfig | None = None, palette: list[tuple[int, int, int]] | None = None) -> None:
        super().__init__()
        self.cfg = cfg or TileNetConfig()
        self.palette = palette or default_palette(self.cfg.classes)
        if len(self.palette) != self.cfg.classes:
            raise ValueError(f"palette has {len(self.palette)} colours for {self.cfg.classes} classes")
        if self.cfg.class_fill and not self.cfg.class_prior:
            raise ValueError("class_fill is a source of the class prior: it needs class_prior")
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
        n, _, h, w = image.shape
        ph, pw = -h % self.stride, -w % self.stride
        # Written in place into one buffer in the image's layout: torch.cat of an NHWC image
        # and a one-channel mask, then a pad, copied the window twice more (~3 ms on CPU).
        layout = torch.channels_last if image.stride(1) == 1 else torch.contiguous_format
        x = torch.empty((n, 4, h + ph, w + pw), dtype=image.dtype, device=image.device, memory_format=layout)
        x[:, :3, :h, :w] = image * (1 - mask)  # (out= would not carry gradients: the probe, training)
        x[:, 3:, :h, :w] = mask
        if ph or pw:
            x[:, :3, h:, :] = 0
            x[:, :3, :, w:] = 0
            x[:, 3:, h:, :] = 1
            x[:, 3:, :, w:] = 1
        return x, x[:, 3:]

    def _terms(self, z: Tensor, mask: Tensor) -> Tensor:
        known = 1 - F.avg_pool2d(mask, self.stride)
        n, c, h, w = z.shape
        layout = torch.channels_last if z.stride(1) == 1 else torch.contiguous_format
        terms = torch.empty((n, c + 1, h, w), dtype=z.dtype, device=z.device, memory_format=layout)
        terms[:, :c] = z * known  # torch.cat of mixed layouts copied slowly
        terms[:, c:] = known
        return terms

    def _palette_on(self, like: Tensor) -> Tensor:
        """The palette as [K, 3] in [0, 1], made once per device and dtype: ``torch.tensor`` on
        a CUDA device copies from pageable memory and so waits for the whole queue, which
        stalled the engine's pipeline once a forward (bench/engine_vs_whole.py --device cuda --profile)."""
        key = (like.device, like.dtype, tuple(map(tuple, self.palette)))
        cached = getattr(self, "_palette_cache", None)
        if cached is None or cached[0] != key:
            cached = self._palette_cache = (key, torch.tensor(self.palette, dtype=like.dtype, device=like.device) / 255)
        return cached[1]

    def _nearest_class(self, fill: Tensor) -> Tensor:
        """Per pixel, the palette class nearest to its colour: int64 [N, 1, H, W]."""
        pal = self._palette_on(fill)
        # fp32 even under autocast: in bf16 the cancellation in |f|^2 - 2 f.p + |p|^2 would
        # move pixels to a neighbouring class.
        with torch.autocast(fill.device.type, enabled=False):
            d2 = ((fill**2).sum(1, keepdim=True) - 2 * F.conv2d(fill, pal[:, :, None, None])
                  + (pal**2).sum(1)[None, :, None, None])
        return first_extreme(d2, largest=False, keepdim=True)

    def _add_class_prior(self, logits: Tensor, own: Tensor) -> Tensor:
        """``logits + prior_scale * log P(class)``, P one-hot on class ``own`` ([N, 1, H, W]) with a
        floor of 1e-4.

        A known pixel keeps its own class; a hole starts from the class of its pre-fill: the
        class of the fill colour, or with ``class_fill`` the most frequent class of the filled
        class shares. Hard like the one-hot it replaces: a soft version (log-softmax of colour
        distances) let training shrink ``prior_scale`` and the network's own guesses in holes,
        which did not carry over to unseen photos, fell below both.
        The floor's term is added everywhere and the own class's logit put back (its
        prior is 0): the same values as adding the whole prior, without building it.
        """
        floor = self.decoder.prior_scale * math.log(1e-4)
        return (logits + floor).scatter_(1, own, logits.gather(1, own))

    def _filled_classes(self, pixels: Tensor, known: Tensor, far: list[tuple] | None, outer: Box, inner: Box) -> Tensor:
        """With ``class_fill``, the class prior's class per pixel of ``inner``: int64 [N, 1, h, w]
        (``pixels`` and ``known`` cover ``outer``).

        A known pixel's own class (`palette_classes` of its uint8 colour). In the holes, the
        known pixels' classes as one-hot shares, the holes starting from the far field's shares
        (``far``: per window the `far_field` arguments of the region, taken once per 4 x 4 block),
        relaxed by as many harmonic sweeps as the colours; then the largest share. (Local means of
        the shares first, as for the colours, scored 0.2-0.6 points higher on the validation photos
        for 2x the cost; docs/model.md.)
        """
        own = palette_classes((pixels * 255).round(), (self._palette_on(pixels) * 255).round())
        if known.device.type == "cpu" and bool(known.all()):  # (CPU: the test would make the host wait for a GPU)
            return _sub(own, outer, inner, 1)
        n, _, h, w = own.shape
        if known.device.type == "cpu" and (1 - known).mean() < SPARSE_SWEEPS_BELOW:
            return _sub(self._filled_classes_of_holes(own, known, far), outer, inner, 1)
        shares = torch.zeros((n, self.cfg.classes, h, w), dtype=pixels.dtype, device=pixels.device).scatter_(1, own, 1.0)
        if far is None:
            shares = shares * known
        else:
            shares = torch.where(known.bool(), shares, torch.stack([blocky_far_field(*f) for f in far]).to(shares))
        shares = harmonic_fill(shares, known, self.cfg.prefill_iterations)
        return first_extreme(_sub(shares, outer, inner, 1), largest=True, keepdim=True)

    def _filled_classes_of_holes(self, own: Tensor, known: Tensor, far: list[tuple] | None) -> Tensor:
        """`_filled_classes` for few holes (CPU): the class shares as rows of pixels, the far field
        and the largest share taken at the holes alone. The same values at the holes, and the
        same bits (`_sweep_holes`): no 16-channel image is built, filled, swept whole or reduced.
        """
        n, _, h, w = own.shape
        where, here, around = _hole_indices(known)
        flat_own = own.permute(0, 2, 3, 1).reshape(n * h * w, 1)
        rows = torch.zeros((n * h * w, self.cfg.classes), dtype=known.dtype).scatter_(1, flat_own, 1.0)
        if far is None:
            rows.index_fill_(0, here, 0.0)
        else:
            b, y, x = where.unbind(1)
            rows.index_copy_(0, here, torch.cat([blocky_far_field_at(*f, y[b == i], x[b == i]) for i, f in enumerate(far)])
                             .to(rows))
        best = first_extreme(_sweep_holes(rows, 0, here, around, self.cfg.prefill_iterations, HARMONIC_RHO), largest=True)
        out = flat_own[:, 0].clone()
        out[here] = best
        return out.view(n, h, w, 1).permute(0, 3, 1, 2)

    # -- the hooks used by the tiling engine ----------------------------------------
    def coarse_context(self, image: np.ndarray, mask: np.ndarray | None) -> Tensor | tuple[Tensor, Tensor] | None:
        """The whole-image context of a uint8 [H, W, 3] image (``mask`` True = missing) that
        `forward` takes as ``context``: its filled coarse image, float64 [1, 3, hc, wc], and with
        ``class_fill`` its filled class shares [1, K, hc / class_cells, wc / class_cells] too;
        None when the configuration has none. Reads the whole image; the engine instead adds up the
        `context_cells` of the tiles' cores in its pass 1 (`context_of_cells`), with the same bits."""
        if not self.cfg.coarse_scale:
            return None
        h, w = image.shape[:2]
        return self.context_of_cells([cells for _, _, cells in self.context_cells(image, mask)], h, w)

    def context_cells(self, image: np.ndarray, mask: np.ndarray | None, y0: int = 0,
                      x0: int = 0) -> list[tuple[int, int, np.ndarray]]:
        """What a block of the image at (``y0``, ``x0``) adds to the coarse context's cell sums:
        per cell grid (the colours' `coarse_sums`, then with ``class_fill`` the `class_counts`),
        the block's first cell (row, column) and its sums, uint16 [C + 1, rows, cols].

        Whole numbers, so the blocks of any partition of the image (the tiles' cores, whichever
        process computed them) add up to the whole image's sums exactly, in any order. A cell
        holds at most 64^2 pixels (255 x 16^2 for a colour sum): any part of it fits uint16.
        """
        s = self.cfg.coarse_scale
        out: list[tuple[int, int, np.ndarray]] = []
        if not s:
            return out
        grids = [(s, lambda img, m: coarse_sums(img, m, s))]
        if self.cfg.class_fill:
            cs = self.cfg.class_scale
            palette = np.asarray(self.palette)
            grids.append((cs, lambda img, m: class_counts(img, m, cs, palette)))
        for scale, sums in grids:
            img, m = _cell_aligned(image, mask, y0 % scale, x0 % scale)
            out.append((y0 // scale, x0 // scale, sums(img, m).astype(np.uint16)))
        return out

    def context_of_cells(self, cells: list[np.ndarray], height: int, width: int) -> Tensor | tuple[Tensor, Tensor]:
        """`coarse_context` of a ``height`` x ``width`` image from its whole cell sums, one array
        per grid of `context_cells` (any integer dtype)."""
        s = self.cfg.coarse_scale
        colours = coarse_fill(cells[0], height, width, s, biharmonic=self.cfg.coarse_biharmonic)[None]
        if not self.cfg.class_fill:
            return colours
        return colours, coarse_fill(cells[1], height, width, self.cfg.class_scale, empty=0.0, unit=1.0)[None]

    def context_grids(self, height: int, width: int) -> list[tuple[int, ...]]:
        """The shapes of the whole cell sums `context_of_cells` takes for a ``height`` x ``width`` image."""
        s = self.cfg.coarse_scale
        if not s:
            return []
        grids = [(4, s)] + ([(len(self.palette) + 1, self.cfg.class_scale)] if self.cfg.class_fill else [])
        return [(c, -(-height // scale), -(-width // scale)) for c, scale in grids]

    def _context_of(self, image: Tensor, mask: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        """`coarse_context` of a float batch, computed by the forward of a whole image."""
        s = self.cfg.coarse_scale
        h, w = image.shape[-2:]
        colours = torch.stack([coarse_fill(c, h, w, s, biharmonic=self.cfg.coarse_biharmonic)
                               for c in coarse_sums_of(image, mask, s)])
        if not self.cfg.class_fill:
            return colours
        cs = self.cfg.class_scale
        pal = torch.tensor(self.palette, dtype=torch.float32, device=image.device)
        counts = class_counts_of(image, mask, cs, pal)
        return colours, torch.stack([coarse_fill(c, h, w, cs, empty=0.0, unit=1.0) for c in counts])

    def encode(self, image: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The encoder's features of ``image`` (s0, s1, z): the first thing both `global_terms`
        and `forward` compute. The engine hands pass 1's to pass 2 (``features=``) instead of
        running the encoder twice on a window."""
        x, _ = self._prepare(image, mask)
        return self.encoder(x)

    def global_terms(self, image: Tensor, mask: Tensor, features: tuple[Tensor, ...] | None = None) -> Tensor:
        """Per feature cell (stride ``self.stride``), additive terms of the global summary;
        ``features``: `encode`'s of the same input, if already computed."""
        x, m = self._prepare(image, mask)
        _, _, z = self.encoder(x) if features is None else features
        return self._terms(z, m)

    def margins(self) -> dict[str, int]:
        """Per stage, how far beyond the wanted outputs its input region must reach for them
        to be exact (full-res pixels, rounded up to the stride): each 3x3 convolution
        adds its dilation in cells of its own resolution, each pre-fill sweep one pixel."""
        s, cfg = self.stride, self.cfg
        up0 = 1  # the full-res 3x3
        up1 = 2 * (-(-up0 // 2) + 1)  # the half-res 3x3, in pixels
        gen = 4 * (-(-up1 // 4) + sum(cfg.generator_dilations))  # quarter-res 3x3s (its 1x1 adds none)
        pred = gen + 4 * sum(cfg.predictor_dilations)
        harmonic = up0 + cfg.prefill_iterations
        local = harmonic + 2 * max(cfg.prefill_radii, default=0)
        if cfg.slope_radii:  # the slopes' differences and tents, around the decoder's region
            local = max(local, up0 + 1 + 2 * max(cfg.slope_radii))
        raw = {"up0": up0, "up1": up1, "gen": gen, "pred": pred, "harmonic": harmonic, "local": local}
        return {k: round_up(v, s) for k, v in raw.items()}

    def forward(self, image: Tensor, mask: Tensor, global_sums: Tensor | None = None,
                out_box: Box | None = None, features: tuple[Tensor, ...] | None = None,
                context: Tensor | None = None, origin: list[tuple[int, int]] | None = None,
                terms: dict[str, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """``(logits, rgb)`` for ``image``; with ``out_box = (y0, y1, x0, x1)`` only that part of them;
        ``features``: `encode`'s of the same input, if already computed; ``terms``: a dict that
        training gets its extra loss terms in (``idle_correction``: the mean over the holes of
        what the RGB correction's weight leaves out, `Decoder.heads`).

        The encoder runs on the whole input; each later stage only on the outputs'
        region plus what the stages after it reach (`margins`). For a tile's window
        the costly full-resolution decoder then runs on the core alone instead of
        core + halo, with the same values there (zero padding at the cropped edges
        touches only pixels that are dropped). ``y0`` and ``x0`` must be multiples of
        the stride. ``context``: the whole image's `coarse_context` ([1 or N, 3, hc, wc]) when
        ``image`` is a window of it, ``origin`` the window's (y, x) in the image (per batch
        item); without it, a whole-image forward computes its own.
        """
        h, w = image.shape[-2:]
        y0, y1, x0, x1 = out_box = (0, h, 0, w) if out_box is None else tuple(out_box)
        if not (0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w) or y0 % self.stride or x0 % self.stride:
            raise ValueError(f"out_box {out_box} must lie in the {h}x{w} input, starting at multiples of {self.stride}")
        x, m = self._prepare(image, mask)
        s0, s1, z = self.encoder(x) if features is None else features
        if global_sums is None:
            global_sums = self._terms(z, m).sum(dim=(2, 3))
        c = self.cfg.width
        # A masked mean: the features of known pixels, averaged over the whole image.
        g = global_sums[:, :c] / global_sums[:, c:].clamp_min(1e-6)

        hp, wp = x.shape[-2:]
        whole: Box = (0, hp, 0, wp)
        want: Box = (y0, round_up(y1, self.stride), x0, round_up(x1, self.stride))

        def region(margin: int) -> Box:
            return (max(0, want[0] - margin), min(hp, want[1] + margin), max(0, want[2] - margin), min(wp, want[3] + margin))

        mg = self.margins()
        r_pred, r_gen, r_up1, r_up0 = region(mg["pred"]), region(mg["gen"]), region(mg["up1"]), region(mg["up0"])
        zp = _sub(z, whole, r_pred, 4)
        hfeat, coarse = self.predictor(zp, g)
        detail = self.generator(*(_sub(t, r_pred, r_gen, 4) for t in (zp, hfeat, coarse)))
        fill = reach = None
        if self.cfg.prefill_radii:
            r_local, r_harm = region(mg["local"]), region(mg["harmonic"])
            known = _sub(1 - m, whole, r_local, 1)  # once, on the widest region the pre-fill reads
            far = far_classes = None
            if self.cfg.coarse_scale:
                if context is None:
                    context = self._context_of(image, mask)
                parts = context if isinstance(context, tuple) else (context,)
                origin = origin or [(0, 0)] * x.shape[0]

                def far_of(part: Tensor, scale: int, upsample: Callable[..., Tensor]) -> Callable[[], Tensor]:
                    def far() -> Tensor:
                        return torch.stack([upsample(part[min(i, part.shape[0] - 1)], oy + r_local[0], oy + r_local[1],
                                                     ox + r_local[2], ox + r_local[3], scale)
                                            for i, (oy, ox) in enumerate(origin)]).to(x)
                    return far

                far = far_of(parts[0], self.cfg.coarse_scale, far_field)
                if self.cfg.class_fill:
                    # Per window, the class shares' far field once per 4 x 4 block over the swept region.
                    cs = self.cfg.class_scale
                    far_classes = [(parts[1][min(i, parts[1].shape[0] - 1)], oy + r_harm[0], oy + r_harm[1],
                                    ox + r_harm[2], ox + r_harm[3], cs) for i, (oy, ox) in enumerate(origin)]

            pixels = _sub(x[:, :3], whole, r_local, 1)
            fill, reach = local_fill(pixels, known, self.cfg.prefill_radii, far, with_reach=True)
            if reach is not None:
                reach = _sub(reach, r_local, r_up0, 1)
            fill = _sub(fill, r_local, r_harm, 1)
            if self.cfg.prefill_iterations:
                fill = harmonic_fill(fill, _sub(known, r_local, r_harm, 1), self.cfg.prefill_iterations)
            fill = _sub(fill, r_harm, r_up0, 1)
            if self.cfg.slope_radii:
                r_slope = region(mg["up0"] + 1 + 2 * max(self.cfg.slope_radii))
                slopes = slope_fill(_sub(pixels, r_local, r_slope, 1), _sub(known, r_local, r_slope, 1),
                                    self.cfg.slope_radii)
                fill = fill + self.cfg.slope_weight * _sub(slopes, r_slope, r_up0, 1)
            if self.cfg.class_fill:
                prior = self._filled_classes(_sub(pixels, r_local, r_harm, 1), _sub(known, r_local, r_harm, 1),
                                             far_classes, r_harm, r_up0)
            elif self.cfg.class_prior:
                prior = self._nearest_class(fill)
        dec = self.decoder
        feat = dec.half(_sub(detail, r_gen, r_up1, 4), _sub(s1, whole, r_up1, 2))
        feat = dec.full(_sub(feat, r_up1, r_up0, 2), _sub(s0, whole, r_up0, 1), fill)
        # The 1x1 heads on the whole (contiguous) up0 region, then cropped: cheaper than
        # copying a strided view of its features for each head.
        logits, rgb, unused = dec.heads(feat, _sub(coarse, r_pred, r_up0, 4), fill, reach, idle=terms is not None)
        if self.cfg.class_prior:
            logits = self._add_class_prior(logits, prior)
        oy, ox = y0 - r_up0[0], x0 - r_up0[2]
        logits, rgb = logits[..., oy : oy + y1 - y0, ox : ox + x1 - x0], rgb[..., oy : oy + y1 - y0, ox : ox + x1 - x0]
        known = 1 - m[..., y0:y1, x0:x1]
        if unused is not None:
            holes = (1 - known).expand_as(rgb)
            unused = unused[..., oy : oy + y1 - y0, ox : ox + x1 - x0]
            terms["idle_correction"] = (unused * holes).sum() / holes.sum().clamp_min(1)
        rgb = image[..., y0:y1, x0:x1] * known + rgb * (1 - known)  # known pixels pass through unchanged
        return logits, rgb


def default_palette(k: int) -> list[tuple[int, int, int]]:
    """Distinct colours for an untrained model (a trained one stores its k-means colours)."""
    import colorsys

    return [
        tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(i / max(k, 1), 0.65, 0.95 - 0.4 * (i % 2)))
        for i in range(k)
    ]
