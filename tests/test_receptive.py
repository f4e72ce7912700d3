"""The receptive-field and stride probe on models whose answer is known by construction."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tilerun.engine import Engine, infer_image
from tilerun.receptive import ModelProbe, measure_radius, measure_stride, probe_model


class ConvStack(nn.Module):
    """n 3x3 convs (dilation d) with ReLUs: radius n*d, stride 1. Returns (logits, rgb)."""

    def __init__(self, n: int, dilation: int = 1) -> None:
        super().__init__()
        torch.manual_seed(0)
        chans = [4] + [6] * n
        self.convs = nn.ModuleList(
            nn.Conv2d(a, b, 3, padding=dilation, dilation=dilation) for a, b in zip(chans, chans[1:])
        )
        self.out = nn.Conv2d(6, 5, 1)

    def forward(self, image, mask):
        x = torch.cat([image * (1 - mask), mask], 1)
        for conv in self.convs:
            x = F.relu(conv(x)) + 0.1 * conv(x)  # leaky: no dead paths, so the radius is structural
        y = self.out(x)
        return y[:, :2], torch.sigmoid(y[:, 2:])


class PoolConvUp(nn.Module):
    """avg-pool 2 -> 3x3 conv -> nearest x2: stride 2. A pooled cell c covers pixels 2c, 2c+1; the
    conv reaches cells c-1..c+1 = pixels 2c-2..2c+3: 2 beyond the cell's own pixels on each side.
    (Pixel 2c+1 alone reaches 3 to its left, but a core starts on the stride grid, so it is
    never closer than 3 to its window's edge: halo 2.)"""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, image, mask):
        h, w = image.shape[-2:]
        x = torch.cat([image, mask], 1)  # no blanking: tests run it with every pixel "missing"
        x = F.pad(x, (0, w % 2, 0, h % 2))  # any size: pad to the stride, crop back
        y = F.interpolate(self.conv(F.avg_pool2d(x, 2)), scale_factor=2, mode="nearest")
        return torch.sigmoid(4 * y[..., :h, :w])


class SameBilinear(nn.Module):
    """A stride-2 3x3 conv with TF "same" padding (one extra pixel right/bottom only, as ported
    TF models do) then bilinear x2 upsampling. Cell c sees pixels 2c..2c+2; pixel 2c blends
    cells c-1, c and pixel 2c+1 cells c, c+1, so the odd pixel reaches 2c+4: 3 past the
    block's last pixel. A probe of pixel 2c alone sees 2 each side and gives halo 2: too small."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(4, 3, 3, stride=2)

    def forward(self, image, mask):
        h, w = image.shape[-2:]
        x = torch.cat([image, mask], 1)
        x = F.pad(x, (0, w % 2 + 1, 0, h % 2 + 1))  # even size, then the "same" padding
        y = F.interpolate(self.conv(x), scale_factor=2, mode="bilinear", align_corners=False)
        return torch.sigmoid(4 * y[..., :h, :w])


class TopLeftPad(PoolConvUp):
    """PoolConvUp padding an odd size at the top/left instead: its stride grid moves with the
    image size, so a tile (of another size than the image) sees another grid."""

    def forward(self, image, mask):
        h, w = image.shape[-2:]
        x = F.pad(torch.cat([image, mask], 1), (w % 2, 0, h % 2, 0))
        y = F.interpolate(self.conv(F.avg_pool2d(x, 2)), scale_factor=2, mode="nearest")
        return torch.sigmoid(4 * y[..., h % 2 :, w % 2 :])


def _rgb_tiled_vs_whole(model, probe, image, halo=None) -> int:
    """Max RGB difference, tiled vs whole, with every pixel missing (RGB = the model's)."""
    everything = np.ones(image.shape[:2], bool)
    _, rgb = infer_image(Engine(model, tile=8, halo=halo, batch_size=16, probe=probe), image, everything)
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        ref = model(x, torch.ones(1, 1, *image.shape[:2]))
    ref = ref[0].permute(1, 2, 0).clamp(0, 1).mul(255).round().to(torch.uint8).numpy()
    return int(np.abs(rgb.astype(int) - ref).max())


class GlobalMean(nn.Module):
    """A local conv plus the whole-image mean (no global hook): no finite receptive field."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, image, mask):
        y = self.conv(image)
        return y + 10 * image.mean(dim=(2, 3), keepdim=True).sum(1, keepdim=True), None


@pytest.mark.parametrize("n", [1, 3])
def test_stack_of_n_convs_has_radius_n(n):
    p = probe_model(ConvStack(n))
    assert (p.radius, p.stride, p.halo, p.has_global, p.tile_exact) == (n, 1, n, False, True)


def test_dilated_conv_has_radius_dilation():
    # one conv with dilation 3 touches only offsets 0 and +-3: the gradient box still spans 3
    p = probe_model(ConvStack(1, dilation=3))
    assert (p.radius, p.stride) == (3, 1)
    p = probe_model(ConvStack(2, dilation=2))
    assert (p.radius, p.stride) == (4, 1)


def test_pool_then_conv_has_stride_2_and_radius_2(make_image):
    model = PoolConvUp()
    p = probe_model(model)
    assert (p.stride, p.radius, p.halo) == (2, 2, 2)
    img = make_image(37, 61, seed=30)
    assert _rgb_tiled_vs_whole(model, p, img) <= 1
    assert _rgb_tiled_vs_whole(model, p, img, halo=0) > 1


def test_halo_covers_pixels_that_reach_further_than_the_first_of_their_cell(make_image):
    model = SameBilinear()
    p = probe_model(model)
    assert (p.stride, p.radius, p.halo) == (2, 3, 4)
    img = make_image(37, 61, seed=31)
    assert _rgb_tiled_vs_whole(model, p, img) <= 1
    assert _rgb_tiled_vs_whole(model, p, img, halo=2) > 1  # what a one-pixel probe measured


def test_a_grid_that_moves_with_the_image_size_is_not_tile_exact(make_image):
    model = TopLeftPad()
    p = probe_model(model)
    assert p.stride == 2 and p.radius is None and not p.tile_exact
    img = make_image(37, 61, seed=32)
    assert _rgb_tiled_vs_whole(model, p, img) <= 1  # the engine runs the whole image
    forced = ModelProbe(stride=2, radius=2, global_radius=None, has_global=False)  # what tiling would use
    assert _rgb_tiled_vs_whole(model, forced, img) > 1


def test_global_pooling_model_is_not_tile_exact(make_image, whole_forward, monkeypatch):
    model = GlobalMean()
    # The probe doubles its canvas until the influence stops short of the border; a global mean
    # never does. Capping the canvas at 256 instead of 1024 is the same verdict, 10x sooner.
    monkeypatch.setattr("tilerun.receptive.MAX_PROBE", 256)
    p = probe_model(model)
    assert p.radius is None and p.halo is None and not p.tile_exact
    # The engine then refuses to tile (a whole image per forward) and stays exact.
    engine = Engine(model, tile=16, probe=p)
    assert engine.tile == 0 and len(engine.tiles(40, 50)) == 1
    img = make_image(40, 50)
    classes, _ = infer_image(engine, img)
    ref, _ = whole_forward(model, img)
    assert np.array_equal(classes, ref)


def test_tilenet_stride_4_and_its_receptive_field(sensitive_model, sensitive_probe):
    p = sensitive_probe
    assert p.stride == 4 and p.has_global and p.tile_exact
    # Counted by hand for the default layer layout (TileNetConfig dilations (1, 2) and (1, 2)):
    # a quarter-res cell c of the encoder sees pixels 4c-3..4c+6 (stem conv, pool, half-res conv,
    # pool); down2a, down2b and the four predictor/generator convs add 1+1+1+2+1+2 = 8 cells;
    # the decoder's half-res and full-res convs after nearest upsampling add one more cell on
    # the far side of each phase: pixel 4c sees 4c-39..4c+38, pixel 4c+3 sees 4c-35..4c+42.
    # The cell's block 4c..4c+3 thus reaches 39 on each side: radius 39, halo 40.
    assert (p.radius, p.halo) == (39, 40)
    # The global terms (z after down2a, down2b) of cell c see pixels 4c-11..4c+14: 11 past the
    # cell's 4-pixel footprint on each side.
    assert (p.global_radius, p.global_halo) == (11, 12)


def test_probe_does_not_touch_the_model():
    from conftest import build_sensitive_tilenet

    model, fresh = build_sensitive_tilenet().train(), build_sensitive_tilenet()
    probe_model(model)  # in float64 on a copy
    after, before = model.state_dict(), fresh.state_dict()
    assert all(after[k].dtype == torch.float32 and torch.equal(after[k], before[k]) for k in before)
    assert model.training  # not switched to eval behind the caller's back


def test_halo_covers_every_phase_of_the_stride(sensitive_model, sensitive_probe):
    # The probe measures one output pixel (phase 0 of the stride). A core starts on the stride
    # grid, so pixel y0+j sits j pixels further from the window's left edge than y0 and the last
    # cell's pixels are closer to the right edge: the halo must cover, for every phase j, the
    # reach left minus j and the reach right minus (stride-1-j). Checked here pixel by pixel.
    s, size, c = sensitive_probe.stride, 128, 64
    m = sensitive_model.double()
    try:
        fixed = m.global_terms(torch.rand(1, 3, 32, 32, dtype=torch.float64), torch.zeros(1, 1, 32, 32, dtype=torch.float64)).sum((2, 3)).detach()
        g = torch.Generator().manual_seed(0)
        need = 0
        for j in range(s):
            image = torch.rand(1, 3, size, size, generator=g, dtype=torch.float64, requires_grad=True)
            logits, rgb = m(image, torch.zeros(1, 1, size, size, dtype=torch.float64), global_sums=fixed)
            (logits[0, :, c + j, c + j].sum() + rgb[0, :, c + j, c + j].sum()).backward()
            hit = image.grad[0].abs().amax(0) > 0
            ys = torch.nonzero(hit.any(1)).flatten()
            xs = torch.nonzero(hit.any(0)).flatten()
            assert ys.min() > 0 and ys.max() < size - 1, "probe image too small"
            for lo, hi in ((int(ys.min()), int(ys.max())), (int(xs.min()), int(xs.max()))):
                need = max(need, (c + j - lo) - j, (hi - (c + j)) - (s - 1 - j))
    finally:
        m.float()
    assert need <= sensitive_probe.halo
    assert need > sensitive_probe.halo - s  # and the halo is not wastefully large


def test_measure_radius_unbounded_and_zero(monkeypatch):
    monkeypatch.setattr("tilerun.receptive.MAX_PROBE", 256)  # same verdict, sooner
    assert measure_radius(lambda x, m: x.mean(dim=(2, 3), keepdim=True) * torch.ones_like(x)) is None
    assert measure_radius(lambda x, m: torch.zeros_like(x)) == 0  # no input influences anything
    assert measure_radius(lambda x, m: x * 2) == 0  # pointwise


class CoordChannel(nn.Module):
    """A conv that also sees the column index (CoordConv): no shift leaves it unchanged."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, image, mask):
        cols = torch.arange(image.shape[-1], dtype=image.dtype).expand(image.shape[0], 1, *image.shape[-2:]) / 64
        return self.conv(torch.cat([image, cols], 1)), None


def test_position_dependent_model_runs_whole_images(make_image, whole_forward):
    with pytest.raises(ValueError, match="translation-equivariant"):
        measure_stride(CoordChannel().double(), radius=1)
    model = CoordChannel()
    p = probe_model(model)
    assert not p.tile_exact
    engine = Engine(model, tile=16, probe=p)
    assert engine.tile == 0
    img = make_image(40, 50, seed=23)
    assert np.array_equal(infer_image(engine, img)[0], whole_forward(model, img)[0])


def test_a_path_gated_on_missing_pixels_is_measured(make_image, whole_forward):
    # TileNet's pre-fill reaches its widest scale only where the finer scales see < 30% known
    # pixels: a probe with few holes never opens that path and measured 39 here, not the
    # 2 * 23 + 1 = 47 of the widest tent window plus the last 3x3 conv.
    from tilerun.model import TileNet, TileNetConfig

    torch.manual_seed(0)
    model = TileNet(TileNetConfig(classes=4, stem=4, mid=4, width=4, global_dim=4, prefill_radii=(1, 3, 23))).eval()
    p = probe_model(model)
    assert (p.radius, p.halo) == (47, 48)
    # and the measured halo is what makes a large hole tile exactly
    img, holes = make_image(150, 170, seed=21), np.zeros((150, 170), bool)
    holes[30:120, 40:140] = True
    _, ref = whole_forward(model, img, holes)
    _, rgb = infer_image(Engine(model, tile=32, batch_size=8, probe=p), img, holes)
    assert np.abs(rgb.astype(int) - ref).max() <= 1
    _, short = infer_image(Engine(model, tile=32, batch_size=8, halo=40, probe=p), img, holes)
    assert np.abs(short.astype(int) - ref).max() > 1


class GlobalTermsUnbounded(nn.Module):
    """Has the global hook, but its terms themselves depend on the whole image."""

    def global_terms(self, image, mask):
        return image.mean(dim=(1, 2, 3), keepdim=True).expand(-1, 1, *image.shape[-2:]) * image[:, :1]

    def forward(self, image, mask, global_sums=None):
        terms = self.global_terms(image, mask)
        g = terms.sum((2, 3)) if global_sums is None else global_sums
        return image[:, :2] + g[:, :, None, None], None


def test_hook_with_unbounded_global_terms_runs_whole_images(make_image, whole_forward, monkeypatch):
    monkeypatch.setattr("tilerun.receptive.MAX_PROBE", 256)  # same verdict, sooner
    model = GlobalTermsUnbounded()
    p = probe_model(model)
    assert p.has_global and p.radius == 0 and p.global_radius is None and not p.tile_exact
    engine = Engine(model, tile=16, probe=p)
    assert engine.tile == 0
    img = make_image(40, 50, seed=22)
    classes, _ = infer_image(engine, img)
    assert np.array_equal(classes, whole_forward(model, img)[0])


def test_probe_is_remembered_per_model_identity(tmp_path, monkeypatch):
    """The CLI's probe cache: measured once per model file and code, then read back; another
    model file, an import path (no identity) or a damaged entry is probed afresh."""
    import tilerun.receptive as receptive
    from tilerun.model import model_identity

    monkeypatch.setenv(receptive.CACHE_ENV, str(tmp_path))
    calls = []
    real = receptive.probe_model
    monkeypatch.setattr(receptive, "probe_model", lambda m: calls.append(m) or real(m))
    model = ConvStack(2)
    first, kept = receptive.probe_cached(model, "model-a")
    assert kept is None and len(calls) == 1 and (first.radius, first.stride) == (2, 1)
    again, kept = receptive.probe_cached(model, "model-a")
    assert again == first and kept is not None and kept.parent == tmp_path / "probes" and len(calls) == 1

    receptive.probe_cached(ConvStack(3), "model-b")  # another file: measured, not taken from model-a's
    assert len(calls) == 2 and receptive.probe_cached(ConvStack(3), "model-b")[0].radius == 3
    assert receptive.probe_cached(model, None)[1] is None and len(calls) == 3  # an import path: always probed

    kept.write_text('{"stride": "4"}')  # damaged: probed again and rewritten
    assert receptive.probe_cached(model, "model-a") == (first, None) and len(calls) == 4
    assert receptive.probe_cached(model, "model-a")[1] == kept

    monkeypatch.setenv(receptive.CACHE_ENV, "")  # set empty: no cache at all
    assert receptive.cache_dir() is None and receptive.probe_cached(model, "model-a")[1] is None and len(calls) == 5

    weights = tmp_path / "w.bin"
    weights.write_bytes(b"one")
    before = model_identity(weights)
    weights.write_bytes(b"two")
    assert model_identity(weights) != before and model_identity("tests.helpers:make") is None


def test_a_cache_that_cannot_be_written_only_costs_the_probe(tmp_path, monkeypatch):
    import tilerun.receptive as receptive

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(receptive.CACHE_ENV, str(blocker / "cache"))  # mkdir fails under a file
    probe, kept = receptive.probe_cached(ConvStack(1), "model-a")
    assert (probe.radius, kept) == (1, None) and list(tmp_path.iterdir()) == [blocker]


def test_cache_folder_follows_the_environment(tmp_path, monkeypatch):
    import tilerun.receptive as receptive

    monkeypatch.delenv(receptive.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert receptive.cache_dir() == tmp_path / "tilerun"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert receptive.cache_dir() == tmp_path / "home" / ".cache" / "tilerun"
    monkeypatch.setattr(receptive.Path, "home", classmethod(lambda cls: (_ for _ in ()).throw(RuntimeError("no home"))))
    assert receptive.cache_dir() is None
