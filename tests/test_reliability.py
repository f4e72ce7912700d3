"""Reliability of `tilerun run`: a corpus of bad inputs, exit codes, no tracebacks, the report,
atomic writes, OUTPUT inside INPUT, and resume."""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import tilerun.images
from tilerun.errors import InputImageError, OutputExistsError
from tilerun.images import InputItem, load_image, remove_stale_temps, set_max_pixels, write_png_atomic
from tilerun.report import REPORT_NAME
from tilerun.resume import MANIFEST_NAME, fingerprint

from cli_fixtures import model_file, other_model_file, run_cli  # noqa: F401  (fixtures)

RNG = np.random.default_rng(6)
# Pillow's own default, int(1024 * 1024 * 1024 // 4 // 3): what holds without --max-pixels.
PILLOW_MAX_PIXELS = 89_478_485


def noise(h: int, w: int) -> np.ndarray:
    a = RNG.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    assert a.size < 64 or (a.min() < 16 and a.max() > 239), "degenerate fixture"
    return a


def png_bytes(h: int, w: int) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(noise(h, w)).save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming ``width`` x ``height`` pixels: Pillow's guard must stop at the header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def report(out: Path) -> dict:
    return json.loads((out / REPORT_NAME).read_text(encoding="utf-8"))


def by_input(out: Path) -> dict[str, dict]:
    return {f["input"]: f for f in report(out)["files"]}


def mtimes(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_mtime_ns for p in sorted(folder.rglob("*.png"))}


def temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


# -- the bad-input corpus ------------------------------------------------------------------------------


@pytest.fixture
def corpus(tmp_path) -> tuple[Path, dict[str, str], list[str]]:
    """(folder, {bad input: expected reason (regex)}, [good inputs])."""
    root = tmp_path / "in"
    (root / "deep" / "er").mkdir(parents=True)
    good = {
        "ok.png": png_bytes(20, 24),
        "café au lait ☕ v2.png": png_bytes(9, 11),
        "with space.bmp": None,
        "photo.webp": None,
        "deep/er/one.png": png_bytes(1, 1),
        "looks like a file.png/inside.png": png_bytes(5, 6),  # a folder named like an image
    }
    (root / "looks like a file.png").mkdir()
    for name, data in good.items():
        if data is not None:
            (root / name).write_bytes(data)
    Image.fromarray(noise(7, 5)).save(root / "with space.bmp")
    Image.fromarray(noise(6, 9)).save(root / "photo.webp", lossless=True)
    Image.fromarray((np.arange(48, dtype=np.uint16).reshape(6, 8) * 1300)).save(root / "sixteen.png")
    good["sixteen.png"] = None

    full = png_bytes(30, 40)
    bad = {
        "empty.png": r"empty file \(0 bytes\)",
        "truncated.png": r"cannot decode: .*truncated",
        "notes.jpg": r"not an image Pillow can read",
        "random.webp": r"not an image Pillow can read",
        "bomb.png": r"too many pixels: 900,000,000 pixels, over the decompression-bomb limit of 89,478,485.*--max-pixels",
        "dangling.png": r"dangling symlink",
        "wrong size mask.png": r"mask wrong size mask\.mask\.png is 3x3 but the image is 5x4",
        "pipe.png": r"not a regular file",
    }
    os.mkfifo(root / "pipe.png")  # opening it for reading would wait for a writer forever
    (root / "empty.png").write_bytes(b"")
    (root / "truncated.png").write_bytes(full[: len(full) // 2])
    (root / "notes.jpg").write_text("these are my notes, not a photo\n")
    (root / "random.webp").write_bytes(RNG.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    (root / "bomb.png").write_bytes(bomb_png(30000, 30000))  # 900 megapixels in 100 bytes
    (root / "dangling.png").symlink_to(root / "no such file.png")
    Image.fromarray(noise(4, 5)).save(root / "wrong size mask.png")
    Image.fromarray(np.zeros((3, 3), np.uint8)).save(root / "wrong size mask.mask.png")
    return root, bad, sorted(good)


def test_bad_inputs_each_get_one_line_and_the_rest_run(corpus, tmp_path, run_cli, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", PILLOW_MAX_PIXELS)
    root, bad, good = corpus
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    out = tmp_path / "out"
    r = run_cli(root, out)
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output and isinstance(r.exception, SystemExit)
    lines = r.output.splitlines()
    for name, reason in bad.items():
        mine = [ln for ln in lines if name in ln]
        assert len(mine) == 1, (name, lines)
        assert re.search(reason, mine[0]), (name, mine[0])
    summary = lines[-1]
    assert summary.startswith(f"tilerun: {len(good)} ok, {len(bad)} failed, 0 skipped"), summary
    for name in good:  # good files go by quietly (a progress line may count them, never name them)
        assert not [ln for ln in lines if Path(name).name in ln], name

    files = by_input(out)
    assert sorted(k for k, f in files.items() if f["status"] == "ok") == good
    assert sorted(k for k, f in files.items() if f["status"] == "failed") == sorted(bad)
    for name in good:
        f = files[name]
        stem = Path(name).stem
        parent = Path(name).parent
        assert f["outputs"] == [(parent / f"{stem}.pred.png").as_posix(), (parent / f"{stem}.inpainted.png").as_posix()]
        assert all((out / p).is_file() for p in f["outputs"])
        w, h = Image.open(root / name).size
        assert f["size"] == [w, h] and f["tiles"] >= 1 and f["seconds"] >= 0 and f["error"] is None
    for name in bad:
        assert files[name]["error"] and files[name]["outputs"] == []
    assert report(out)["counts"] == {"ok": len(good), "failed": len(bad), "skipped": 0}
    # 16-bit input: stretched by its auto range (0.5-99.5%), neither white nor a few dark levels.
    sixteen = np.asarray(Image.open(out / "sixteen.inpainted.png"))
    assert sixteen.min() == 0 and sixteen.max() == 255 and len(np.unique(sixteen)) == 48
    # Inputs untouched, no temporary files anywhere.
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before
    assert not temp_files(out) and not temp_files(root)


def test_max_pixels_is_the_limit(tmp_path, run_cli, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", PILLOW_MAX_PIXELS)  # restored after: the CLI sets a process global
    root = tmp_path / "in"
    root.mkdir()
    Image.fromarray(noise(30, 40)).save(root / "big.png")  # 1200 pixels
    r = run_cli(root, tmp_path / "out", "--max-pixels", "1000")
    # 1200 is below twice 1000, where Pillow would only warn: the limit given is the limit.
    assert r.exit_code == 1 and "big.png: too many pixels" in r.output and "--max-pixels" in r.output, r.output
    r = run_cli(root, tmp_path / "out", "--max-pixels", "1200")
    assert r.exit_code == 0, r.output


def test_decompression_bomb_guard_by_default(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", PILLOW_MAX_PIXELS)
    # Between the limit and twice it Pillow only warns; tilerun refuses (10000 x 9000 = 90 MP).
    (tmp_path / "bomb.png").write_bytes(bomb_png(10000, 9000))
    with pytest.raises(InputImageError, match="--max-pixels"):
        load_image(InputItem(tmp_path / "bomb.png", Path("bomb.png")))
    set_max_pixels(None)  # no limit: the header passes, the (fake) pixel data then fails to decode
    with pytest.raises(InputImageError, match="cannot decode"):
        load_image(InputItem(tmp_path / "bomb.png", Path("bomb.png")))
    with pytest.raises(ValueError, match="--max-pixels"):
        set_max_pixels(0)


# -- exit codes and tracebacks -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "input_name, options, message",
    [
        ("missing", [], "does not exist"),
        ("empty", [], "no images found"),
        ("in", ["--tile", "3"], "--tile must be"),
        ("in", ["--max-pixels", "-5"], "--max-pixels"),
        ("in", ["--no-such-option"], "No such option"),
    ],
)
def test_usage_errors_exit_2(tmp_path, run_cli, input_name, options, message):
    (tmp_path / "in").mkdir()
    (tmp_path / "empty").mkdir()
    Image.fromarray(noise(4, 4)).save(tmp_path / "in" / "x.png")
    r = run_cli(tmp_path / input_name, tmp_path / "out", *options)
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output
    assert not (tmp_path / "out").exists()  # nothing written


def test_internal_error_is_one_line_without_v_and_a_traceback_with_v(tmp_path, run_cli, monkeypatch):
    import tilerun.runner

    def boom(*a, **kw):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(tilerun.runner, "run_job", boom)
    (tmp_path / "in").mkdir()
    Image.fromarray(noise(4, 4)).save(tmp_path / "in" / "x.png")
    r = run_cli(tmp_path / "in", tmp_path / "out")
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit)
    assert r.output.strip().splitlines() == ["Error: internal error: RuntimeError: simulated bug (rerun with -v for the traceback)"]
    r = run_cli(tmp_path / "in", tmp_path / "out", "-v")
    assert isinstance(r.exception, RuntimeError)  # -v lets it through: Python prints the traceback


@pytest.fixture(scope="session")
def narrow_model_file(tmp_path_factory) -> Path:
    """A 4-channel TileNet: its probe takes about 2 s, which a subprocess (no shared probe) must pay."""
    from tilerun.model import TileNetConfig, init_tilenet, save_tilenet

    path = tmp_path_factory.mktemp("model") / "narrow.safetensors"
    save_tilenet(init_tilenet(TileNetConfig(classes=4, stem=4, mid=4, width=4, global_dim=4)), path)
    return path


def test_no_traceback_in_a_real_process(tmp_path, corpus, narrow_model_file):
    """A subprocess, as a user runs it: stderr holds one line per bad file and the summary."""
    root, bad, good = corpus
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    p = subprocess.run([sys.executable, "-m", "tilerun", "run", str(root), str(tmp_path / "out"), "--model",
                        str(narrow_model_file), "--device", "cpu"], capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 1, p.stderr
    assert "Traceback" not in p.stderr + p.stdout
    lines = p.stderr.strip().splitlines()
    assert all(sum(Path(name).name in ln for ln in lines) == 1 for name in bad), p.stderr
    assert f"{len(good)} ok, {len(bad)} failed, 0 skipped" in lines[-1], p.stderr


# -- names, OUTPUT inside INPUT, atomic writes ---------------------------------------------------------------


def test_same_stem_inputs_keep_their_extension(tmp_path, run_cli):
    root = tmp_path / "in"
    root.mkdir()
    Image.fromarray(noise(10, 12)).save(root / "x.png")
    Image.fromarray(noise(10, 12)).save(root / "x.bmp")
    Image.fromarray(noise(10, 12)).save(root / "y.png")
    out = tmp_path / "out"
    assert run_cli(root, out).exit_code == 0
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == ["x.bmp.inpainted.png", "x.bmp.pred.png", "x.png.inpainted.png", "x.png.pred.png",
                     "y.inpainted.png", "y.pred.png"]
    a = np.asarray(Image.open(out / "x.png.inpainted.png"))
    b = np.asarray(Image.open(out / "x.bmp.inpainted.png"))
    assert (a != b).any()  # two inputs, two different outputs: neither overwrote the other


@pytest.mark.parametrize("inside", ["out", "."])
def test_output_inside_input_is_never_read_back(tmp_path, run_cli, inside):
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    Image.fromarray(noise(10, 12)).save(root / "a.png")
    Image.fromarray(noise(8, 8)).save(root / "sub" / "b.jpg")
    out = root / inside
    for _ in range(2):
        r = run_cli(root, out)
        assert r.exit_code == 0, r.output
        assert sorted(by_input(out)) == ["a.png", "sub/b.jpg"]
    assert by_input(out)["a.png"]["status"] == "skipped"
    assert not temp_files(root)


def test_write_png_atomic_leaves_nothing_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "x.pred.png"
    target.write_bytes(b"previous complete output")

    class Broken(Exception):
        pass

    def write_png(f, *a, **kw):
        f.write(b"half a png")
        raise Broken("disk full")

    monkeypatch.setattr(tilerun.images, "write_png", write_png)
    with pytest.raises(Broken):
        write_png_atomic(np.zeros((2, 2, 3), np.uint8), target)
    assert target.read_bytes() == b"previous complete output"
    assert sorted(os.listdir(tmp_path)) == ["x.pred.png"]


def test_stale_temps_of_a_killed_writer_are_removed(tmp_path, run_cli):
    root, out = tmp_path / "in", tmp_path / "out"
    root.mkdir()
    out.mkdir()
    Image.fromarray(noise(10, 12)).save(root / "a.png")
    stale = out / ".a.pred.png.k1ll3d.tmp"  # what SIGKILL during write_png_atomic leaves
    stale.write_bytes(b"half")
    unrelated = out / "keep.tmp"
    unrelated.write_bytes(b"not ours")
    assert run_cli(root, out, "--overwrite").exit_code == 0
    assert not stale.exists() and unrelated.exists()
    assert remove_stale_temps([out / "a.pred.png"]) == 0


def test_ctrl_c_during_a_write_leaves_no_temp_file(tmp_path):
    """The writer is a daemon thread: the interpreter's exit stops it mid-PNG; the exit hook removes its temp."""
    script = f"""
import glob, threading, time
import numpy as np
from tilerun.images import write_png_atomic
noise = np.random.default_rng(0).integers(0, 256, (4000, 4000, 3), dtype=np.uint8)
threading.Thread(target=write_png_atomic, args=(noise, {str(tmp_path / "x.pred.png")!r}),
                 kwargs={{"compress_level": 9}}, daemon=True).start()
while not glob.glob({str(tmp_path / ".x.pred.png.*.tmp")!r}):
    time.sleep(0.005)
raise KeyboardInterrupt  # what Ctrl-C raises in the main thread
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "KeyboardInterrupt" in proc.stderr  # it died while the thread was writing
    assert os.listdir(tmp_path) == []


# -- resume ---------------------------------------------------------------------------------------------------


@pytest.fixture
def three(tmp_path) -> Path:
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    for name, (h, w) in {"a.png": (12, 14), "b.png": (9, 20), "sub/c.png": (16, 16)}.items():
        Image.fromarray(noise(h, w)).save(root / name)
    return root


def test_resume_skips_done_work_and_redoes_only_the_missing(three, tmp_path, run_cli):
    out = tmp_path / "out"
    assert run_cli(three, out).exit_code == 0
    first = mtimes(out)
    assert len(first) == 6

    r = run_cli(three, out)
    assert r.exit_code == 0 and "0 ok, 0 failed, 3 skipped" in r.output, r.output
    assert mtimes(out) == first  # finished outputs are not rewritten
    assert {f["status"] for f in by_input(out).values()} == {"skipped"}
    assert by_input(out)["b.png"]["size"] == [20, 9] and by_input(out)["b.png"]["outputs"] == ["b.pred.png", "b.inpainted.png"]

    # A job killed part-way: one input never written, one with only its first output.
    (out / "b.pred.png").unlink()
    (out / "b.inpainted.png").unlink()
    (out / "sub" / "c.inpainted.png").unlink()
    r = run_cli(three, out)
    assert r.exit_code == 0 and "2 ok, 0 failed, 1 skipped" in r.output, r.output
    now = mtimes(out)
    assert now["a.pred.png"] == first["a.pred.png"] and now["a.inpainted.png"] == first["a.inpainted.png"]
    assert set(now) == set(first)

    # An edited input is redone; the others are not.
    Image.fromarray(noise(12, 14)).save(three / "a.png")
    r = run_cli(three, out)
    assert "1 ok, 0 failed, 2 skipped" in r.output, r.output
    assert by_input(out)["a.png"]["status"] == "ok"


def test_other_settings_refused_until_overwrite(three, tmp_path, run_cli, other_model_file):
    out = tmp_path / "out"
    assert run_cli(three, out).exit_code == 0
    first = mtimes(out)
    r = run_cli(three, out, model=other_model_file)
    assert r.exit_code == 2, r.output
    assert "--overwrite" in r.output and "model differs" in r.output and "Traceback" not in r.output
    assert mtimes(out) == first

    # A smaller halo than measured changes outputs: also refused.
    r = run_cli(three, out, "--halo", "4")
    assert r.exit_code == 2 and "--overwrite" in r.output, r.output
    assert "--halo 4, was exact; --tile 64, was exact" in r.output, r.output
    # Another tile size with the exact halo does not change outputs: resumed.
    r = run_cli(three, out, tile=32)
    assert r.exit_code == 0 and "3 skipped" in r.output, r.output

    r = run_cli(three, out, "--overwrite", model=other_model_file)
    assert r.exit_code == 0 and "3 ok" in r.output, r.output
    again = mtimes(out)
    assert all(again[k] != first[k] for k in first)  # every output redone
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert report(out)["settings"] == manifest["fingerprint"]
    # The folder now belongs to the other model: plain reruns resume with it.
    r = run_cli(three, out, model=other_model_file)
    assert r.exit_code == 0 and "3 skipped" in r.output, r.output


def test_interrupted_overwrite_resumes_with_the_new_settings(three, tmp_path, run_cli, other_model_file):
    out = tmp_path / "out"
    assert run_cli(three, out).exit_code == 0
    # --overwrite with the other model, killed after a.png: simulated by claiming the folder and
    # redoing a.png alone (the manifest is written before any output).
    only_a = tmp_path / "only_a"
    only_a.mkdir()
    (only_a / "a.png").symlink_to(three / "a.png")
    assert run_cli(only_a / "a.png", out, "--overwrite", model=other_model_file).exit_code == 0
    r = run_cli(three, out, model=other_model_file)
    assert r.exit_code == 0 and "2 ok, 0 failed, 1 skipped" in r.output, r.output


def test_another_folders_same_named_input_is_refused_and_a_moved_folder_resumes(three, tmp_path, run_cli):
    out = tmp_path / "out"
    assert run_cli(three, out).exit_code == 0
    first = mtimes(out)
    other = tmp_path / "other"
    other.mkdir()
    Image.fromarray(noise(7, 9)).save(other / "a.png")  # another photo, the same name
    r = run_cli(other, out)
    assert r.exit_code == 2, r.output
    assert f"made from another file, {three / 'a.png'}" in r.output and "--overwrite" in r.output, r.output
    assert mtimes(out) == first
    # The same files in a moved folder are the same inputs: resumed, nothing redone.
    moved = tmp_path / "moved"
    three.rename(moved)
    r = run_cli(moved, out)
    assert r.exit_code == 0 and "3 skipped" in r.output, r.output
    r = run_cli(other, out, "--overwrite")
    assert r.exit_code == 0 and "1 ok" in r.output, r.output


def test_outputs_of_unknown_origin_are_not_replaced(three, tmp_path, run_cli):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.pred.png").write_bytes(b"someone else's file")
    r = run_cli(three, out)
    assert r.exit_code == 2 and "--overwrite" in r.output, r.output
    assert (out / "a.pred.png").read_bytes() == b"someone else's file"
    assert run_cli(three, out, "--overwrite").exit_code == 0


def test_fingerprint_holds_tile_only_when_the_halo_is_inexact(sensitive_model, sensitive_probe):
    from tilerun.engine import Engine
    from tilerun.resume import Fingerprint

    exact = {t: fingerprint(model=sensitive_model, engine=Engine(sensitive_model, tile=t, probe=sensitive_probe))
             for t in (0, 32, 64)}
    assert len({fp.digest for fp in exact.values()}) == 1
    assert set(exact[64].settings) == {"code", "model", "model_file", "receptive"}
    assert exact[64].settings["receptive"] == [sensitive_probe.halo, sensitive_probe.stride]
    short = Engine(sensitive_model, tile=32, halo=sensitive_probe.halo - 4, probe=sensitive_probe)
    fp = fingerprint(model=sensitive_model, engine=short)
    assert fp.settings["halo"] == sensitive_probe.halo - 4 and fp.settings["tile"] == 32
    assert fp.digest != exact[32].digest
    edited = Fingerprint({**fp.settings, "code": "0" * 64})  # tilerun's pixel code edited
    assert edited.digest != fp.digest and edited.differences(fp.settings) == [
        "tilerun's code differs (another version, or an edited install)"]


def test_manifest_refusal_is_an_output_exists_error(tmp_path, sensitive_model, sensitive_probe):
    from tilerun.engine import Engine
    from tilerun.resume import Fingerprint, Manifest

    fp = fingerprint(model=sensitive_model, engine=Engine(sensitive_model, tile=64, probe=sensitive_probe))
    Manifest(tmp_path, fp, overwrite=False).claim()
    Manifest.load(tmp_path, fp)  # the same settings: fine
    with pytest.raises(OutputExistsError, match="model differs.*--overwrite"):
        Manifest.load(tmp_path, Fingerprint({**fp.settings, "model": "0" * 64}))
    Manifest.load(tmp_path, Fingerprint({**fp.settings, "model": "0" * 64}), overwrite=True)
