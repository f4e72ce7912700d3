"""`tilerun run` end to end through click's CliRunner on tiny images in tmp_path.

Two runs over one input tree (--tile 64, and one tile larger than every image) serve every
test: the tree holds pairs of images that differ only under their holes, so "noise under holes
changes nothing" is a byte comparison of two outputs of the same run.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from tilerun.cli import main

PALETTE = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (250, 250, 0), (0, 250, 250), (10, 20, 30)]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    """The sensitive test model with its own palette, saved as tilerun weights."""
    from conftest import build_sensitive_tilenet

    from tilerun.model import save_tilenet

    path = tmp_path_factory.mktemp("model") / "sensitive.safetensors"
    save_tilenet(build_sensitive_tilenet(palette=PALETTE), path)
    return path


def _noise(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """INPUT/a/b/alpha.png + alpha_noisy.png (RGBA, alpha 0 = missing), INPUT/side.png +
    side_noisy.png (RGB with sidecar masks), INPUT/plain.bmp (no mask). 150x97 and friends: several
    64-px tiles each, sizes not multiples of the stride."""
    root = tmp_path_factory.mktemp("in")
    (root / "a" / "b").mkdir(parents=True)
    h, w = 150, 97
    rgb = _noise(h, w, 1)
    holes = np.random.default_rng(2).random((h, w)) < 0.1
    holes[40:90, 20:60] = True
    alpha = np.where(holes, 0, 255).astype(np.uint8)
    clean = rgb.copy()
    clean[holes] = 0
    noisy = rgb.copy()
    noisy[holes] = _noise(h, w, 3)[holes]
    for name, pixels in (("alpha", clean), ("alpha_noisy", noisy)):
        Image.fromarray(np.dstack([pixels, alpha]), "RGBA").save(root / "a" / "b" / f"{name}.png")
    side_rgb, side_holes = _noise(71, 130, 4), np.zeros((71, 130), bool)
    side_holes[10:50, 30:100] = True
    side_noisy = side_rgb.copy()
    side_noisy[side_holes] = _noise(71, 130, 5)[side_holes]
    for name, pixels in (("side", side_rgb), ("side_noisy", side_noisy)):
        Image.fromarray(pixels).save(root / f"{name}.png")
        Image.fromarray(side_holes.astype(np.uint8) * 255).save(root / f"{name}.mask.png")
    Image.fromarray(_noise(37, 201, 6)).save(root / "plain.bmp")
    # The fixtures are what they claim: RGBA kept the noise under alpha 0, pairs differ there.
    back = np.asarray(Image.open(root / "a" / "b" / "alpha_noisy.png"))
    assert back.shape == (h, w, 4) and np.array_equal(back[..., :3], noisy) and (noisy != clean)[holes].mean() > 0.9
    return {"root": root, "alpha": (clean, holes), "side": (side_rgb, side_holes)}


def _run(args):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


@pytest.fixture(scope="module")
def outputs(tree, model_file, tmp_path_factory):
    import torch

    import tilerun.engine
    import tilerun.png
    import tilerun.assemble
    import tilerun.receptive

    probes = []
    probe_model = tilerun.receptive.probe_model

    def counted(model, **kwargs):
        probes.append(model)
        return probe_model(model, **kwargs)

    out = {}
    with pytest.MonkeyPatch.context() as mp:
        # Every run loads the same file: the CLI measures it once and remembers the probe
        # (receptive.probe_cached; an earlier test may have measured these bytes already).
        mp.setattr(tilerun.receptive, "probe_model", counted)
        # `run` sizes torch's thread pool from OMP_NUM_THREADS: keep the suite's setting.
        mp.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))
        for tile in (64, 1024):
            out[tile] = tmp_path_factory.mktemp(f"out{tile}")
            _run(["run", str(tree["root"]), str(out[tile]), "--model", str(model_file), "--tile", str(tile), "--device", "cpu", "-q"])
        # The host side as on a GPU host: several PNG encoders, each image's strips (of a
        # few rows here) compressed on as many threads, a pixel bound that lets one or two
        # of these images wait for them at a time.
        mp.setattr(tilerun.assemble, "encoder_count", lambda device: 3)
        mp.setattr(tilerun.assemble, "ENCODE_PIXELS", 25_000)
        mp.setattr(tilerun.png, "STRIP_BYTES", 1000)
        out["encoders"] = tmp_path_factory.mktemp("encoders")
        _run(["run", str(tree["root"]), str(out["encoders"]), "--model", str(model_file), "--tile", "64", "--device", "cpu", "-q"])
        # Pass 1's features kept for pass 2 (a GPU's default), in 1 MiB: some batches fit, some not.
        take = tilerun.engine._FeatureCache.take
        mp.setattr(tilerun.engine._FeatureCache, "take",
                   lambda self, *a: (lambda got: (_FEATURE_HITS.append(got is not None), got)[1])(take(self, *a)))
        out["features"] = tmp_path_factory.mktemp("features")
        _run(["run", str(tree["root"]), str(out["features"]), "--model", str(model_file), "--tile", "64",
              "--feature-cache", "1", "--device", "cpu", "-q"])
    assert len(probes) <= 1
    return out


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


EXPECTED = sorted(
    f"{stem}.{kind}.png"
    for stem in ("a/b/alpha", "a/b/alpha_noisy", "side", "side_noisy", "plain")
    for kind in ("pred", "inpainted")
)


def test_layout_is_mirrored(outputs):
    for out in outputs.values():
        # (run reports and manifests beside them are other issues' business)
        assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == EXPECTED


def test_class_map_is_a_palette_png_of_class_indices(outputs, tree, model_file, whole_forward):
    from tilerun.model import load_model

    pred = Image.open(outputs[64] / "a" / "b" / "alpha.pred.png")
    assert pred.mode == "P" and pred.size == (97, 150)
    assert pred.getpalette()[: 3 * len(PALETTE)] == [c for rgb in PALETTE for c in rgb]  # the model's palette
    classes = np.asarray(pred)
    assert classes.max() < len(PALETTE) and len(np.unique(classes)) >= 3
    # and the values are the model's argmax (through the whole-image reference)
    image, holes = tree["alpha"]
    ref, _ = whole_forward(load_model(model_file), image, holes)
    assert (classes != ref).mean() <= 1e-4


def test_inpainted_keeps_known_pixels_and_fills_holes(outputs, tree):
    for name, key in (("a/b/alpha", "alpha"), ("side", "side")):
        image, holes = tree[key]
        out = Image.open(outputs[64] / f"{name}.inpainted.png")
        assert out.mode == "RGB"
        filled = np.asarray(out)
        assert np.array_equal(filled[~holes], image[~holes])  # exactly the input where known
        assert filled[holes].std() > 20  # and something model-made (not a constant) in the holes
    plain = np.asarray(Image.open(tree["root"] / "plain.bmp"))
    assert np.array_equal(np.asarray(Image.open(outputs[64] / "plain.inpainted.png")), plain)  # no mask: the input


def test_small_tiles_and_one_big_tile_give_the_same_files(outputs):
    # The same pixels up to the exactness tolerance (class ties <= 0.01%, RGB within 1 grey
    # level), not the same bytes: windows of other shapes run other float32 kernels, and a
    # value on a .5 rounding edge can land one grey level apart (measured: 3 of 172k pixels
    # at 333x517). The PNGs' tEXt chunk (resume metadata) is not compared either.
    for rel in EXPECTED:
        a, b = _pixels(outputs[64] / rel).astype(np.int16), _pixels(outputs[1024] / rel).astype(np.int16)
        assert a.shape == b.shape, rel
        if rel.endswith(".pred.png"):
            assert (a != b).mean() <= 1e-4, rel
        else:
            assert np.abs(a - b).max() <= 1 and (a != b).any(axis=2).mean() <= 1e-3, rel


_FEATURE_HITS: list[bool] = []  # per pass-2 batch of the "features" run: did it get pass 1's features?


def test_features_kept_for_pass_two_write_the_same_files(outputs):
    assert any(_FEATURE_HITS) and not all(_FEATURE_HITS), _FEATURE_HITS  # the budget bit
    for rel in EXPECTED:
        assert np.array_equal(_pixels(outputs["features"] / rel), _pixels(outputs[64] / rel)), rel


def test_parallel_png_encoders_write_the_same_files_in_order(outputs):
    import json

    for rel in EXPECTED:
        assert np.array_equal(_pixels(outputs["encoders"] / rel), _pixels(outputs[64] / rel)), rel
    reports = [json.loads((outputs[k] / "tilerun-report.json").read_text()) for k in (64, "encoders")]
    assert [[f["input"], f["status"]] for f in reports[1]["files"]] == [[f["input"], f["status"]] for f in reports[0]["files"]]


@pytest.mark.parametrize("clean,noisy", [("a/b/alpha", "a/b/alpha_noisy"), ("side", "side_noisy")])
@pytest.mark.parametrize("tile", [64, 1024])
def test_noise_under_holes_changes_no_output(outputs, clean, noisy, tile):
    # Same geometry, same kernels: here the pixels must be bit-identical.
    for kind in ("pred", "inpainted"):
        a = _pixels(outputs[tile] / f"{clean}.{kind}.png")
        b = _pixels(outputs[tile] / f"{noisy}.{kind}.png")
        assert np.array_equal(a, b), f"{kind}: RGB under missing pixels leaked into the output"


@pytest.mark.parametrize("args", [["--help"], ["run", "--help"]])
def test_help_does_not_import_torch(args):
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from tilerun.cli import main\n"
        f"r = CliRunner().invoke(main, {args!r})\n"
        "assert r.exit_code == 0 and 'Usage' in r.output, r.output\n"
        "sys.exit(3 if 'torch' in sys.modules else 0)\n"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
