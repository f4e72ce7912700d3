"""What resume may trust: the fingerprint knows what made an output (the model file's code,
a factory's source, tilerun's own), one job per OUTPUT (a lock), inputs known by content,
and temporary files of a live job left alone."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from cli_fixtures import model_file, run_cli  # noqa: F401  (fixtures)
from tilerun.errors import OutputBusyError
from tilerun.images import _HOST, remove_stale_temps, write_png_atomic
from tilerun.resume import LOCK_NAME, MANIFEST_NAME, OutputLock, content_digest, sample_spans


def noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def by_input(out: Path) -> dict[str, dict]:
    return {f["input"]: f for f in json.loads((out / "tilerun-report.json").read_text())["files"]}


# -- the fingerprint knows what made an output ---------------------------------------------------------------


class _Conv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 5, 3, padding=1)  # 5 classes: logits alone (3 channels would be RGB)

    def forward(self, image, mask):
        return self.conv(torch.cat([image, mask], 1))


class _ConvNegated(_Conv):
    def forward(self, image, mask):
        return -self.conv(torch.cat([image, mask], 1))  # the same weights, another forward


def test_torchscript_with_the_same_weights_and_another_forward_is_refused(tmp_path, run_cli):
    torch.manual_seed(0)
    a = _Conv()
    b = _ConvNegated()
    b.load_state_dict(a.state_dict())
    for name, m in (("a.pt", a), ("b.pt", b)):
        torch.jit.save(torch.jit.script(m.eval()), tmp_path / name)
    root, out = tmp_path / "in", tmp_path / "out"
    root.mkdir()
    Image.fromarray(noise(20, 24)).save(root / "x.png")
    assert run_cli(root, out, model=tmp_path / "a.pt", tile=16).exit_code == 0
    before = (out / "x.pred.png").read_bytes()
    r = run_cli(root, out, model=tmp_path / "b.pt", tile=16)
    assert r.exit_code == 2, r.output
    assert "model differs" in r.output and "--overwrite" in r.output, r.output
    assert (out / "x.pred.png").read_bytes() == before
    r = run_cli(root, out, "--overwrite", model=tmp_path / "b.pt", tile=16)
    assert r.exit_code == 0 and "1 ok" in r.output, r.output
    assert (out / "x.pred.png").read_bytes() != before


def test_a_factorys_source_is_part_of_the_model(tmp_path, monkeypatch):
    from tilerun.model import load_model

    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    source = textwrap.dedent("""
        import torch
        from torch import nn

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(4, 3, 3, padding=1)

            def forward(self, image, mask):
                return self.conv(torch.cat([image, mask], 1)) * SCALE

        SCALE = 1.0

        def make():
            torch.manual_seed(0)
            return Net()
    """)
    identities = []
    for scale in ("1.0", "2.0"):
        (tmp_path / "factory_mod.py").write_text(source.replace("SCALE = 1.0", f"SCALE = {scale}"))
        sys.modules.pop("factory_mod", None)
        identities.append(load_model("factory_mod:make").tilerun_identity)
    sys.modules.pop("factory_mod", None)
    assert identities[0].startswith("import ") and identities[0] != identities[1]


def test_an_older_manifest_is_refused(tmp_path, run_cli):
    root, out = tmp_path / "in", tmp_path / "out"
    root.mkdir()
    Image.fromarray(noise(10, 12)).save(root / "a.png")
    assert run_cli(root, out).exit_code == 0
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    (out / MANIFEST_NAME).write_text(json.dumps({**manifest, "format": "tilerun.manifest/1"}))
    r = run_cli(root, out)
    assert r.exit_code == 2 and "older tilerun" in r.output and "--overwrite" in r.output, r.output
    assert run_cli(root, out, "--overwrite").exit_code == 0


# -- inputs known by content ------------------------------------------------------------------------------------


def test_a_replaced_input_with_the_same_size_and_mtime_is_redone(tmp_path, run_cli):
    root, out = tmp_path / "in", tmp_path / "out"
    root.mkdir()
    for name, seed in (("a.bmp", 0), ("b.bmp", 1)):  # BMP: the same size in bytes for any pixels
        Image.fromarray(noise(16, 20, seed)).save(root / name)
    assert run_cli(root, out).exit_code == 0
    st = (root / "a.bmp").stat()
    Image.fromarray(noise(16, 20, seed=7)).save(root / "a.bmp")  # `cp -p` of another photo
    os.utime(root / "a.bmp", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (root / "a.bmp").stat().st_size == st.st_size
    r = run_cli(root, out)
    assert r.exit_code == 0 and "1 ok, 0 failed, 1 skipped" in r.output, r.output
    assert by_input(out)["a.bmp"]["status"] == "ok"


def test_the_sampled_digest_and_the_full_one(tmp_path):
    """The rule as documented: the samples see the ends and the middle of a big file, not every byte;
    --verify-inputs' full digest does."""
    path = tmp_path / "big.raw"
    data = bytearray(np.random.default_rng(0).integers(0, 256, 9 * 2**20, dtype=np.uint8).tobytes())
    path.write_bytes(data)
    sampled, full = content_digest(path), content_digest(path, full=True)
    for offset, seen in ((10, True), (len(data) // 2, True), (len(data) - 1, True), (2 * 2**20 + 12345, False)):
        edited = bytearray(data)
        edited[offset] ^= 0xFF
        path.write_bytes(edited)
        assert (content_digest(path) != sampled) == seen, offset
        assert content_digest(path, full=True) != full


def test_verify_inputs_redoes_an_edit_the_samples_miss(tmp_path, run_cli):
    root, out = tmp_path / "in", tmp_path / "out"
    root.mkdir()
    path = root / "a.tif"
    Image.fromarray(noise(1100, 1400)).save(path)  # uncompressed, over 4 MiB: sampled, not read whole
    assert run_cli(root, out, "--verify-inputs", tile=0).exit_code == 0  # whole image: one forward
    st = path.stat()
    spans = sample_spans(st.st_size)
    offset = (spans[6][0] + spans[7][0]) // 2  # between two sampled blocks, in the pixel data
    assert not any(o <= offset < o + n for o, n in spans) and 2**20 < offset < st.st_size // 2
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    r = run_cli(root, out, tile=0)
    assert r.exit_code == 0 and "1 skipped" in r.output, r.output  # the documented blind spot
    r = run_cli(root, out, "--verify-inputs", tile=0)
    assert r.exit_code == 0 and "1 ok" in r.output, r.output


# -- durable renames --------------------------------------------------------------------------------------------


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to tell a folder's descriptor")
def test_a_rename_is_followed_by_an_fsync_of_its_folder(tmp_path, monkeypatch):
    from tilerun.resume import write_json_atomic

    synced = []
    real = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    write_png_atomic(noise(4, 4), tmp_path / "x.png")
    write_json_atomic({"a": 1}, tmp_path / "sub" / "y.json")
    assert synced[1:] == [str(tmp_path), synced[2], str(tmp_path / "sub")], synced


# -- one job per OUTPUT ---------------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]),
                                                                            os.environ.get("PYTHONPATH", "")]))
    env.pop("WORLD_SIZE", None)
    return env


_HOLD = """
import sys, time
from tilerun.resume import OutputLock
OutputLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(600)
"""


def test_the_lock_is_released_after_a_job_and_after_a_crash(tmp_path, run_cli):
    root, out = tmp_path / "in", tmp_path / "out"
    root.mkdir()
    Image.fromarray(noise(10, 12)).save(root / "a.png")
    assert run_cli(root, out).exit_code == 0
    assert (out / LOCK_NAME).exists() and (out / LOCK_NAME).read_text() == ""  # released, holder line emptied
    OutputLock(out).acquire().release()

    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], stdout=subprocess.PIPE, text=True, env=_env())
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputBusyError, match=rf"pid {holder.pid}, since .*choose another OUTPUT"):
            OutputLock(out).acquire()
        r = run_cli(root, out, "--overwrite")  # --overwrite does not take a running job's OUTPUT
        assert r.exit_code == 2 and f"pid {holder.pid}" in r.output, r.output
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    OutputLock(out).acquire().release()  # the kernel dropped the killed holder's lock


def test_temps_of_a_live_writer_are_left_alone(tmp_path):
    target = tmp_path / "a.pred.png"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout.strip()
        mine = tmp_path / f".a.pred.png.{_HOST}-{os.getpid()}-abc.tmp"
        gone = tmp_path / f".a.pred.png.{_HOST}-{dead}-abc.tmp"
        live = tmp_path / f".a.pred.png.{_HOST}-{sleeper.pid}-abc.tmp"
        elsewhere = tmp_path / ".a.pred.png.otherhost-1-abc.tmp"
        for p in (mine, gone, live, elsewhere):
            p.write_bytes(b"half")
        assert remove_stale_temps([target]) == 2
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, elsewhere.name])
        since = time.time() + 10  # a lock taken after they were written: they are a dead job's
        assert remove_stale_temps([target], since=since) == 2
    finally:
        sleeper.kill()
        sleeper.wait()


_GATED_FACTORY = """
import os, time
import torch
from torch import nn


class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, image, mask):
        # The engine's forwards (one tile each, float32; the contract check runs two, the probe
        # float64) wait until the test lets them go: the job holds OUTPUT meanwhile.
        while image.shape[0] == 1 and image.dtype == torch.float32 and not os.path.exists(os.environ["GATE"]):
            time.sleep(0.02)
        x = torch.cat([image, mask], 1)
        return self.conv(x), torch.sigmoid(self.conv(x))


def make():
    torch.manual_seed(0)
    return Gated()
"""


def test_a_second_job_into_a_running_jobs_output_refuses(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "gated_model.py").write_text(_GATED_FACTORY)
    root = tmp_path / "in"
    root.mkdir()
    Image.fromarray(noise(128, 160)).save(root / "a.png")
    Image.fromarray(noise(96, 96, seed=1)).save(root / "b.png")
    gate = tmp_path / "go"

    def job(out: Path) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "tilerun", "run", str(root), str(out), "--model", "gated_model:make", "--tile", "32",
             "--batch-size", "1", "--device", "cpu"],
            cwd=tmp_path / "models", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=dict(_env(), GATE=str(gate)))

    out = tmp_path / "out"
    first = job(out)
    deadline = time.monotonic() + 120
    while f"pid {first.pid}" not in ((out / LOCK_NAME).read_text() if (out / LOCK_NAME).exists() else ""):
        assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()
        time.sleep(0.05)
    second = job(out)
    try:
        _, err = second.communicate(timeout=300)
        assert second.returncode == 2, err
        assert f"is in use by another tilerun job (host {socket.gethostname()}, pid {first.pid}, since" in err, err
        assert "Traceback" not in err
        assert first.poll() is None  # still waiting at the gate: the two overlapped
    finally:
        gate.touch()
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    solo = job(tmp_path / "solo")
    assert solo.wait(timeout=300) == 0, solo.stderr.read()
    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert names == ["a.inpainted.png", "a.pred.png", "b.inpainted.png", "b.pred.png"]
    for name in names:  # the refused job touched nothing: the outputs are a solo run's, byte for byte
        assert (out / name).read_bytes() == (tmp_path / "solo" / name).read_bytes(), name
