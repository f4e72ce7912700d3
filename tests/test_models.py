"""Bring-your-own models: formats, safe loading, the contract, tile-exactness detection.

The own model is examples/own_model.py (so the README's example is tested too), saved
as TorchScript and .pt2 once per session, and imported as a factory.
"""

from __future__ import annotations

import io
import pickle
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# Small models for the CLI and contract tests, imported by the factory form
# (`--model ux_models:rgb_only`) from a module written to a temporary folder.
UX_MODELS = textwrap.dedent(
    '''
    import torch
    import torch.nn.functional as F
    from torch import nn


    class RgbOnly(nn.Module):
        """Inpainting only: returns one 3-channel tensor (radius 2)."""

        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a = nn.Conv2d(4, 6, 3, padding=1)
            self.b = nn.Conv2d(6, 3, 3, padding=1)

        def forward(self, image, mask):
            x = torch.cat([image * (1 - mask), mask], 1)
            rgb = torch.sigmoid(4 * self.b(torch.relu(4 * self.a(x))))
            return image * (1 - mask) + rgb * mask


    class GlobalPool(nn.Module):
        """Not tile-exact: every pixel sees the whole image's mean (SE-style global pooling).
        Pointwise otherwise, so that the probe's 1024-px float64 passes stay cheap."""

        def __init__(self):
            super().__init__()
            torch.manual_seed(1)
            self.a = nn.Conv2d(4, 5, 1)

        def forward(self, image, mask):
            f = self.a(torch.cat([image, mask], 1))
            return 8 * (f - f.mean(dim=(2, 3), keepdim=True))


    class WrongShape(nn.Module):
        def forward(self, image, mask):
            return image[..., ::2, ::2]


    def rgb_only():
        return RgbOnly().eval()


    def global_pool():
        return GlobalPool().eval()


    def wrong_shape():
        return WrongShape()


    not_a_model = 42
    '''
)


@pytest.fixture(scope="session")
def own_files(tmp_path_factory) -> dict[str, str]:
    """examples/own_model.py exported once: {"torchscript": path, "exported": path, "factory": spec}."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        import own_model
    finally:
        sys.path.remove(str(EXAMPLES))
    ts, ep = own_model.export(tmp_path_factory.mktemp("own"))
    return {"torchscript": str(ts), "exported": str(ep), "factory": "own_model:make_model"}


@pytest.fixture
def ux_models(tmp_path, monkeypatch) -> Path:
    (tmp_path / "ux_models.py").write_text(UX_MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(EXAMPLES))
    sys.modules.pop("ux_models", None)
    return tmp_path


def _payload(marker: Path):
    """An object whose unpickling creates ``marker``: proof that a pickle ran."""

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    return Payload()


# -- formats -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["torchscript", "exported", "factory"])
def test_own_model_formats_load_and_tile_exactly(kind, own_files, monkeypatch, make_image, make_holes):
    from tilerun import Engine, infer_image, load_model
    from tilerun.model import model_format

    monkeypatch.syspath_prepend(str(EXAMPLES))
    spec = own_files[kind]
    if kind != "factory":
        assert model_format(spec) == kind  # by content: the extension plays no part
    model = load_model(spec)
    assert model.outputs.classes == 6 and model.outputs.rgb and len(model.palette) == 6
    tiled = Engine(model, tile=16, batch_size=3)
    assert (tiled.probe.radius, tiled.probe.stride, tiled.halo) == (8, 1, 8)  # 1 + 2 + 4 + 1, measured
    image, mask = make_image(45, 53), make_holes(45, 53)
    classes, rgb = infer_image(tiled, image, mask)
    whole = Engine(model, tile=0, halo=0, probe=tiled.probe)
    ref_classes, ref_rgb = infer_image(whole, image, mask)
    assert len(tiled.tiles(45, 53)) == 12
    assert len(np.unique(ref_classes)) > 1, "the example model must give several classes for this to mean much"
    np.testing.assert_array_equal(classes, ref_classes)
    np.testing.assert_array_equal(rgb, ref_rgb)
    np.testing.assert_array_equal(rgb[~mask], image[~mask])


def test_halo_one_short_breaks_the_own_model(own_files, monkeypatch, make_image, make_holes):
    """The exactness test above can fail: one pixel less halo than measured changes the output."""
    from tilerun import Engine, infer_image, load_model

    monkeypatch.syspath_prepend(str(EXAMPLES))
    model = load_model(own_files["factory"])
    image, mask = make_image(45, 53), make_holes(45, 53)
    short = Engine(model, tile=16, halo=7)
    whole = Engine(model, tile=0, halo=0, probe=short.probe)
    a, b = infer_image(short, image, mask), infer_image(whole, image, mask)
    assert not (np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]))


def test_rgb_only_model_writes_only_inpainted(ux_models, tmp_path, make_image):
    from PIL import Image

    from tilerun.cli import main

    (tmp_path / "in").mkdir()
    Image.fromarray(make_image(37, 41)).save(tmp_path / "in" / "a.png")
    res = CliRunner().invoke(main, ["run", str(tmp_path / "in"), str(tmp_path / "out"), "--model",
                                    "ux_models:rgb_only", "--tile", "16", "--device", "cpu", "-q"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "out" / "a.inpainted.png").is_file()
    assert not list((tmp_path / "out").glob("*.pred.png"))


# -- safe loading --------------------------------------------------------------------


def _raw_pickle(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps({"state": _payload(marker)}, protocol=4))


def _torch_save(path: Path, marker: Path) -> None:
    import torch

    torch.save({"state": _payload(marker)}, path)


@pytest.mark.parametrize(
    "name, write",
    [
        ("model.pt", _raw_pickle),
        ("model.safetensors", _raw_pickle),  # the extension is a lie: content decides
        ("model.pt", _torch_save),
        ("model.pt2", _torch_save),
        ("model.pth", _torch_save),
    ],
)
def test_pickle_payload_refused_and_never_runs(tmp_path, name, write):
    from tilerun import load_model
    from tilerun.errors import ModelLoadError

    marker = tmp_path / "PAYLOAD_RAN"
    path = tmp_path / name
    write(path, marker)
    assert not marker.exists()
    with pytest.raises(ModelLoadError, match="pickle.*refused.*refuses pickles in model files"):
        load_model(path)
    assert not marker.exists()


def test_pickle_payload_in_torchscript_archive_never_runs(tmp_path, own_files):
    """A TorchScript archive whose data.pkl is a payload: TorchScript's unpickler refuses the global."""
    from tilerun import load_model
    from tilerun.errors import ModelLoadError

    marker = tmp_path / "PAYLOAD_RAN"
    evil = tmp_path / "evil.pt"
    payload = pickle.dumps({"x": _payload(marker)}, protocol=2)
    with zipfile.ZipFile(own_files["torchscript"]) as src, zipfile.ZipFile(evil, "w") as dst:
        for n in src.namelist():
            dst.writestr(n, payload if n.endswith("/data.pkl") else src.read(n))
    with pytest.raises(ModelLoadError, match="TorchScript refused"):
        load_model(evil)
    assert not marker.exists()


def test_pickle_payload_in_pt2_archive_never_runs(tmp_path, own_files):
    """torch.export.load itself WOULD run this payload (its sample-inputs reader falls back to
    weights_only=False); tilerun's vetting refuses the archive first."""
    import torch

    from tilerun import load_model
    from tilerun.errors import ModelLoadError

    marker = tmp_path / "PAYLOAD_RAN"
    buf = io.BytesIO()
    torch.save((_payload(marker),), buf)
    evil = tmp_path / "evil.pt2"
    with zipfile.ZipFile(own_files["exported"]) as src, zipfile.ZipFile(evil, "w") as dst:
        for n in src.namelist():
            dst.writestr(n, buf.getvalue() if "/data/sample_inputs/" in n else src.read(n))
    with pytest.raises(ModelLoadError, match="sample_inputs.*refused|refused.*sample_inputs"):
        load_model(evil)
    assert not marker.exists()
    # The vetting is what stands between the file and the payload: torch alone runs it.
    try:
        torch.export.load(str(evil))
    except Exception:  # noqa: BLE001 - whatever torch makes of the payload's result, the payload ran first
        pass
    assert marker.exists()


def test_pickle_refused_by_the_cli_with_exit_2(tmp_path, make_image):
    from PIL import Image

    from tilerun.cli import main

    marker = tmp_path / "PAYLOAD_RAN"
    _torch_save(tmp_path / "model.pt", marker)
    (tmp_path / "in").mkdir()
    Image.fromarray(make_image(8, 8)).save(tmp_path / "in" / "a.png")
    res = CliRunner().invoke(main, ["run", str(tmp_path / "in"), str(tmp_path / "out"),
                                    "--model", str(tmp_path / "model.pt"), "--device", "cpu"])
    assert res.exit_code == 2, res.output
    assert "refuses pickles in model files" in res.output and "Traceback" not in res.output
    assert not marker.exists()


# -- the contract and the option -------------------------------------------------------


def test_contract_violations_are_named(ux_models):
    from tilerun import load_model
    from tilerun.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match=r"must be \[N,C,H,W\] = \[2,C,40,44\].*got \(2, 3, 20, 22\)"):
        load_model("ux_models:wrong_shape")
    with pytest.raises(ModelLoadError, match="neither an nn.Module nor a factory"):
        load_model("ux_models:not_a_model")
    with pytest.raises(ModelLoadError, match="cannot import 'no_such_module'"):
        load_model("no_such_module:make")


def test_model_option_accepts_files_and_import_paths_only(tmp_path):
    from tilerun.cli import main

    res = CliRunner().invoke(main, ["inspect", str(tmp_path / "missing.pt")])
    assert res.exit_code == 2 and "does not exist" in res.output and "package.module:factory" in res.output
    res = CliRunner().invoke(main, ["inspect", str(tmp_path)])
    assert res.exit_code == 2 and "is a folder" in res.output


# -- not tile-exact ----------------------------------------------------------------------


def test_global_pooling_detected_warned_and_run_whole(ux_models, tmp_path, monkeypatch, make_image, make_holes):
    from PIL import Image

    from tilerun import Engine, infer_image, load_model
    from tilerun.cli import main
    from tilerun.model import tile_exact_warning

    model = load_model("ux_models:global_pool")
    engine = Engine(model, tile=16)
    # Probed once (an unbounded field is probed up to 1024 px): the CLI below gets the same measurement.
    monkeypatch.setattr("tilerun.receptive.probe_model", lambda m, **kw: engine.probe)
    assert engine.probe.radius is None and not engine.probe.tile_exact
    assert engine.tile == 0  # the engine's fallback: one whole-image forward, still exact
    image, mask = make_image(29, 35), make_holes(29, 35)
    classes, _ = infer_image(engine, image, mask)
    tiled = Engine(model, tile=16, halo=8, probe=engine.probe)  # forcing tiles shows why
    assert not np.array_equal(infer_image(tiled, image, mask)[0], classes)
    warning = tile_exact_warning(engine.probe, tile=16, halo=None)
    assert "not tile-exact" in warning and "--tile 0" in warning and "--halo" in warning
    assert "bigger --tile" in tile_exact_warning(engine.probe, tile=16, halo=8)

    (tmp_path / "in").mkdir()
    Image.fromarray(image).save(tmp_path / "in" / "a.png")
    res = CliRunner().invoke(main, ["run", str(tmp_path / "in"), str(tmp_path / "out"), "--model",
                                    "ux_models:global_pool", "--tile", "16", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "not tile-exact" in res.output and "--tile 0" in res.output
    with Image.open(tmp_path / "out" / "a.pred.png") as im:
        np.testing.assert_array_equal(np.asarray(im), infer_image(engine, image, None)[0])


def test_exported_with_static_batch_runs_window_by_window():
    """A .pt2 exported with batch 1 baked in still serves the engine's batches, one window at a time."""
    import torch
    from torch import nn

    from tilerun.model.loading import ExportedModel

    class BatchOne(nn.Module):  # stands in for an exported graph whose guards demand N == 1
        def train(self, mode=True):  # as exported graphs do
            raise RuntimeError("Calling eval() is not supported yet.")

        def forward(self, image, mask):
            if image.shape[0] != 1:
                raise AssertionError("Guard failed: image.size()[0] == 1")
            return image.flip(1) * (1 - mask), image[:, :2] + mask

    wrapped = ExportedModel(BatchOne(), static_batch=1).eval()  # must not reach the graph
    image, mask = torch.rand(3, 3, 5, 7), (torch.rand(3, 1, 5, 7) > 0.5).float()
    rgb, logits = wrapped(image, mask)
    torch.testing.assert_close(rgb, image.flip(1) * (1 - mask))
    torch.testing.assert_close(logits, image[:, :2] + mask)


def test_safetensors_without_tilerun_metadata_names_the_factory(tmp_path):
    import torch
    from safetensors.torch import save_file

    from tilerun import load_model
    from tilerun.errors import ModelLoadError

    save_file({"conv.weight": torch.zeros(2, 4, 3, 3)}, str(tmp_path / "hub.safetensors"))
    with pytest.raises(ModelLoadError, match="without an architecture.*package.module:make_model"):
        load_model(tmp_path / "hub.safetensors")


def test_out_box_parameter_must_crop_the_outputs():
    # A model that declares out_box is asked for tiles' cores only; one that takes the
    # parameter but returns the whole window would be stitched wrongly: refused at load.
    from torch import nn

    from tilerun.errors import ModelLoadError
    from tilerun.model import check_contract

    class Ignores(nn.Module):
        def forward(self, image, mask, out_box=None):
            return image.mean(1, keepdim=True).repeat(1, 3, 1, 1)

    class Crops(Ignores):
        def forward(self, image, mask, out_box=None):
            out = super().forward(image, mask)
            return out if out_box is None else out[..., out_box[0] : out_box[1], out_box[2] : out_box[3]]

    with pytest.raises(ModelLoadError, match=r"out_box=\(0, 20, 0, 22\).*got \(2, 3, 40, 44\)"):
        check_contract(Ignores())
    assert check_contract(Crops()).rgb
