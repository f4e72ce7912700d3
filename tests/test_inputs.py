"""Images in: every Pillow mode, EXIF orientation, both mask conventions, which files are inputs,
and the output-name collision rule. Decoding is tested without a model; one CLI test proves that
the RGB under a hole reaches no output."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tilerun.errors import InputImageError
from tilerun.images import InputItem, find_inputs, image_size, load_image, plan_outputs

from cli_fixtures import model_file, run_cli  # noqa: F401  (fixtures)

RNG = np.random.default_rng(20261126)


def noise(h: int, w: int, c: int | None = 3, *, dtype=np.uint8, high: int = 256) -> np.ndarray:
    shape = (h, w) if c is None else (h, w, c)
    a = RNG.integers(0, high, size=shape).astype(dtype)
    # Not the all-zeros fixture STYLE.md warns about: values span the range.
    assert a.size < 8 or (int(a.min()) <= high // 8 and int(a.max()) >= high - 1 - high // 8), "degenerate fixture"
    return a


def item(path: Path, root: Path | None = None) -> InputItem:
    root = root or path.parent
    return InputItem(path, path.relative_to(root))


def save(im: Image.Image, path: Path, **kw) -> Path:
    im.save(path, **kw)
    return path


# -- every mode -----------------------------------------------------------------------------------

H, W = 9, 13  # odd, not square: a transposed axis shows


def _palette_image() -> tuple[Image.Image, np.ndarray, np.ndarray]:
    idx = noise(H, W, None, high=5)
    pal = np.array([[10, 20, 30], [200, 0, 0], [0, 200, 0], [0, 0, 200], [255, 255, 255]], np.uint8)
    im = Image.frombytes("P", (W, H), idx.tobytes())
    im.putpalette(pal.ravel().tolist())
    return im, idx, pal


def case_rgb(tmp):
    a = noise(H, W)
    return save(Image.fromarray(a), tmp / "rgb.png"), a, np.zeros((H, W), bool)


def case_l(tmp):
    g = noise(H, W, None)
    return save(Image.fromarray(g), tmp / "l.png"), np.repeat(g[..., None], 3, 2), np.zeros((H, W), bool)


def case_la(tmp):
    g, alpha = noise(H, W, None), noise(H, W, None, high=3) * 127  # 0, 127, 254
    return (save(Image.fromarray(np.stack([g, alpha], 2)), tmp / "la.png"), np.repeat(g[..., None], 3, 2), alpha == 0)


def case_rgba(tmp):
    a, alpha = noise(H, W), noise(H, W, None, high=2) * 255
    # RGB under alpha 0 is kept as it is: the model blanks holes itself, and the test below
    # proves that whatever is there cannot reach an output.
    return save(Image.fromarray(np.dstack([a, alpha])), tmp / "rgba.png"), a, alpha == 0


def case_p(tmp):
    im, idx, pal = _palette_image()
    return save(im, tmp / "p.png"), pal[idx], np.zeros((H, W), bool)


def case_p_transparency(tmp):
    im, idx, pal = _palette_image()
    path = save(im, tmp / "p_trns.png", transparency=2)
    assert Image.open(path).mode == "P" and "transparency" in Image.open(path).info
    return path, pal[idx], idx == 2


def case_rgb_colour_key(tmp):
    a = noise(H, W)
    a[2, 3] = a[5, 7] = (1, 2, 3)
    return save(Image.fromarray(a), tmp / "key.png", transparency=(1, 2, 3)), a, np.all(a == (1, 2, 3), axis=2)


def case_i16(tmp):
    v = noise(H, W, None, dtype=np.uint16, high=65536)
    path = save(Image.fromarray(v), tmp / "i16.png")
    assert Image.open(path).mode == "I;16"
    g = np.round(v / 65535 * 255).astype(np.uint8)
    return path, np.repeat(g[..., None], 3, 2), np.zeros((H, W), bool)


def case_i16_colour_key(tmp):
    v = noise(H, W, None, dtype=np.uint16, high=65536)
    v[1, 2] = v[4, 4] = 4242
    path = save(Image.fromarray(v), tmp / "i16_key.png", transparency=4242)
    assert Image.open(path).mode == "I;16" and Image.open(path).info["transparency"] == 4242
    g = np.round(v / 65535 * 255).astype(np.uint8)
    return path, np.repeat(g[..., None], 3, 2), v == 4242


def case_i32(tmp):
    v = noise(H, W, None, dtype=np.int32, high=65536)
    path = save(Image.fromarray(v), tmp / "i32.tif")
    assert Image.open(path).mode == "I"
    g = np.round(v / 65535 * 255).astype(np.uint8)
    return path, np.repeat(g[..., None], 3, 2), np.zeros((H, W), bool)


def case_f(tmp):
    v = RNG.random((H, W)).astype(np.float32) * 1.2 - 0.1  # a little outside [0, 1]: clipped
    path = save(Image.fromarray(v), tmp / "f.tif")
    assert Image.open(path).mode == "F"
    g = np.round(np.clip(v.astype(np.float64), 0, 1) * 255).astype(np.uint8)
    return path, np.repeat(g[..., None], 3, 2), np.zeros((H, W), bool)


def case_cmyk(tmp):
    im = Image.frombytes("CMYK", (W, H), noise(H, W, 4).tobytes())
    path = save(im, tmp / "cmyk.tif")
    assert Image.open(path).mode == "CMYK"
    return path, np.asarray(im.convert("RGB")), np.zeros((H, W), bool)


def case_1bit(tmp):
    b = noise(H, W, None, high=2).astype(bool)
    path = save(Image.fromarray(b), tmp / "bits.png")
    assert Image.open(path).mode == "1"
    return path, np.repeat((b * 255).astype(np.uint8)[..., None], 3, 2), np.zeros((H, W), bool)


def case_bmp(tmp):
    a = noise(H, W)
    return save(Image.fromarray(a), tmp / "b.bmp"), a, np.zeros((H, W), bool)


def case_webp_lossless(tmp):
    a = noise(H, W)
    return save(Image.fromarray(a), tmp / "w.webp", lossless=True), a, np.zeros((H, W), bool)


def case_one_pixel(tmp):
    a = np.array([[[12, 34, 56]]], np.uint8)
    return save(Image.fromarray(a), tmp / "one.png"), a, np.zeros((1, 1), bool)


CASES = [case_rgb, case_l, case_la, case_rgba, case_p, case_p_transparency, case_rgb_colour_key, case_i16,
         case_i16_colour_key, case_i32, case_f, case_cmyk, case_1bit, case_bmp, case_webp_lossless, case_one_pixel]


FIXED_RANGES = {"i16": (0, 65535), "i16_colour_key": (0, 65535), "i32": (0, 65535), "f": (0, 1)}


@pytest.mark.parametrize("case", CASES, ids=[c.__name__[5:] for c in CASES])
def test_every_mode_decodes_to_rgb_and_mask(tmp_path, case):
    from tilerun.images import set_radiometry
    from tilerun.radiometry import RadiometrySpec

    path, want_rgb, want_mask = case(tmp_path)
    # 16/32-bit and float data by a fixed --input-range here (auto: tests/test_radiometry.py).
    fixed = FIXED_RANGES.get(case.__name__[5:])
    set_radiometry(RadiometrySpec(input_range=fixed))
    try:
        rgb, mask = load_image(item(path))
    finally:
        set_radiometry(RadiometrySpec())
    assert rgb.dtype == np.uint8 and rgb.shape == want_rgb.shape and rgb.flags.c_contiguous
    np.testing.assert_array_equal(rgb, want_rgb)
    np.testing.assert_array_equal(mask, want_mask)
    assert image_size(item(path)) == want_mask.shape


def test_cases_have_holes_where_they_should(tmp_path):
    # The transparency cases must really contain holes, or their mask checks prove nothing.
    for case in (case_la, case_rgba, case_p_transparency, case_rgb_colour_key, case_i16_colour_key):
        _, _, mask = case(tmp_path)
        assert 0 < mask.sum() < mask.size, case.__name__


# -- EXIF orientation -----------------------------------------------------------------------------


def _exif(orientation: int) -> bytes:
    ex = Image.Exif()
    ex[0x0112] = orientation
    return ex.tobytes()


def test_exif_orientation_applies_to_image_alpha_and_mask(tmp_path):
    a = noise(6, 10, 4)
    a[..., 3] = 255
    a[0, :4, 3] = 0  # a transparent run in the stored top row
    save(Image.fromarray(a), tmp_path / "rot.png", exif=_exif(6))  # 6: rotate 90 degrees clockwise to display
    side = np.zeros((6, 10), np.uint8)
    side[5, 9] = 255  # stored bottom-right corner
    save(Image.fromarray(side), tmp_path / "rot.mask.png", exif=_exif(6))

    rgb, mask = load_image(item(tmp_path / "rot.png"))
    want = np.rot90(a, -1)
    np.testing.assert_array_equal(rgb, want[..., :3])
    assert rgb.shape == (10, 6, 3) and image_size(item(tmp_path / "rot.png")) == (10, 6)
    np.testing.assert_array_equal(mask, (want[..., 3] == 0) | np.rot90(side, -1).astype(bool))
    assert mask[9, 0] and mask[:4, 5].all() and mask.sum() == 5


def test_mask_in_displayed_orientation_is_checked_after_rotation(tmp_path):
    save(Image.fromarray(noise(6, 10)), tmp_path / "rot.png", exif=_exif(8))
    save(Image.fromarray(np.full((6, 10), 255, np.uint8)), tmp_path / "rot.mask.png")  # stored size, not displayed
    with pytest.raises(InputImageError, match=r"mask rot\.mask\.png is 10x6 but the image is 6x10.*EXIF"):
        load_image(item(tmp_path / "rot.png"))


# -- masks ----------------------------------------------------------------------------------------


def test_sidecar_beside_and_alpha_are_united(tmp_path):
    a = noise(8, 8, 4)
    a[..., 3] = 255
    a[0, 0, 3] = 0
    save(Image.fromarray(a), tmp_path / "x.png")
    side = np.zeros((8, 8), np.uint8)
    side[7, 7] = 1  # soft masks: any nonzero value is missing
    side[3, 3] = 128
    save(Image.fromarray(side), tmp_path / "x.mask.png")
    _, mask = load_image(item(tmp_path / "x.png"))
    assert set(zip(*np.nonzero(mask))) == {(0, 0), (3, 3), (7, 7)}


def test_mask_dir_at_the_same_relative_path(tmp_path):
    root, masks = tmp_path / "in", tmp_path / "masks"
    (root / "a" / "b").mkdir(parents=True)
    (masks / "a" / "b").mkdir(parents=True)
    save(Image.fromarray(noise(5, 7)), root / "a" / "b" / "x.jpg")
    side = np.zeros((5, 7), np.uint8)
    side[1:3, 2:5] = 255
    save(Image.fromarray(side), masks / "a" / "b" / "x.mask.png")
    save(Image.fromarray(np.full((5, 7), 255, np.uint8)), root / "a" / "b" / "x.mask.png")  # ignored with mask_dir
    it = find_inputs(root)[0]
    assert it.key == "a/b/x.jpg"
    _, mask = load_image(it, mask_dir=masks)
    np.testing.assert_array_equal(mask, side > 0)
    _, beside = load_image(it)
    assert beside.all()


def test_full_name_sidecar_wins_over_stem_sidecar(tmp_path):
    for ext in ("png", "jpg"):
        save(Image.fromarray(noise(4, 4)), tmp_path / f"x.{ext}")
    only_jpg = np.zeros((4, 4), np.uint8)
    only_jpg[0] = 255
    save(Image.fromarray(only_jpg), tmp_path / "x.jpg.mask.png")
    shared = np.zeros((4, 4), np.uint8)
    shared[3] = 255
    save(Image.fromarray(shared), tmp_path / "x.mask.png")
    _, m_jpg = load_image(item(tmp_path / "x.jpg"))
    _, m_png = load_image(item(tmp_path / "x.png"))
    np.testing.assert_array_equal(m_jpg, only_jpg > 0)
    np.testing.assert_array_equal(m_png, shared > 0)


def test_sidecar_modes_rgba_background_and_palette(tmp_path):
    save(Image.fromarray(noise(4, 6)), tmp_path / "x.png")
    # Painted on a transparent layer: white where painted, and white but transparent elsewhere.
    rgba = np.full((4, 6, 4), 255, np.uint8)
    rgba[..., 3] = 0
    rgba[2, 1:4, 3] = 255
    save(Image.fromarray(rgba), tmp_path / "x.mask.png")
    _, mask = load_image(item(tmp_path / "x.png"))
    assert set(zip(*np.nonzero(mask))) == {(2, 1), (2, 2), (2, 3)}

    # A palette mask: the colour counts, not the index (index 0 is white here).
    idx = np.zeros((4, 6), np.uint8)
    idx[0, 0] = 1
    pm = Image.frombytes("P", (6, 4), idx.tobytes())
    pm.putpalette([255, 255, 255, 0, 0, 0])
    save(pm, tmp_path / "x.mask.png")
    _, mask = load_image(item(tmp_path / "x.png"))
    assert mask.sum() == 23 and not mask[0, 0]


def test_mask_of_wrong_size_names_the_mask(tmp_path):
    save(Image.fromarray(noise(4, 6)), tmp_path / "x.png")
    save(Image.fromarray(np.zeros((6, 4), np.uint8)), tmp_path / "x.mask.png")
    with pytest.raises(InputImageError, match=r"mask x\.mask\.png is 4x6 but the image is 6x4"):
        load_image(item(tmp_path / "x.png"))


def test_unreadable_mask_names_the_mask(tmp_path):
    save(Image.fromarray(noise(4, 6)), tmp_path / "x.png")
    (tmp_path / "x.mask.png").write_bytes(b"not a png")
    with pytest.raises(InputImageError, match=r"^mask x\.mask\.png: not an image"):
        load_image(item(tmp_path / "x.png"))


# -- which files are inputs ----------------------------------------------------------------------


def test_find_inputs_skips_sidecars_outputs_hidden_and_output_folder(tmp_path):
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    (root / "folder.png").mkdir()  # a folder named like an image is a folder
    good = ["A.PNG", "b.jpeg", "c.tif", "d.tiff", "e.bmp", "f.webp", "g.jpg", "sub/h.png", "folder.png/i.png",
            "café au lait ☕.png"]
    for name in good:
        (root / name).write_bytes(b"")
    for name in ["x.mask.png", "x.pred.png", "x.inpainted.png", "x.preview.png", ".hidden.png",
                 "notes.txt", "tilerun-report.json", ".x.pred.png.abc123.tmp"]:
        (root / name).write_bytes(b"")
    (root / "dangling.png").symlink_to(root / "gone.png")
    out = root / "out"
    out.mkdir()
    (out / "y.png").write_bytes(b"")
    (root / ".git").mkdir()
    (root / ".git" / "z.png").write_bytes(b"")

    keys = [it.key for it in find_inputs(root, exclude=[out])]
    assert keys == sorted(good + ["dangling.png"])
    # The same OUTPUT spelt another way is still excluded.
    assert "out/y.png" not in [it.key for it in find_inputs(root, exclude=[root / "sub" / ".." / "out"])]
    assert "out/y.png" in [it.key for it in find_inputs(root)]
    # A single file is its own input, with its name as the relative path.
    assert find_inputs(root / "g.jpg") == [InputItem(root / "g.jpg", Path("g.jpg"))]


# -- output names -----------------------------------------------------------------------------------


def test_plan_outputs_collision_rule(tmp_path):
    keys = ["x.png", "x.jpg", "X.tif", "y.png", "sub/x.png", "x.png.jpg", "z.png", "z.png.jpg"]
    items = [InputItem(tmp_path / k, Path(k)) for k in keys]
    out = tmp_path / "out"
    plan = plan_outputs(items, out)
    names = {k: plan[k]["pred"].relative_to(out).as_posix() for k in keys}
    assert names == {
        "x.png": "x.png.pred.png",
        "x.jpg": "x.jpg.pred.png",
        "X.tif": "X.tif.pred.png",
        "y.png": "y.pred.png",  # alone in its folder: the plain rule
        "sub/x.png": "sub/x.pred.png",  # another folder: no collision
        "x.png.jpg": "x.png.1.pred.png",  # its stem x.png is x.png's full name: an index keeps them apart
        "z.png": "z.pred.png",
        "z.png.jpg": "z.png.pred.png",  # stems z and z.png differ: no collision
    }
    assert plan["x.png"]["inpainted"] == out / "x.png.inpainted.png"
    every = [p.as_posix().casefold() for kinds in plan.values() for p in kinds.values()]
    assert len(set(every)) == len(every)


# -- through the CLI: the RGB under a hole reaches no output -----------------------------------------


def test_noise_under_holes_changes_no_output(tmp_path, run_cli):
    base = noise(40, 52)
    holes = np.zeros((40, 52), bool)
    holes[5:20, 10:30] = True
    holes[30:, 45:] = True

    def write(folder: Path, fill: np.ndarray) -> None:
        folder.mkdir()
        img = base.copy()
        img[holes] = fill[holes]
        alpha = np.where(holes, 0, 255).astype(np.uint8)
        Image.fromarray(np.dstack([img, alpha])).save(folder / "alpha.png")  # convention 1: alpha == 0
        Image.fromarray(img).save(folder / "side.png")  # convention 2: a sidecar
        Image.fromarray(holes.astype(np.uint8) * 255).save(folder / "side.mask.png")

    write(tmp_path / "a", np.zeros_like(base))
    write(tmp_path / "b", noise(40, 52))
    for name in "ab":
        r = run_cli(tmp_path / name, tmp_path / f"out_{name}")
        assert r.exit_code == 0, r.output
    files = ["alpha.pred.png", "alpha.inpainted.png", "side.pred.png", "side.inpainted.png"]
    for f in files:  # pixels, not bytes: the resume stamp in each PNG names its own input file
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out_a" / f)),
                                      np.asarray(Image.open(tmp_path / "out_b" / f)), err_msg=f)
    # Both conventions make the same holes, so the same outputs.
    for kind in ("pred", "inpainted"):
        a = np.asarray(Image.open(tmp_path / "out_a" / f"alpha.{kind}.png"))
        s = np.asarray(Image.open(tmp_path / "out_a" / f"side.{kind}.png"))
        np.testing.assert_array_equal(a, s)

    # Control: the same noise in *known* pixels does change the outputs, so the model is
    # sensitive enough for the equality above to mean something.
    (tmp_path / "c").mkdir()
    Image.fromarray(noise(40, 52)).save(tmp_path / "c" / "side.png")
    Image.fromarray(holes.astype(np.uint8) * 255).save(tmp_path / "c" / "side.mask.png")
    assert run_cli(tmp_path / "c", tmp_path / "out_c").exit_code == 0
    for kind in ("pred", "inpainted"):
        a = np.asarray(Image.open(tmp_path / "out_a" / f"side.{kind}.png"))
        c = np.asarray(Image.open(tmp_path / "out_c" / f"side.{kind}.png"))
        assert (a != c).any(), kind
    # The holes are filled by the model and the known pixels are the input's.
    inp = np.asarray(Image.open(tmp_path / "out_a" / "side.inpainted.png"))
    np.testing.assert_array_equal(inp[~holes], base[~holes])


def test_every_mode_through_the_cli(tmp_path, run_cli):
    root = tmp_path / "in"
    root.mkdir()
    expected = {}
    for case in CASES:
        path, rgb, mask = case(root)
        expected[path.name] = mask.shape
    r = run_cli(root, tmp_path / "out")
    assert r.exit_code == 0, r.output
    plan = plan_outputs(find_inputs(root), tmp_path / "out")
    assert set(plan) == set(expected)
    for key, paths in plan.items():
        pred = Image.open(paths["pred"])
        assert pred.mode == "P" and pred.size[::-1] == expected[key], key
        assert Image.open(paths["inpainted"]).mode == "RGB"
    assert not [p for p in (tmp_path / "out").rglob("*") if p.name.endswith(".tmp")]
    assert os.listdir(root) and all(not n.endswith(".tmp") for n in os.listdir(root))
