"""The whole-image coarse context (`TileNetConfig.coarse_scale`): holes wider than the
receptive field get colour from the image, and tiling still reproduces one whole-image forward."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from tilerun.engine import Engine, infer_image
from tilerun.model.net import TileNet, TileNetConfig, coarse_fill, coarse_sums, coarse_sums_of, far_field
from tilerun.receptive import probe_model
from tilerun.train import DEFAULT_PREFILL, DEFAULT_PREFILL_ITERATIONS

from test_exact import assert_exact


def _float(image: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.from_numpy(image).permute(2, 0, 1)[None].float().div(255),
            torch.from_numpy(mask)[None, None].float())


def test_cell_sums_of_the_uint8_image_equal_those_of_the_float_image(make_image, make_holes):
    # The engine sums the uint8 image by bands, a whole-image forward its float copy: the same integers.
    img, holes = make_image(101, 75, seed=3), make_holes(101, 75, seed=4)
    banded = coarse_sums(img, holes, 16, band=32)
    assert banded.shape == (4, 7, 5)
    assert banded[3].sum() == (~holes).sum()
    assert np.array_equal(banded, coarse_sums(img, holes, 16))
    assert np.array_equal(banded, coarse_sums_of(*_float(img, holes), 16)[0].numpy())


def test_coarse_fill_fills_every_hole_from_the_known_cells():
    # Left half red, right half blue, a hole over the middle: the fill runs from red to blue.
    sums = np.zeros((4, 8, 16), np.int64)
    sums[0, :, :4], sums[2, :, 12:] = 255 * 256, 255 * 256
    sums[3, :, :4], sums[3, :, 12:] = 256, 256
    fill = coarse_fill(torch.from_numpy(sums), 128, 256, 16).numpy()
    assert np.isfinite(fill).all() and fill.min() >= 0 and fill.max() <= 1
    red, blue = fill[0].mean(0), fill[2].mean(0)
    assert red[0] == 1 and blue[-1] == 1 and np.all(np.diff(red[3:13]) < 0) and np.all(np.diff(blue[3:13]) > 0)
    nothing = coarse_fill(torch.zeros(4, 3, 3, dtype=torch.int64), 40, 40, 16)
    assert torch.equal(nothing, torch.full((3, 3, 3), 0.5, dtype=torch.float64))


def test_far_field_of_a_window_is_that_part_of_the_whole_image_bit_for_bit():
    ctx = torch.rand(3, 9, 13, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    whole = far_field(ctx, 0, 140, 0, 200, 16)
    for y0, y1, x0, x1 in [(4, 60, 8, 100), (36, 140, 92, 200), (0, 1, 199, 200)]:
        assert torch.equal(far_field(ctx, y0, y1, x0, x1, 16), whole[:, y0:y1, x0:x1])


def _prefill_model(coarse_scale: int) -> TileNet:
    # Untrained: the RGB head starts at zero, so the output in a hole is the pre-fill itself.
    cfg = TileNetConfig(classes=6, stem=8, mid=8, width=8, global_dim=8, prefill_radii=DEFAULT_PREFILL,
                        prefill_iterations=DEFAULT_PREFILL_ITERATIONS, class_prior=True, coarse_scale=coarse_scale)
    torch.manual_seed(0)
    return TileNet(cfg).eval()


def _two_colour_photo(h: int, w: int) -> np.ndarray:
    img = np.zeros((h, w, 3), np.uint8)
    img[:, : w // 2] = (200, 40, 30)
    img[:, w // 2 :] = (30, 60, 190)
    return img


@pytest.mark.parametrize("coarse_scale", [0, 16])
def test_a_box_wider_than_the_reach_gets_colour_from_the_image(coarse_scale):
    img = _two_colour_photo(192, 256)
    holes = np.zeros((192, 256), bool)
    holes[16:176, 48:208] = True  # 160 px: its middle is 80 px from any known pixel, the pre-fill reaches 36
    model = _prefill_model(coarse_scale)
    _, rgb = infer_image(Engine(model, tile=64, batch_size=4), img, holes)
    middle = rgb[88:104, 112:144].astype(int)
    grey = np.abs(middle - 128).max() <= 1
    if coarse_scale:
        assert not grey
        left, right = rgb[96, 100].astype(int), rgb[96, 156].astype(int)
        assert left[0] > left[2] + 40 and right[2] > right[0] + 40, (left, right)  # red side red, blue side blue
    else:
        assert grey  # without the context (old weights' configuration): the flat grey patch


def test_tiling_with_the_coarse_context_equals_one_whole_image_forward(make_image, make_holes, whole_forward):
    from conftest import build_sensitive_tilenet

    sensitive = build_sensitive_tilenet(prefill_radii=DEFAULT_PREFILL, prefill_iterations=DEFAULT_PREFILL_ITERATIONS)
    model = TileNet(dataclasses.replace(sensitive.cfg, coarse_scale=16), sensitive.palette)
    model.load_state_dict(sensitive.state_dict())
    model.eval()
    probe = probe_model(model)
    assert (probe.stride, probe.halo) == (4, 40)  # the context is an input: it adds no halo
    img, holes = make_image(170, 251, seed=18), make_holes(170, 251, seed=19)
    holes[20:160, 100:240] = True
    whole = whole_forward(model, img, holes)
    # The context reaches the output: without it the whole-image forward differs.
    assert not np.array_equal(whole[1], whole_forward(sensitive, img, holes)[1])
    tiled = [infer_image(Engine(model, tile=t, batch_size=b, probe=probe), img, holes) for t, b in ((64, 8), (48, 1))]
    for out in tiled:
        assert_exact(out, whole)
    # Another tile size or batch moves no byte of the context's share: the bytes agree too.
    assert np.array_equal(tiled[0][1], tiled[1][1])


def test_engine_gives_every_tile_the_context_of_the_uint8_image(make_image, make_holes):
    model = _prefill_model(16)
    engine = Engine(model, tile=64, batch_size=2)
    img, holes = make_image(100, 130, seed=5), make_holes(100, 130, seed=6)
    key = object()
    ctx = engine.context(img, holes, key)
    assert ctx.shape == (1, 3, 7, 9) and ctx.dtype == torch.float64
    assert engine.context(img, holes, key) is ctx  # once per image
    job = object()  # each claim of a spread image names it with a new (job, image) tuple
    first = engine.context(img, holes, (job, 3))
    assert engine.context(img, holes, (job, 3)) is first
    assert torch.equal(ctx, model._context_of(*_float(img, holes)))
    assert Engine(_prefill_model(0), tile=64).context(img, holes) is None
