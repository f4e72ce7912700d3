"""The heart of tilerun: tiled output == one whole-image forward.

Tolerances from the issue: class maps identical except float ties (<= 0.01% of pixels), RGB
within 1 grey level. Windows of different shapes run different float32 kernels, so bit-identity
is not promised; anything bigger than that is a halo, alignment or global-sum bug, and the
"too small" tests below prove the comparison is sharp enough to see one.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tilerun.engine import Engine, infer_image
from tilerun.receptive import ModelProbe, probe_model

MAX_TIE_FRACTION = 1e-4


def mismatch(a, b) -> tuple[float, int]:
    """(fraction of differing class pixels, max RGB difference in grey levels)."""
    (ca, ra), (cb, rb) = a, b
    assert ca.shape == cb.shape and ra.shape == rb.shape
    assert ca.dtype == np.uint8 and ra.dtype == np.uint8
    return float((ca != cb).mean()), int(np.abs(ra.astype(np.int16) - rb.astype(np.int16)).max())


def assert_exact(tiled, whole) -> None:
    frac, rgb = mismatch(tiled, whole)
    assert frac <= MAX_TIE_FRACTION, f"{frac:.4%} of class pixels differ"
    assert rgb <= 1, f"RGB differs by {rgb} grey levels"


def assert_differs(tiled, whole) -> None:
    frac, rgb = mismatch(tiled, whole)
    assert frac > MAX_TIE_FRACTION or rgb > 1, "a broken tiling went unnoticed: the test model is not sensitive enough"


@pytest.fixture(scope="module")
def engine(sensitive_model, sensitive_probe):
    # Small tiles and a batch: many tiles, several window shapes, fast.
    return Engine(sensitive_model, tile=64, batch_size=8, probe=sensitive_probe)


def test_the_test_model_is_sensitive(sensitive_model, make_image, make_holes, whole_forward):
    # A nearly constant model would make every exactness test below vacuous.
    img, holes = make_image(128, 128), make_holes(128, 128)
    classes, rgb = whole_forward(sensitive_model, img, holes)
    counts = np.bincount(classes.ravel(), minlength=sensitive_model.cfg.classes)
    assert (counts > 0.02 * classes.size).sum() >= 3, f"class map nearly constant: {counts}"
    assert rgb[holes].std() > 40, "filled pixels nearly constant"


@pytest.mark.parametrize("h,w", [(1, 1), (7, 300), (333, 517)])
def test_tiled_equals_whole_image(engine, sensitive_model, make_image, make_holes, whole_forward, h, w):
    img, holes = make_image(h, w, seed=h), make_holes(h, w, seed=w)
    assert_exact(infer_image(engine, img, holes), whole_forward(sensitive_model, img, holes))


def test_tiled_equals_whole_image_1000x999(sensitive_model, sensitive_probe, make_image, make_holes, whole_forward):
    # The big one once, with larger tiles than above to keep it quick (8x8 = 64 tiles).
    img, holes = make_image(1000, 999, seed=3), make_holes(1000, 999, seed=4)
    engine = Engine(sensitive_model, tile=128, batch_size=8, probe=sensitive_probe)
    assert len(engine.tiles(1000, 999)) == 64
    assert_exact(infer_image(engine, img, holes), whole_forward(sensitive_model, img, holes))


def test_tiled_equals_whole_image_with_the_trained_prefill(make_image, make_holes, whole_forward):
    # The architecture `tilerun train` ships: a local pre-fill of the holes, relaxed by harmonic
    # sweeps, enters the decoder. Large holes, so that its widest scales are in use.
    from conftest import build_sensitive_tilenet

    from tilerun.train import DEFAULT_PREFILL, DEFAULT_PREFILL_ITERATIONS

    model = build_sensitive_tilenet(prefill_radii=DEFAULT_PREFILL, prefill_iterations=DEFAULT_PREFILL_ITERATIONS)
    probe = probe_model(model)
    img, holes = make_image(170, 251, seed=16), make_holes(170, 251, seed=17)
    holes[60:160, 120:240] = True
    whole = whole_forward(model, img, holes)
    assert len(np.unique(whole[0])) >= 3 and whole[1][holes].std() > 20  # sensitive here too
    assert_exact(infer_image(Engine(model, tile=64, batch_size=8, probe=probe), img, holes), whole)


def test_no_mask_and_a_fully_missing_image(engine, sensitive_model, make_image, whole_forward):
    img = make_image(150, 97, seed=5)
    classes, rgb = infer_image(engine, img)
    assert np.array_equal(rgb, img)  # nothing missing: inpainted = input
    assert_exact((classes, rgb), whole_forward(sensitive_model, img))
    everything = np.ones((150, 97), bool)  # no known pixel: the global mean's denominator is 0
    assert_exact(infer_image(engine, img, everything), whole_forward(sensitive_model, img, everything))


def test_halo_one_stride_too_small_is_caught(sensitive_model, sensitive_probe, make_image, make_holes, whole_forward):
    # The proof that the exactness tests can fail: the measured halo minus one stride.
    img, holes = make_image(333, 517, seed=333), make_holes(333, 517, seed=517)
    whole = whole_forward(sensitive_model, img, holes)
    small = Engine(sensitive_model, tile=64, batch_size=8, halo=sensitive_probe.halo - sensitive_probe.stride, probe=sensitive_probe)
    assert small.halo == sensitive_probe.halo - sensitive_probe.stride
    assert_differs(infer_image(small, img, holes), whole)


def test_global_halo_one_stride_too_small_is_caught(sensitive_model, sensitive_probe, make_image, make_holes, whole_forward):
    # Pass 1 has its own (smaller) halo: shrinking it corrupts the whole-image global vector,
    # which then shifts every pixel of pass 2.
    img, holes = make_image(333, 517, seed=333), make_holes(333, 517, seed=517)
    whole = whole_forward(sensitive_model, img, holes)
    engine = Engine(sensitive_model, tile=64, batch_size=8, probe=sensitive_probe)
    assert engine.global_halo == sensitive_probe.global_halo
    engine.global_halo -= sensitive_probe.stride
    assert_differs(infer_image(engine, img, holes), whole)


def test_user_halo_larger_than_needed_is_still_exact(sensitive_model, sensitive_probe, make_image, make_holes, whole_forward):
    # --halo not a multiple of the stride: rounded up, never down.
    img, holes = make_image(200, 131, seed=6), make_holes(200, 131, seed=7)
    engine = Engine(sensitive_model, tile=32, batch_size=3, halo=sensitive_probe.halo + 1, probe=sensitive_probe)
    assert engine.halo == sensitive_probe.halo + sensitive_probe.stride
    assert_exact(infer_image(engine, img, holes), whole_forward(sensitive_model, img, holes))


class LocalOnly(nn.Module):
    """The sensitive TileNet with its global branch frozen to a constant: only ``model(image, mask)``,
    no ``global_terms``, so the engine must tile it by halo alone."""

    def __init__(self, net) -> None:
        super().__init__()
        self.net = net
        with torch.no_grad():
            g = net.global_terms(torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)), torch.zeros(1, 1, 16, 16))
        self.register_buffer("sums", g.sum((2, 3)))

    def forward(self, image, mask):
        return self.net(image, mask, global_sums=self.sums.to(image.dtype).expand(image.shape[0], -1))


def test_model_without_global_hook_is_halo_exact(make_image, make_holes, whole_forward):
    from conftest import build_sensitive_tilenet

    model = LocalOnly(build_sensitive_tilenet()).eval()
    probe = probe_model(model)
    assert not probe.has_global and (probe.stride, probe.halo) == (4, 40)
    img, holes = make_image(190, 263, seed=8), make_holes(190, 263, seed=9)
    whole = whole_forward(model, img, holes)
    engine = Engine(model, tile=64, batch_size=8, probe=probe)
    assert not engine.uses_global
    assert_exact(infer_image(engine, img, holes), whole)
    small = Engine(model, tile=64, batch_size=8, halo=probe.halo - probe.stride, probe=probe)
    assert_differs(infer_image(small, img, holes), whole)


class WindowPosition(nn.Module):
    """Outputs where each pixel sits in the window it was computed in (not tile-exact on purpose):
    RGB = (row, column, 0) within the window, class = (row + column) % 7."""

    def forward(self, image, mask):
        n, _, h, w = image.shape
        ys = torch.arange(h, dtype=image.dtype)[:, None].expand(h, w)
        xs = torch.arange(w, dtype=image.dtype)[None, :].expand(h, w)
        rgb = torch.stack([ys, xs, torch.zeros_like(ys)])[None].expand(n, -1, -1, -1) / 255
        logits = F.one_hot(((ys + xs) % 7).long(), 7).permute(2, 0, 1)[None].expand(n, -1, -1, -1).to(image.dtype)
        return logits, rgb


def test_every_core_pixel_comes_from_exactly_one_tile_at_the_right_place():
    h, w = 150, 230
    probe = ModelProbe(stride=4, radius=0, global_radius=None, has_global=False)  # declared: the probe would refuse it
    engine = Engine(WindowPosition(), tile=64, halo=8, batch_size=4, probe=probe)
    tiles = engine.tiles(h, w)
    image, everything = np.zeros((h, w, 3), np.uint8), np.ones((h, w), bool)  # all missing: RGB is the model's
    count = np.zeros((h, w), int)
    expect_rgb = np.zeros((h, w, 3), np.uint8)
    expect_cls = np.zeros((h, w), np.uint8)
    for r in engine.compute(image, everything, tiles):
        t = r.tile
        count[t.y0 : t.y1, t.x0 : t.x1] += 1
        ys, xs = np.mgrid[t.y0 : t.y1, t.x0 : t.x1]
        expect_rgb[t.y0 : t.y1, t.x0 : t.x1, 0] = ys - t.wy0
        expect_rgb[t.y0 : t.y1, t.x0 : t.x1, 1] = xs - t.wx0
        expect_cls[t.y0 : t.y1, t.x0 : t.x1] = (ys - t.wy0 + xs - t.wx0) % 7
    assert count.min() == 1 and count.max() == 1
    # Interior tiles see the full halo, border tiles start at the image edge: both occur.
    inner = next(t for t in tiles if t.y0 > 0 and t.x0 > 0)
    assert expect_rgb[0, 0, 0] == 0 and tuple(expect_rgb[inner.y0, inner.x0, :2]) == (8, 8)
    classes, rgb = infer_image(engine, image, everything)
    assert np.array_equal(rgb, expect_rgb)
    assert np.array_equal(classes, expect_cls)


def test_rgb_under_holes_has_no_influence(engine, make_image, make_holes):
    img, holes = make_image(170, 140, seed=10), make_holes(170, 140, seed=11)
    noisy = img.copy()
    noisy[holes] = make_image(170, 140, seed=12)[holes]
    assert (noisy != img).any(axis=2)[holes].mean() > 0.9  # the fixture really changed the holes
    (ca, ra), (cb, rb) = infer_image(engine, img, holes), infer_image(engine, noisy, holes)
    assert np.array_equal(ca, cb) and np.array_equal(ra, rb)
    assert np.array_equal(ra[~holes], img[~holes])  # known pixels pass through exactly


@pytest.mark.parametrize("h,w", [(150, 190), (333, 517)])
def test_batch_size_does_not_change_the_bytes(sensitive_model, sensitive_probe, make_image, make_holes, h, w):
    # On CPU the same bytes, not just the tolerance: TileNet pins its convolutions to oneDNN
    # (ATen would run one small window on another kernel than a batch) and runs its global MLP
    # an image at a time (MKL's matrix-vector and matrix-matrix kernels round differently).
    # Before those, batches of 1 and 16 were up to 9 pixels apart here (AMD EPYC, AVX2).
    img, holes = make_image(h, w, seed=13), make_holes(h, w, seed=14)
    one = infer_image(Engine(sensitive_model, tile=32, batch_size=1, probe=sensitive_probe), img, holes)
    for batch in (3, 16):
        many = infer_image(Engine(sensitive_model, tile=32, batch_size=batch, probe=sensitive_probe), img, holes)
        assert np.array_equal(one[0], many[0]) and np.array_equal(one[1], many[1]), f"batch {batch}"


def test_infer_image_with_a_model_probes_it(make_image, whole_forward):
    # The public path: a plain module in, probe and engine built inside.
    from test_receptive import ConvStack

    model = ConvStack(3).eval()
    img = make_image(41, 67, seed=15)
    classes, rgb = infer_image(model, img, tile=16, halo=None, batch_size=2, device="cpu")
    assert np.array_equal(rgb, img)  # no holes: the input, whatever this model's RGB says
    assert (classes != whole_forward(model, img)[0]).mean() <= MAX_TIE_FRACTION
    with pytest.raises(ValueError, match="image must be a uint8"):
        infer_image(model, img.astype(np.float32))
    with pytest.raises(ValueError, match="mask must be"):
        infer_image(model, img, np.zeros((41, 66), bool))


@pytest.mark.parametrize("kwargs,flag", [(dict(tile=6), "--tile"), (dict(tile=-4), "--tile"), (dict(halo=-1), "--halo"), (dict(batch_size=0), "--batch-size")])
def test_engine_validation_names_the_flag(sensitive_model, sensitive_probe, kwargs, flag):
    with pytest.raises(ValueError) as e:
        Engine(sensitive_model, probe=sensitive_probe, **{"tile": 64, **kwargs})
    assert flag in str(e.value) and str(list(kwargs.values())[0]) in str(e.value)


def test_fp32_means_fp32_convolutions_on_cuda():
    # cuDNN's default TF32 (10-bit mantissa) would make tiles drift from the whole image; the
    # engine turns it off around its forwards and restores the caller's setting.
    from tilerun.engine import _ieee_fp32_convs

    conv = torch.backends.cudnn.conv
    before = conv.fp32_precision
    with _ieee_fp32_convs():
        assert conv.fp32_precision == "ieee"
    assert conv.fp32_precision == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tiled_equals_whole_image_on_cuda(sensitive_probe, make_image, make_holes, whole_forward):
    from conftest import build_sensitive_tilenet

    model = build_sensitive_tilenet().cuda()
    img, holes = make_image(333, 517, seed=18), make_holes(333, 517, seed=19)
    tiled = infer_image(Engine(model, tile=64, batch_size=8, device="cuda", probe=sensitive_probe), img, holes)
    whole = whole_forward(model.cpu(), img, holes)  # the reference on the CPU: fp32 for sure
    assert_exact(tiled, whole)


def test_out_box_equals_that_part_of_the_whole_forward(make_image, make_holes):
    # TileNet computes only the wanted outputs past its encoder (`TileNet.margins`); the
    # engine asks for the tiles' cores. Boxes at every edge and inside, odd sizes included;
    # a margin one stride short must show (the check can fail).
    import torch
    from conftest import build_sensitive_tilenet

    from tilerun.train import DEFAULT_PREFILL, DEFAULT_PREFILL_ITERATIONS

    model = build_sensitive_tilenet(prefill_radii=DEFAULT_PREFILL, prefill_iterations=DEFAULT_PREFILL_ITERATIONS)
    h, w = 150, 203
    img, holes = make_image(h, w, seed=21), make_holes(h, w, seed=22)
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float().div(255)
    m = torch.from_numpy(holes)[None, None].float()
    boxes = [(0, h, 0, w), (0, 40, 0, 36), (112, h, 160, w), (64, 101, 48, 147), (8, 9, 200, 203)]

    def largest_error(net) -> float:
        worst = 0.0
        with torch.inference_mode():
            full = net(x, m)
            for y0, y1, x0, x1 in boxes:
                part = net(x, m, out_box=(y0, y1, x0, x1))
                for a, b in zip(full, part):
                    assert b.shape[-2:] == (y1 - y0, x1 - x0)
                    worst = max(worst, (a[..., y0:y1, x0:x1] - b).abs().max().item())
        return worst

    assert largest_error(model) < 1e-3  # float rounding of logits in the tens
    short = dict(model.margins(), gen=model.margins()["gen"] - model.stride)
    model.margins = lambda: short
    assert largest_error(model) > 1.0
    with pytest.raises(ValueError, match="multiples of 4"):
        model(x, m, out_box=(2, 10, 0, 10))


def test_engine_asks_tilenet_for_the_cores_only(engine):
    assert engine.cores_only  # the exactness tests above therefore run the cropped decoder


@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format])
def test_encoder_features_do_not_depend_on_the_window(sensitive_model, sensitive_probe, make_image, make_holes, layout):
    """What --feature-cache's "same bytes" rests on: a feature cell has the same bits in pass 1's
    window (the global halo) and in pass 2's (the full halo), alone or in a batch. ATen runs a
    one-image float32 convolution of <= 20480 input values on another kernel than a bigger one
    or a batch, and on AVX2 CPUs the two round differently; TileNet pins its convolutions to
    one (`tilerun.model.net._conv2d`). The small window here is under that threshold, the
    others above it."""
    import copy

    model = copy.deepcopy(sensitive_model).to(memory_format=layout)
    h, w = 96, 120
    img, holes = make_image(h, w, seed=23), make_holes(h, w, seed=24)
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float().div(255).contiguous(memory_format=layout)
    m = torch.from_numpy(holes)[None, None].float()
    y0, y1, x0, x1 = 24, 64, 32, 92  # 40x60 pixels, on the stride grid
    g = sensitive_probe.global_halo  # beyond the encoder's reach from the small window's edges
    with torch.inference_mode():
        big = model.encode(x, m)
        sx, sm = x[..., y0:y1, x0:x1], m[..., y0:y1, x0:x1]
        small = model.encode(sx, sm)
        pair = model.encode(torch.cat([sx, sx.flip(-1)]), torch.cat([sm, sm.flip(-1)]))
    for scale, b, s, p in zip((1, 2, 4), big, small, pair):
        inner = (slice(g // scale, (y1 - y0 - g) // scale), slice(g // scale, (x1 - x0 - g) // scale))
        at = (slice((y0 + g) // scale, (y1 - g) // scale), slice((x0 + g) // scale, (x1 - g) // scale))
        assert torch.equal(s[0][:, inner[0], inner[1]], b[0][:, at[0], at[1]]), f"1/{scale} resolution: window size"
        assert torch.equal(p[0], s[0]), f"1/{scale} resolution: batch"


def test_decoder_shortcuts_equal_their_plain_forms():
    """TileNet's faster forms of upsample + conv and of 1x1 heads against the plain ops."""
    from tilerun.model.net import _add_conv_of_upsampled, _conv1x1

    g = torch.Generator().manual_seed(0)
    for layout in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(2, 5, 7, 9, generator=g, dtype=torch.float64).contiguous(memory_format=layout)
        w = torch.randn(4, 5, 3, 3, generator=g, dtype=torch.float64)
        out = torch.randn(2, 4, 14, 18, generator=g, dtype=torch.float64).contiguous(memory_format=layout)
        want = out + F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), w, padding=1)
        torch.testing.assert_close(_add_conv_of_upsampled(out.clone(), x, w), want, rtol=0, atol=1e-12)

        w1, b1 = torch.randn(3, 5, 1, 1, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)
        torch.testing.assert_close(_conv1x1([x], w1, b1), F.conv2d(x, w1, b1), rtol=0, atol=1e-12)
        w2 = torch.randn(3, 9, 1, 1, generator=g, dtype=torch.float64)
        parts = [x, x[:, :4].clone(memory_format=layout)]
        torch.testing.assert_close(_conv1x1(parts, w2, b1), F.conv2d(torch.cat(parts, 1), w2, b1), rtol=0, atol=1e-12)


def test_first_extreme_is_argmax_and_argmin():
    """The engine's class map and TileNet's nearest palette class: the first index, as argmax's."""
    from tilerun.channels import first_extreme

    g = torch.Generator().manual_seed(0)
    for channels in (1, 2, 5, 16, 17, 128, 129, 200):
        d = torch.randint(0, 4, (2, channels, 9, 11), generator=g).float()  # many ties: the first index must win
        for layout in (torch.contiguous_format, torch.channels_last):
            d = d.contiguous(memory_format=layout)
            for keepdim in (False, True):
                assert torch.equal(first_extreme(d, largest=True, keepdim=keepdim), d.argmax(1, keepdim=keepdim))
                assert torch.equal(first_extreme(d, largest=False, keepdim=keepdim), d.argmin(1, keepdim=keepdim))
        view = d.contiguous(memory_format=torch.channels_last)[..., 1:8, 2:9]  # a cropped NHWC view, as a tile's core
        assert torch.equal(first_extreme(view, largest=True), view.argmax(1))
    flat = torch.randn(50, 16, generator=g)
    assert torch.equal(first_extreme(flat, largest=True), flat.argmax(1))
