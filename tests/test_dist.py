"""Real torchrun launches on the CPU (Gloo): N processes and 2 loopback nodes equal one process, byte for byte."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

TIMEOUT = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    return env


def run_tilerun(args: list[str], *, nproc: int | None = None, extra: list[str] = ()) -> subprocess.CompletedProcess:
    if nproc is None:
        cmd = [sys.executable, "-m", "tilerun", "run", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *extra,
               "-m", "tilerun", "run", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=_env())


def outputs(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.png"))}


def assert_same_outputs(folder: Path, reference: dict[str, bytes]) -> None:
    """Byte equality, with a diagnosis on failure: which files, and pixels or only metadata."""
    import io

    got = outputs(folder)
    assert sorted(got) == sorted(reference)
    diffs = []
    for name, data in got.items():
        if data != reference[name]:
            a = np.asarray(Image.open(io.BytesIO(data))).astype(int)
            b = np.asarray(Image.open(io.BytesIO(reference[name]))).astype(int)
            diffs.append(f"{name}: {(a != b).sum()} pixels differ (max {np.abs(a - b).max()}), "
                         f"text {Image.open(io.BytesIO(data)).info == Image.open(io.BytesIO(reference[name])).info}")
    assert not diffs, diffs


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Real photo crops of uneven sizes, one with transparent holes, one in a subfolder."""
    root = tmp_path_factory.mktemp("in")
    src = np.asarray(Image.open(Path(__file__).parent.parent / "sample_images" / "chelsea.png").convert("RGB"))
    (root / "sub").mkdir()
    Image.fromarray(src[:131, :197]).save(root / "a.png")
    rgba = np.dstack([src[50:150, 100:261], np.full((100, 161), 255, np.uint8)])
    rgba[30:60, 40:90, 3] = 0
    Image.fromarray(rgba).save(root / "sub" / "holes.png")
    Image.fromarray(src[:67, 300:400]).save(root / "sub" / "small.jpg", quality=95)
    return root


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("ref")
    r = run_tilerun([str(inputs), str(out), "--tile", "64"])
    assert r.returncode == 0, r.stderr
    ref = outputs(out)
    assert len(ref) == 6
    return ref


@pytest.mark.parametrize("nproc", [2, 3])
def test_processes_match_one_process(inputs, reference, tmp_path, nproc):
    r = run_tilerun([str(inputs), str(tmp_path), "--tile", "64"], nproc=nproc)
    assert r.returncode == 0, r.stderr
    assert_same_outputs(tmp_path, reference)
    # Only rank 0 prints the summary.
    assert r.stderr.count(" ok, ") == 1, r.stderr
    report = json.loads((tmp_path / "tilerun-report.json").read_text())
    ranks = report["ranks"]
    assert [s["rank"] for s in ranks] == list(range(nproc))
    # Every tile computed exactly once across the processes, in both passes.
    total = sum(f["tiles"] for f in report["files"])
    assert sum(s["tiles"]["main"] for s in ranks) == total
    assert sum(s["tiles"]["global"] for s in ranks) == total


def test_two_nodes_on_loopback(inputs, reference, tmp_path):
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=tilerun-test",
           "-m", "tilerun", "run", str(inputs), str(tmp_path), "--tile", "64"]
    agents = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env()) for _ in range(2)]
    results = [a.communicate(timeout=TIMEOUT) for a in agents]
    for a, (_, err) in zip(agents, results):
        assert a.returncode == 0, err
    assert_same_outputs(tmp_path, reference)


def test_work_list_is_checked(inputs, tmp_path):
    """Processes that see different options refuse to run instead of stitching garbage."""
    from tilerun.dist import Context  # noqa: F401  (import check: the module loads without torchrun)

    script = tmp_path / "disagree.py"
    script.write_text(
        "import os, sys\n"
        "from tilerun.cli import main\n"
        "tile = '64' if os.environ['RANK'] == '0' else '128'\n"
        f"main(['run', {str(inputs)!r}, {str(tmp_path / 'out')!r}, '--tile', tile], prog_name='tilerun')\n"
    )
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script)],
                       capture_output=True, text=True, timeout=TIMEOUT, env=_env())
    assert r.returncode != 0
    assert "disagree on the work list" in r.stderr


def test_crashing_process_fails_the_job_fast_with_its_error(inputs, tmp_path):
    """A process that raises ends the job at once (no collective to hang in) and its error reaches the user."""
    (tmp_path / "crashmodel.py").write_text(
        "import os, torch\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.conv = torch.nn.Conv2d(4, 3, 3, padding=1)\n"
        "    def forward(self, image, mask):\n"
        "        if os.environ.get('RANK') == '1' and not torch.is_grad_enabled():\n"
        "            raise RuntimeError('boom from rank 1')\n"
        "        return torch.sigmoid(self.conv(torch.cat([image * (1 - mask), mask], 1)))\n"
        "def make():\n"
        "    torch.manual_seed(0)\n"
        "    return Net()\n"
    )
    env = dict(_env(), PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "tilerun", "run", str(inputs), str(tmp_path / "out"), "--tile", "64", "--model", "crashmodel:make"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=env)
    assert r.returncode != 0
    assert "boom from rank 1" in r.stderr


def test_claims_are_whole_batches_whatever_their_size():
    # The batches (hence the bits) must not depend on how many go to a claim, which differs
    # between one process (CLAIM_BATCHES_ALONE per worker) and several (fewer).
    from tilerun.geometry import grid
    from tilerun.scheduler import _chunks

    tiles = grid(1000, 1300, tile=256, halo=40, stride=4)  # several window shapes
    assert len({t.window_shape for t in tiles}) > 3

    def batches_of(chunks, batch):  # as the engine forms them: within each call (chunk)
        out = []
        for c in chunks:
            mine: list[list[int]] = []
            for i in c:
                if mine and len(mine[-1]) < batch and tiles[mine[-1][0]].window_shape == tiles[i].window_shape:
                    mine[-1].append(i)
                else:
                    mine.append([i])
            out += mine
        return out

    for batch in (1, 3):
        reference = batches_of(_chunks(tiles, batch, 1), batch)
        assert all(len({tiles[i].window_shape for i in b}) == 1 for b in reference)
        for per_claim in (2, 5, 16):
            chunks = _chunks(tiles, batch, per_claim)
            assert sorted(i for c in chunks for i in c) == list(range(len(tiles)))  # each tile once
            assert batches_of(chunks, batch) == reference
            assert max(len(c) for c in chunks) <= batch * per_claim
        assert len(_chunks(tiles, batch, 16)) < len(_chunks(tiles, batch, 2))
