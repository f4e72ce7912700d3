"""The whole-image coarse context (`TileNetConfig.coarse_scale`): holes wider than the
receptive field get colour from the image, and tiling still reproduces one whole-image forward."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from tilerun.engine import Engine, infer_image
from tilerun.model.net import (TileNet, TileNetConfig, class_counts, class_counts_of, coarse_fill,
                               coarse_sums, coarse_sums_of, far_field, palette_classes)
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


def test_the_biharmonic_coarse_fill_carries_a_curved_gradient_through_a_hole():
    # Colour rising with the square of x (the Laplacian's square is zero), a hole of 6 x 8 cells:
    # the biharmonic fill continues the curve, the harmonic fill sags towards a straight line.
    h, w = 16, 24
    curve = 255 * ((np.arange(w) - 4) / 20) ** 2
    sums = np.zeros((4, h, w), np.int64)
    sums[:3] = np.round(curve * 256).astype(np.int64)
    sums[3] = 256
    hole = np.zeros((h, w), bool)
    hole[5:11, 9:17] = True
    sums[:, hole] = 0
    err = {b: np.abs(coarse_fill(torch.from_numpy(sums), 16 * h, 16 * w, 16, biharmonic=b)[0].numpy() - curve / 255)[hole].max()
           for b in (False, True)}
    assert err[True] < 0.01 and err[True] < err[False] / 4
    fill = coarse_fill(torch.from_numpy(sums), 16 * h, 16 * w, 16, biharmonic=True).numpy()
    assert fill.min() >= 0 and fill.max() <= 1


def test_far_field_of_a_window_is_that_part_of_the_whole_image_bit_for_bit():
    ctx = torch.rand(3, 9, 13, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    whole = far_field(ctx, 0, 140, 0, 200, 16)
    for y0, y1, x0, x1 in [(4, 60, 8, 100), (36, 140, 92, 200), (0, 1, 199, 200)]:
        assert torch.equal(far_field(ctx, y0, y1, x0, x1, 16), whole[:, y0:y1, x0:x1])


def _prefill_model(coarse_scale: int, class_fill: bool = False, palette=None) -> TileNet:
    # Untrained: the RGB head starts at zero, so the output in a hole is the pre-fill itself.
    cfg = TileNetConfig(classes=len(palette) if palette else 6, stem=8, mid=8, width=8, global_dim=8,
                        prefill_radii=DEFAULT_PREFILL, prefill_iterations=DEFAULT_PREFILL_ITERATIONS, class_prior=True,
                        coarse_scale=coarse_scale, class_fill=class_fill)
    torch.manual_seed(0)
    return TileNet(cfg, palette).eval()


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


@pytest.mark.parametrize("biharmonic", [False, True])
def test_tiling_with_the_coarse_context_equals_one_whole_image_forward(make_image, make_holes, whole_forward, biharmonic):
    from conftest import build_sensitive_tilenet

    sensitive = build_sensitive_tilenet(prefill_radii=DEFAULT_PREFILL, prefill_iterations=DEFAULT_PREFILL_ITERATIONS)
    model = TileNet(dataclasses.replace(sensitive.cfg, coarse_scale=16, coarse_biharmonic=biharmonic), sensitive.palette)
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


def test_the_cell_sums_of_any_partition_add_up_to_the_whole_images(make_image, make_holes):
    # Blocks that start inside a cell, of either grid, and ragged last cells: whole numbers, any order.
    model = _prefill_model(16, class_fill=True)
    h, w = 150, 211
    img, holes = make_image(h, w, seed=8), make_holes(h, w, seed=9)
    whole = [np.zeros(shape, np.int64) for shape in model.context_grids(h, w)]
    for y0, y1 in ((0, 37), (37, 100), (100, h)):
        for x0, x1 in ((0, 70), (70, 71), (71, w)):
            for g, (r, c, a) in zip(whole, model.context_cells(img[y0:y1, x0:x1], holes[y0:y1, x0:x1], y0, x0)):
                assert a.dtype == np.uint16
                g[:, r : r + a.shape[1], c : c + a.shape[2]] += a
    assert np.array_equal(whole[0], coarse_sums(img, holes, 16))
    assert np.array_equal(whole[1], class_counts(img, holes, 64, np.asarray(model.palette)))
    by_cells, by_image = model.context_of_cells(whole, h, w), model.coarse_context(img, holes)
    assert all(torch.equal(a, b) for a, b in zip(by_cells, by_image))


def test_the_engine_fills_the_context_from_pass_ones_cells_without_reading_the_image(monkeypatch, make_image,
                                                                                     make_holes):
    # Every process sums only its own tiles' cores; the whole image is never read for the context.
    model = _prefill_model(16, class_fill=True)
    img, holes = make_image(150, 211, seed=10), make_holes(150, 211, seed=11)
    holes[30:120, 40:150] = True
    engine = Engine(model, tile=48, batch_size=3)
    tiles = engine.tiles(150, 211)
    by_image = infer_image(engine, img, holes)
    halves = [engine.global_partials(img, holes, tiles[:7]), engine.global_partials(img, holes, tiles[7:])]
    assert all(p.cells is not None for p in halves)

    def whole_image_read(*a):
        raise AssertionError("the context read the whole image")

    monkeypatch.setattr(model, "coarse_context", whole_image_read)
    sums = engine.reduce_partials(halves[::-1])
    got = list(engine.compute(img, holes, tiles, sums, key=object()))
    ctx = engine.context(img, holes, object(), sums.cells)
    assert all(torch.equal(a.cpu(), b) for a, b in zip(ctx, model.context_of_cells(
        [coarse_sums(img, holes, 16), class_counts(img, holes, 64, np.asarray(model.palette))], 150, 211)))
    for r in got:
        t = r.tile
        assert np.array_equal(r.rgb, by_image[1][t.y0 : t.y1, t.x0 : t.x1])


@pytest.mark.parametrize("biharmonic", [False, True])
@pytest.mark.parametrize("holes", ["middle and top edge", "corner"])
def test_the_coarse_fill_sweeps_only_around_its_holes_with_the_same_bits(monkeypatch, biharmonic, holes):
    # The box around the holes (and the partly known cells by them) is well inside the level, or
    # reaches its edges: the sweeps there give the same bits as on the whole level.
    import tilerun.model.net as net

    rng = np.random.default_rng(12)
    h, w = 37, 53
    sums = np.zeros((4, h, w), np.int64)
    sums[3] = 256
    sums[:3] = rng.integers(0, 256, (3, h, w)) * 256
    boxes = {"middle and top edge": [(10, 19, 20, 31), (0, 4, 24, 33)], "corner": [(30, 37, 45, 53)]}[holes]
    for y0, y1, x0, x1 in boxes:
        sums[:, y0:y1, x0:x1] = 0
        sums[:, y0 - 1, x0:x1] //= 4  # a row of cells with a quarter known
    boxed = coarse_fill(sums, 16 * h, 16 * w, 16, biharmonic=biharmonic)
    whole = []
    monkeypatch.setattr(net, "_holes_box",
                        lambda known, margin: whole.append(1) or (0, known.shape[-2], 0, known.shape[-1]))
    assert torch.equal(boxed, coarse_fill(sums, 16 * h, 16 * w, 16, biharmonic=biharmonic)) and whole
    monkeypatch.undo()
    full = sums.copy()
    full[3] = 256
    assert torch.equal(coarse_fill(full, 16 * h, 16 * w, 16, biharmonic=biharmonic),
                       torch.from_numpy(full[:3] / 256 / 255))  # no hole: the cell means, no sweep


def test_palette_classes_are_the_nearest_colours_first_on_ties():
    rng = np.random.default_rng(7)
    pal = rng.integers(0, 256, (16, 3))
    pal[5] = pal[2]  # a tie: the first index wins
    rgb = rng.integers(0, 256, (40, 50, 3))
    rgb[0, :16] = pal  # the palette colours themselves
    d2 = ((rgb[:, :, None, :] - pal[None, None]) ** 2).sum(-1)
    got = palette_classes(torch.from_numpy(rgb).permute(2, 0, 1)[None].float(), torch.from_numpy(pal).float())
    assert np.array_equal(got[0, 0].numpy(), d2.argmin(-1))
    assert got[0, 0, 0, 5] == 2


def test_class_counts_of_the_uint8_image_equal_those_of_the_float_image(make_image, make_holes):
    img, holes = make_image(131, 75, seed=3), make_holes(131, 75, seed=4)
    pal = np.random.default_rng(1).integers(0, 256, (6, 3)).astype(np.uint8)
    counts = class_counts(img, holes, 32, pal, band=64)
    assert counts.shape == (7, 5, 3)
    assert counts[-1].sum() == (~holes).sum() and np.array_equal(counts[:-1].sum(0), counts[-1])
    assert np.array_equal(counts, class_counts(img, holes, 32, pal))
    assert np.array_equal(counts, class_counts_of(*_float(img, holes), 32, torch.from_numpy(pal).float())[0].numpy())


def _speckled_photo(h: int, w: int) -> np.ndarray:
    """Black and white pixels, 3 white to 1 black: the mean colour is a light grey that no pixel has."""
    img = np.full((h, w, 3), 255, np.uint8)
    img[::2, ::2] = 0
    return img


def test_the_class_fill_gives_a_hole_the_most_frequent_class_around_it():
    black, white, grey = (0, 0, 0), (255, 255, 255), (170, 170, 170)
    img = _speckled_photo(256, 256)
    holes = np.zeros((256, 256), bool)
    holes[24:40, 100:180] = True  # a thin box: its middle is 8 px from known pixels
    holes[96:224, 64:192] = True  # and one wider than the pre-fill's reach: the far field's classes
    classes = {}
    for class_fill in (False, True):
        model = _prefill_model(16, class_fill, palette=[black, white, grey])
        classes[class_fill], _ = infer_image(Engine(model, tile=64, batch_size=4), img, holes)
    # The mean colour's class (light grey, 191 -> 170) against the most frequent one (white).
    assert (classes[False][holes] == 2).mean() > 0.7
    assert (classes[True][holes] == 1).mean() > 0.95
    assert np.array_equal(classes[True][~holes], classes[False][~holes])  # known pixels keep their own class


@pytest.mark.parametrize("class_cells", [2, 4])  # 32-px cells (the shipped weights) and 64-px (older ones)
def test_tiling_with_the_class_fill_equals_one_whole_image_forward(make_image, make_holes, whole_forward, class_cells):
    from conftest import build_sensitive_tilenet

    sensitive = build_sensitive_tilenet(prefill_radii=DEFAULT_PREFILL, prefill_iterations=DEFAULT_PREFILL_ITERATIONS)
    model = TileNet(dataclasses.replace(sensitive.cfg, coarse_scale=16, class_prior=True, class_fill=True,
                                        class_cells=class_cells), sensitive.palette)
    model.load_state_dict(sensitive.state_dict(), strict=False)
    model.decoder.prior_scale.data.fill_(100.0)  # the class map is the prior's: its exactness shows
    model.eval()
    probe = probe_model(model)
    assert (probe.stride, probe.halo) == (4, 40)  # the class shares are filled with the colours: no more halo
    img, holes = make_image(170, 251, seed=18), make_holes(170, 251, seed=19)
    img[:, :125] //= 4  # dark on the left, light on the right: classes that vary over the image
    img[:, 125:] = 160 + img[:, 125:] // 3
    holes[20:160, 100:240] = True
    whole = whole_forward(model, img, holes)
    ctx = model.coarse_context(img, holes)
    side = 16 * class_cells  # the class shares' cells, in pixels
    assert isinstance(ctx, tuple) and ctx[1].shape == (1, model.cfg.classes, -(-170 // side), -(-251 // side))
    tiled = [infer_image(Engine(model, tile=t, batch_size=b, probe=probe), img, holes) for t, b in ((64, 8), (48, 1))]
    for out in tiled:
        assert_exact(out, whole)
    assert np.array_equal(tiled[0][0], tiled[1][0]) and np.array_equal(tiled[0][1], tiled[1][1])


def test_inspect_reports_the_class_shares_and_the_fill_of_the_context():
    from tilerun.inspect import coarse_context_summary

    line = coarse_context_summary(_prefill_model(16, class_fill=True), side=256)
    assert "16x16 cells and 6 class shares in 4x4 cells of 64 px" in line, line
    assert "class shares" not in coarse_context_summary(_prefill_model(16), side=256)
    assert "(harmonic fill)" in line
    model = _prefill_model(16)
    model.cfg = dataclasses.replace(model.cfg, coarse_biharmonic=True)
    assert "(biharmonic fill)" in coarse_context_summary(model, side=256)


def test_the_class_fill_of_few_holes_gives_the_dense_classes(monkeypatch, make_image, make_holes):
    """Few holes take the class shares as rows of pixels, at the holes alone: the classes of the
    16-channel images, far field and batch included."""
    import tilerun.model.net as net

    model = _prefill_model(16, class_fill=True, palette=[tuple(c) for c in np.random.default_rng(2).integers(0, 256, (16, 3))])
    img = np.stack([make_image(90, 70, seed=s) for s in (5, 6)])
    holes = np.stack([make_holes(90, 70, seed=s) for s in (7, 8)])
    holes[1, 20:50, 10:40] = True
    pixels = torch.from_numpy(img).permute(0, 3, 1, 2).float().div(255)
    known = torch.from_numpy(~holes)[:, None].float()
    ctx = [model.coarse_context(i, h)[1][0] for i, h in zip(img, holes)]
    far = [(ctx[0], 9, 99, 13, 83, 64), (ctx[1], 42, 132, 6, 76, 64)]  # windows at two places of an image
    box = (0, 90, 0, 70)
    got = {}
    for below in (0.0, 1.1):
        monkeypatch.setattr(net, "SPARSE_SWEEPS_BELOW", below)
        for f in (far, None):
            got[below, f is None] = model._filled_classes(pixels, known, f, box, (4, 86, 8, 64))
    for no_far in (False, True):
        assert torch.equal(got[0.0, no_far], got[1.1, no_far])
    assert not torch.equal(got[0.0, False], got[0.0, True])  # the far field counts


@pytest.mark.parametrize("slope_radii", [(1, 3, 7), (1, 3, 23)])
def test_tiling_with_the_slope_fill_equals_one_whole_image_forward(make_image, make_holes, whole_forward, slope_radii):
    from conftest import build_sensitive_tilenet

    sensitive = build_sensitive_tilenet(prefill_radii=DEFAULT_PREFILL, prefill_iterations=DEFAULT_PREFILL_ITERATIONS)
    cfg = dataclasses.replace(sensitive.cfg, coarse_scale=16, slope_radii=slope_radii, slope_weight=1.0)
    model = TileNet(cfg, sensitive.palette)
    model.load_state_dict(sensitive.state_dict())
    with torch.no_grad():  # RGB = the pre-fill (the sensitive head saturates most of it): the slopes show
        model.decoder.rgb.weight.zero_()
        model.decoder.rgb.bias.zero_()
    model.eval()
    probe = probe_model(model)
    # (1, 3, 7) reaches no further than the colours' fill: no more halo. 23: its tent's 46 px, + 1 for
    # the slopes' differences, + 1 for the decoder's 3x3, to the stride.
    assert probe.halo == (40 if max(slope_radii) == 7 else 48)
    img, holes = make_image(170, 251, seed=20), make_holes(170, 251, seed=21)
    holes[30:150, 120:128] = True  # a thin band: the slopes carry across it
    whole = whole_forward(model, img, holes)
    plain = TileNet(dataclasses.replace(cfg, slope_radii=(), slope_weight=0.0), sensitive.palette)
    plain.load_state_dict(model.state_dict())
    changed = (whole_forward(plain.eval(), img, holes)[1] != whole[1]).any(-1)
    assert changed[30:150, 120:128].mean() > 0.2  # the slopes count
    for tile, batch in ((64, 8), (48, 1)):
        assert_exact(infer_image(Engine(model, tile=tile, batch_size=batch, probe=probe), img, holes), whole)
