"""Real torchrun launches on the CPU (Gloo): N processes and 2 loopback nodes equal one process, byte for byte."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
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


def _rank_of_children(pid: int) -> dict[int, int]:
    """RANK -> pid of a torchrun agent's workers."""
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    ranks = {}
    for child in map(int, out.split()):
        try:
            env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        ranks.update({int(kv[5:]): child for kv in env if kv.startswith(b"RANK=")})
    return ranks


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


def _two_nodes(args: list[str], threads: tuple[str, str] = ("1", "1")) -> list[tuple[int, str]]:
    """Two torchrun agents of one node each on loopback (c10d rendezvous), with OMP_NUM_THREADS ``threads``."""
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=tilerun-test",
           "-m", "tilerun", "run", *args]
    agents = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=dict(_env(), OMP_NUM_THREADS=n)) for n in threads]
    errs = [a.communicate(timeout=TIMEOUT)[1] for a in agents]
    return [(a.returncode, err) for a, err in zip(agents, errs)]


def test_two_nodes_with_other_thread_counts_match_one_process(inputs, tmp_path):
    """Nodes with other core counts (OMP_NUM_THREADS 2 and 1) split a job as rank 0 planned it, and the
    bytes are one process's. --batch-size 1 gives the images enough batches that the two thread
    counts would pick other claim sizes (when each node planned for itself, it numbered the same
    task differently: pixels left zero, or, with these two images, a wait on a task no rank computes)."""
    shared, inputs = inputs, tmp_path / "in"
    (inputs / "sub").mkdir(parents=True)
    for name in ("a.png", "sub/small.jpg"):
        (inputs / name).write_bytes((shared / name).read_bytes())
    ref = tmp_path / "ref"
    r = run_tilerun([str(inputs), str(ref), "--tile", "64", "--batch-size", "1"])
    assert r.returncode == 0, r.stderr
    for rc, err in _two_nodes([str(inputs), str(tmp_path / "out"), "--tile", "64", "--batch-size", "1"], ("2", "1")):
        assert rc == 0, err
    assert_same_outputs(tmp_path / "out", outputs(ref))


def _disagreeing_job(tmp_path: Path, inputs: Path, option: str, rank0: str, rank1: str) -> subprocess.CompletedProcess:
    """Two processes that differ in one option: ``rank0`` on rank 0, ``rank1`` on rank 1."""
    script = tmp_path / "disagree.py"
    script.write_text(
        "import os, sys\n"
        "from tilerun.cli import main\n"
        f"value = {rank0!r} if os.environ['RANK'] == '0' else {rank1!r}\n"
        f"main(['run', {str(inputs)!r}, {str(tmp_path / 'out')!r}, '--tile', '64', {option!r}, value], prog_name='tilerun')\n"
    )
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script)],
                          capture_output=True, text=True, timeout=TIMEOUT, env=_env())


@pytest.fixture(scope="module")
def other_weights(tmp_path_factory) -> tuple[str, str]:
    """The shipped model saved twice: as it is, and with one weight changed (other outputs)."""
    import torch

    from tilerun.model import load_model, save_tilenet

    folder = tmp_path_factory.mktemp("weights")
    model = load_model(None)
    save_tilenet(model, folder / "same.safetensors")
    with torch.no_grad():
        next(p for p in model.parameters() if p.ndim > 1).add_(0.5)
    save_tilenet(model, folder / "other.safetensors")
    return str(folder / "same.safetensors"), str(folder / "other.safetensors")


@pytest.mark.parametrize("option, rank0, rank1, message", [
    ("--tile", "64", "128", "rank 1 disagrees with rank 0 on --tile: 128 vs 64"),
    ("--batch-size", "1", "2", "rank 1 disagrees with rank 0 on --batch-size: 2 vs 1"),
    ("--model", None, None, "rank 1 disagrees with rank 0 on --model: sha256 "),
])
def test_processes_that_differ_are_refused_naming_the_setting(inputs, tmp_path, other_weights, option, rank0, rank1,
                                                                message):
    """A process with another option or model file stops the job at once, before anything is written,
    with one line naming the rank, the setting and both values."""
    if option == "--model":
        rank0, rank1 = other_weights
    t0 = time.monotonic()
    r = _disagreeing_job(tmp_path, inputs, option, rank0, rank1)
    assert r.returncode != 0
    assert message in r.stderr, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("Error:")]
    assert len(set(lines)) == 1, lines  # one message, whichever ranks print it
    assert time.monotonic() - t0 < 120  # not a store timeout (30 min)
    assert not (tmp_path / "out").exists()


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


@pytest.mark.parametrize("keep_features", [False, True])
def test_claims_do_not_change_the_engines_batches(keep_features):
    """The batches the engine runs (its own `_batches`, both passes) are the same whatever the claim
    size: rank 0 picks that from its core count, and a batch's members change its float bits."""
    import torch

    from conftest import build_sensitive_tilenet
    from tilerun.engine import Engine, ImageSums
    from tilerun.receptive import ModelProbe
    from tilerun.scheduler import JobPlan, PlannedImage

    # The probe as given (no forward runs): pass 1's windows are smaller than pass 2's.
    probe = ModelProbe(stride=4, radius=40, global_radius=10, has_global=True)
    engine = Engine(build_sensitive_tilenet(), tile=128, batch_size=4, probe=probe, workers=1,
                    feature_cache=2**30 if keep_features else 0)
    assert engine.cores_only and engine.keeps_features == keep_features
    # Sides that divide evenly: a first and a last tile have one window shape, their cores other places.
    image = PlannedImage("x.png", 768, 1024, 1)
    runs: dict[int, list] = {}
    engine._map_batches = lambda fn, batches: runs[per_claim].append([tuple(t.index for t in b) for b in batches]) or iter(())
    zeros = np.zeros((image.height, image.width), np.uint8)
    sums = ImageSums(torch.zeros(16))
    chunk_counts = []
    for per_claim in (1, 2, 5, 16):
        plan = JobPlan.from_json(JobPlan.for_engine(engine, (PlannedImage("x.png", 768, 1024, per_claim),)).to_json())
        (p,) = plan.image_plans([type("Item", (), {"key": "x.png"})()])
        chunks = p.chunks[2]
        assert sorted(i for c in chunks for i in c) == list(range(len(p.tiles)))  # each tile once
        runs[per_claim] = []
        for c in chunks:
            tiles = [p.tiles[i] for i in c]
            engine.global_partials(zeros, zeros, tiles)
            list(engine.compute(zeros, zeros, tiles, sums))
        chunk_counts.append(len(chunks))
    passes = {k: ([b for call in v[0::2] for b in call], [b for call in v[1::2] for b in call]) for k, v in runs.items()}
    assert len({len(b) for b in passes[1][1]}) > 1 and len(passes[1][1]) > 10  # several shapes and places
    assert all(v == passes[1] for v in passes.values())
    assert chunk_counts == sorted(chunk_counts, reverse=True) and chunk_counts[0] > chunk_counts[-1]
