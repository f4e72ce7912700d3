"""User experience: `tilerun inspect`, previews, progress, and exits and messages that tell the truth."""

from __future__ import annotations

import io
import logging
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cli_fixtures import model_file, run_cli  # noqa: F401  (fixtures)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


# -- inspect ---------------------------------------------------------------------------


def test_inspect_prints_measured_receptive_field(monkeypatch):
    from tilerun.cli import main
    from tilerun.defaults import DEFAULT_TILE

    monkeypatch.syspath_prepend(str(EXAMPLES))
    res = CliRunner().invoke(main, ["inspect", "own_model:make_model", "--tile", "64", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    out = res.output
    # examples/own_model.py: 3x3 convs with dilations 1, 2, 4 then 1 -> radius 8, stride 1, nothing declared.
    assert re.search(r"receptive field\s+radius 8 px \(measured by gradient probe\) -> halo 8 px", out), out
    assert re.search(r"stride\s+1 px", out)
    assert "class map, K = 6, inpainted RGB" in out
    assert re.search(r"parameters\s+10,009", out)
    assert re.search(rf"tile\s+64 px \(--tile; the default is {DEFAULT_TILE}\) -> window 80x80 px", out), out
    mem = re.search(r"memory per tile\s+([\d.]+) MiB per 80x80 window", out)
    # At least the 16-channel float32 feature maps of one 80x80 window are alive at once.
    assert mem and float(mem.group(1)) > 2 * 16 * 80 * 80 * 4 / 2**20, out
    assert re.search(r"tile-exact\s+yes \(\d+x\d+ random image with holes, 9 tiles of 32 px \+ halo 8: identical", out)
    assert "\x1b[" not in out  # not a terminal: no colour codes, hex colours instead
    assert "#" in out.split("palette", 1)[1]


def test_inspect_reports_a_model_that_is_not_tile_exact():
    import torch
    from torch import nn

    from tilerun.inspect import format_report, inspect_model

    class SquareMean(nn.Module):  # pointwise plus a whole-image mean: unbounded receptive field
        def forward(self, image, mask):
            x = image[:, :2] - image[:, 1:3].mean(dim=(2, 3), keepdim=True)
            return 8 * torch.cat([x, -x, mask], 1)

    report = inspect_model(SquareMean(), memory=False)
    assert report.probe.radius is None and not report.exact.exact
    text = format_report(report)
    assert re.search(r"receptive field\s+unbounded", text)
    assert re.search(r"tile-exact\s+NO \(.*classes differ on [\d.]+% of pixels", text)
    assert "--tile 0" in text


def test_peak_memory_grows_with_the_window():
    import torch
    from torch import nn

    from tilerun.inspect import peak_forward_bytes

    class One(nn.Module):  # the contract's smallest case: one conv on image+mask
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(4, 8, 3, padding=1)

        def forward(self, image, mask):
            return self.c(torch.cat([image, mask], 1))

    model = One()
    small, how = peak_forward_bytes(model, 32)
    big, _ = peak_forward_bytes(model, 64)
    # cat (4 ch) and conv output (8 ch) alive together: 12 float32 planes.
    assert small >= 12 * 32 * 32 * 4 and big >= 4 * small * 0.9 and "dispatch" in how


# -- previews ----------------------------------------------------------------------------


def test_preview_written_with_panels_and_legend(monkeypatch, tmp_path, make_image):
    from PIL import Image

    from tilerun.cli import main
    from tilerun.preview import GAP, HOLE_COLOURS, TITLE

    monkeypatch.syspath_prepend(str(EXAMPLES))
    h, w = 47, 61
    rgba = np.dstack([make_image(h, w), np.full((h, w), 255, np.uint8)])
    rgba[10:30, 20:40, 3] = 0  # a hole
    (tmp_path / "in").mkdir()
    Image.fromarray(rgba).save(tmp_path / "in" / "a.png")
    res = CliRunner().invoke(main, ["run", str(tmp_path / "in"), str(tmp_path / "out"), "--model",
                                    "own_model:make_model", "--tile", "32", "--device", "cpu", "--preview", "-q"])
    assert res.exit_code == 0, res.output
    with Image.open(tmp_path / "out" / "a.preview.png") as im:
        preview = np.asarray(im.convert("RGB"))
    with Image.open(tmp_path / "out" / "a.pred.png") as im:
        classes, palette = np.asarray(im), im.getpalette()
    with Image.open(tmp_path / "out" / "a.inpainted.png") as im:
        inpainted = np.asarray(im)
    gap, title = GAP, TITLE
    assert preview.shape[1] == 3 * w + 4 * gap  # three panels, full size (small image: no downscale)
    assert preview.shape[0] > gap + title + h + gap  # the legend under the panels
    top = gap + title
    marked = preview[top : top + h, gap : gap + w]
    hole = ~(rgba[..., 3] > 0)
    assert {tuple(c) for c in marked[hole]} == set(HOLE_COLOURS)
    np.testing.assert_array_equal(marked[~hole], rgba[..., :3][~hole])
    colours = np.array(palette[: 3 * 6], np.uint8).reshape(6, 3)
    np.testing.assert_array_equal(preview[top : top + h, 2 * gap + w : 2 * gap + 2 * w], colours[classes])
    np.testing.assert_array_equal(preview[top : top + h, 3 * gap + 2 * w : 3 * gap + 3 * w], inpainted)

    # A rerun resumes (nothing recomputed) and still writes a preview that is missing.
    (tmp_path / "out" / "a.preview.png").unlink()
    res = CliRunner().invoke(main, ["run", str(tmp_path / "in"), str(tmp_path / "out"), "--model",
                                    "own_model:make_model", "--tile", "32", "--device", "cpu", "--preview"])
    assert res.exit_code == 0 and "1 skipped" in res.output, res.output
    with Image.open(tmp_path / "out" / "a.preview.png") as im:
        np.testing.assert_array_equal(np.asarray(im.convert("RGB")), preview)


def test_preview_of_a_big_image_stays_bounded():
    from tilerun.preview import GAP, TITLE, make_preview

    h, w = 2600, 700
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w), bool)
    mask[1000, :] = True  # a one-pixel scratch must survive the downscale
    classes = rng.integers(0, 4, (h, w), dtype=np.uint8)
    palette = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (9, 9, 9)]
    im = make_preview(image, mask, classes, None, palette, max_side=512)
    side_w = round(w * 512 / h)
    assert im.width == 2 * side_w + 3 * GAP  # input and classes only: the model gave no rgb
    assert 512 < im.height < 512 + 100
    row = round(1000 * 512 / h) + GAP + TITLE
    band = np.asarray(im)[row - 1 : row + 2, GAP : GAP + side_w]
    assert (band == (255, 0, 255)).all(axis=2).any()


# -- progress ----------------------------------------------------------------------------


def test_progress_counts_and_logs_when_not_a_terminal(caplog):
    from tilerun.progress import Progress

    stream = io.StringIO()  # not a tty
    with caplog.at_level(logging.INFO, logger="tilerun"):
        with Progress(total_tiles=10, total_images=2, total_pixels=1000, stream=stream, interval=0) as p:
            for _ in range(4):
                p.advance(tiles=2, pixels=160)
            p.advance(images=1)
            p.set_totals(tiles=12, images=3, pixels=1200)
            p.on_tiles(4, 2)  # the scheduler's callback: pixels from the mean tile area (100)
    assert (p.tiles, p.images, p.pixels) == (12, 3, 640 + 400)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) >= 6  # interval 0: a line per advance, and one at close
    assert lines[-1].startswith("3/3 images, 12/12 tiles (100%)") and "MP/s" in lines[-1] and "done" in lines[-1]
    assert "ETA" in lines[0] and "tiles/s" in lines[0]
    assert stream.getvalue() == ""  # no bar characters in a log


def test_progress_bar_on_a_terminal_and_silent_when_asked(caplog):
    from tilerun.progress import Progress

    stream = io.StringIO()
    with caplog.at_level(logging.INFO, logger="tilerun"):
        with Progress(total_tiles=5, total_images=1, total_pixels=500, stream=stream, tty=True) as p:
            p.advance(tiles=5, pixels=500, images=1)
    bar = stream.getvalue()
    assert "5/5" in bar and "tile" in bar and "1/1 images" in bar and "MP/s" in bar
    assert not caplog.records  # the bar replaces the log lines

    for kw in ({"quiet": True}, {"enabled": False}):  # -q; or a rank other than 0
        quiet = io.StringIO()
        with caplog.at_level(logging.INFO, logger="tilerun"):
            with Progress(total_tiles=5, total_images=1, total_pixels=5, stream=quiet, tty=True, interval=0, **kw) as p:
                p.advance(tiles=5, images=1)
        assert quiet.getvalue() == "" and not caplog.records and p.tiles == 5


def test_run_shows_progress_lines(monkeypatch, tmp_path, make_image):
    """`tilerun run` feeds the job's totals and every tile to Progress (CliRunner's stderr is no tty)."""
    from PIL import Image

    import tilerun.progress as progress_mod
    from tilerun.cli import main

    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.setattr(progress_mod, "LOG_INTERVAL", 0.0)
    (tmp_path / "in").mkdir()
    for name, (h, w) in {"a.png": (40, 33), "b.png": (17, 70)}.items():
        Image.fromarray(make_image(h, w)).save(tmp_path / "in" / name)
    res = CliRunner().invoke(main, ["run", str(tmp_path / "in"), str(tmp_path / "out"), "--model",
                                    "own_model:make_model", "--tile", "16", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    # a: 3x3 tiles, b: 2x5 tiles of 16 px cores; 40*33 + 17*70 pixels.
    assert re.search(r"2/2 images, 19/19 tiles \(100%\), [\d.]+ tiles/s, [\d.]+ MP/s, done", res.output), res.output


# -- exits and messages that tell the truth ------------------------------------------------


def test_progress_counts_every_input_with_its_failures(tmp_path, run_cli, monkeypatch, make_image):
    """Inputs that fail at their header (never planned) and at decoding count as done, with a failure."""
    from PIL import Image

    import tilerun.progress as progress_mod

    monkeypatch.setattr(progress_mod, "LOG_INTERVAL", 0.0)
    root = tmp_path / "in"
    root.mkdir()
    for i in range(3):
        Image.fromarray(make_image(20, 24, seed=i)).save(root / f"ok{i}.png")
    (root / "header.png").write_bytes(b"not a png")  # fails before planning
    whole = (root / "ok0.png").read_bytes()
    (root / "truncated.png").write_bytes(whole[: len(whole) // 2])  # fails at decoding
    res = run_cli(root, tmp_path / "out")
    assert res.exit_code == 1, res.output
    assert re.search(r"5/5 images \(2 failed\), (\d+)/\1 tiles \(100%\)", res.output), res.output
    res = run_cli(root, tmp_path / "out")  # the failures again, the rest already done
    assert re.search(r"5/5 images \(2 failed, 3 already done\), ", res.output), res.output


@pytest.mark.parametrize("options, message", [
    (["--device", "cuda"], "--device"),
    (["--device", "cuda:7"], "--device"),
    (["--device", "gpu"], "is not a device"),
    (["--backend", "mpi"], "--backend"),
    (["--tile", "-1"], "--tile"),
    (["--halo", "-1"], "--halo"),
    (["--batch-size", "0"], "--batch-size"),
    (["--format", "tiff"], "--format tiff needs tifffile"),
])
def test_usage_errors_exit_2_before_anything_runs(tmp_path, run_cli, monkeypatch, make_image, options, message):
    import torch
    from PIL import Image

    import tilerun.model
    import tilerun.tiff

    if options[-1].startswith("cuda") and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    monkeypatch.setattr(tilerun.tiff, "tifffile", None)  # as without the tiff extra
    monkeypatch.setattr(tilerun.model, "load_model", None)  # a usage error must not get as far as the model
    (tmp_path / "in").mkdir()
    Image.fromarray(make_image(8, 8)).save(tmp_path / "in" / "x.png")
    res = run_cli(tmp_path / "in", tmp_path / "out", *options)
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output and "internal error" not in res.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["rocket_out.png", "x.JPG", "scan.tif"])
def test_output_named_like_an_image_is_refused(tmp_path, run_cli, make_image, name):
    from PIL import Image

    Image.fromarray(make_image(8, 8)).save(tmp_path / "rocket.jpg")
    res = run_cli(tmp_path / "rocket.jpg", tmp_path / "out" / name)
    assert res.exit_code == 2, res.output
    assert "looks like an image file name" in res.output and "give a folder" in res.output
    assert not (tmp_path / "out").exists()
    (tmp_path / "out" / name).mkdir(parents=True)  # a folder that exists is a folder, whatever its name
    assert run_cli(tmp_path / "rocket.jpg", tmp_path / "out" / name).exit_code == 0


def test_probe_is_announced_once_and_the_summary_counts_the_whole_command(tmp_path, run_cli, monkeypatch,
                                                                          make_image):
    import time

    from PIL import Image

    import tilerun.model
    from tilerun.receptive import CACHE_ENV

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))  # a first run: nothing measured yet
    real = tilerun.model.load_model

    def slow_load(*a, **kw):  # time spent before the job proper (loading, probing) is the user's time too
        time.sleep(1.0)
        return real(*a, **kw)

    monkeypatch.setattr(tilerun.model, "load_model", slow_load)
    (tmp_path / "in").mkdir()
    Image.fromarray(make_image(12, 12)).save(tmp_path / "in" / "x.png")
    res = run_cli(tmp_path / "in", tmp_path / "out")
    assert res.exit_code == 0, res.output
    assert res.output.count("measuring the model's receptive field") == 1, res.output
    assert float(re.search(r"in ([\d.]+)s ->", res.output).group(1)) >= 1.0, res.output
    res = run_cli(tmp_path / "in", tmp_path / "out2")
    assert res.exit_code == 0 and "measuring" not in res.output, res.output  # remembered


SLOW_MODEL = '''
import time
import torch
from own_model import OwnModel

class Slow(OwnModel):
    def forward(self, image, mask):
        if torch.is_inference_mode_enabled():  # the job's forwards, not the probe's
            time.sleep(0.4)
        return super().forward(image, mask)

def make_model():
    torch.manual_seed(0)
    return Slow()
'''


def _env(tmp_path: Path) -> dict[str, str]:
    import os

    (tmp_path / "slow_model.py").write_text(SLOW_MODEL)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(EXAMPLES), env.get("PYTHONPATH", "")])
    env.pop("WORLD_SIZE", None)
    return env


@pytest.mark.parametrize("sig, status", [("SIGINT", 130), ("SIGTERM", 143)])
def test_interrupt_writes_the_report_and_a_rerun_resumes(tmp_path, make_image, sig, status):
    """A real process, Ctrl-C (or a scheduler's SIGTERM) mid-job: the report says what was done."""
    import json
    import signal
    import subprocess
    import sys
    import time

    from PIL import Image

    root, out = tmp_path / "in", tmp_path / "out"
    root.mkdir()
    names = [f"im{i}.png" for i in range(6)]
    for i, name in enumerate(names):
        Image.fromarray(make_image(32, 32, seed=i)).save(root / name)
    cmd = [sys.executable, "-m", "tilerun", "run", str(root), str(out), "--model", "slow_model:make_model",
           "--tile", "32", "--device", "cpu"]
    env = _env(tmp_path)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 240
    while not list(out.glob("*.inpainted.png")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == status, err
    assert "Traceback" not in err and "Aborted" not in err
    last = err.strip().splitlines()[-1]
    assert f"interrupted by {sig}" in last and "rerunning the same command resumes" in last, err
    report = json.loads((out / "tilerun-report.json").read_text())
    assert report["interrupted"] == sig
    status_of = {f["input"]: f["status"] for f in report["files"]}
    done = {n for n in names if (out / n.replace(".png", ".inpainted.png")).exists()}
    assert done and {n for n, s in status_of.items() if s == "ok"} == done  # the report matches the disk
    assert {s for n, s in status_of.items() if n not in done} == {"interrupted"} and len(status_of) == len(names)
    assert f"{len(done)} ok, 0 failed, 0 skipped (already done), {len(names) - len(done)} not done" in last
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    if sig == "SIGINT":
        rerun = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
        assert rerun.returncode == 0, rerun.stderr
        assert f"{len(names) - len(done)} ok, 0 failed, {len(done)} skipped" in rerun.stderr, rerun.stderr


@pytest.mark.parametrize("strict", [False, True])
def test_failed_inputs_under_torchrun_are_results_not_crashes(tmp_path, make_image, strict):
    """Under torchrun, a job that completed exits 0 with its failures in the summary and the
    report: a worker's exit 1 reads as a crash (torchrun's ChildFailedError traceback, and a
    restart with --max-restarts). --strict asks for exit 1."""
    import subprocess
    import sys

    from PIL import Image

    root = tmp_path / "in"
    root.mkdir()
    for i in range(3):
        Image.fromarray(make_image(20, 20, seed=i)).save(root / f"ok{i}.png")
    (root / "corrupt.png").write_bytes(b"\x89PNG not really")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "tilerun",
           "run", str(root), str(tmp_path / "out"), "--model", "own_model:make_model", "--tile", "16",
           "--device", "cpu", *(["--strict"] if strict else [])]
    p = subprocess.run(cmd, capture_output=True, text=True, env=_env(tmp_path), timeout=300)
    assert "3 ok, 1 failed, 0 skipped" in p.stderr, p.stderr
    if strict:
        assert p.returncode == 1, p.stderr
    else:
        assert p.returncode == 0, p.stderr
        assert "Traceback" not in p.stderr and "ChildFailedError" not in p.stderr
        assert "--strict makes it 1" in p.stderr
