"""Scale-out with real torchrun: every process writes its own results, spread images meet
without the c10d store (part stores or point to point), and a kill resumes at tile level."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_dist import TIMEOUT, _env, assert_same_outputs, free_port, inputs, outputs, reference, run_tilerun  # noqa: F401
from test_elastic import _children, _rank_of

PARTS = ".tilerun-parts"


def _report(out: Path) -> dict:
    return json.loads((out / "tilerun-report.json").read_text())


def _pixels(report: dict) -> int:
    return sum(f["size"][0] * f["size"][1] for f in report["files"])


def _store_budget(report: dict) -> int:
    """Store bytes a job may send that carries no pixels: per tile, one pass-1 payload (the
    default model's float64 sums and a JSON header, ~600 bytes, and its coarse context's
    uint16 cell sums, ~200 bytes for a 64^2 core) and a chunk key."""
    tiles = sum(f["tiles"] for f in report["files"])
    assert tiles * 1000 < _pixels(report)  # else the budget could hide cores
    return tiles * 1000


def _two_nodes(inputs: Path, out: Path, *extra: str) -> list[str]:
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=tilerun-scale",
           "-m", "tilerun", "run", str(inputs), str(out), "--tile", "64", *extra]
    agents = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env()) for _ in range(2)]
    results = [a.communicate(timeout=TIMEOUT) for a in agents]
    for a, (_, err) in zip(agents, results):
        assert a.returncode == 0, err[-3000:]
    return [err for _, err in results]


def test_two_nodes_without_a_shared_output(inputs, reference, tmp_path):
    errs = _two_nodes(inputs, tmp_path, "--no-shared-output")
    assert_same_outputs(tmp_path, reference)
    assert any("over the process group" in e for e in errs), errs
    report = _report(tmp_path)
    ranks = report["ranks"]
    # No pixel through the store: claims, pass-1 sums and a key a chunk only (cores: 4 bytes a pixel).
    assert sum(r["bytes_sent"] for r in ranks) <= _store_budget(report)
    assert sum(r["bytes_p2p"] for r in ranks) > 0
    assert sum(r["images_written"] for r in ranks) == 3
    assert all(r["bytes_parts"] == 0 for r in ranks)
    assert not (tmp_path / PARTS).exists()


def test_two_nodes_with_a_shared_output(inputs, reference, tmp_path):
    errs = _two_nodes(inputs, tmp_path)  # the same folder on one machine: detected as shared
    assert_same_outputs(tmp_path, reference)
    assert any("in part stores in OUTPUT" in e for e in errs), errs
    ranks = _report(tmp_path)["ranks"]
    assert sum(r["bytes_sent"] for r in ranks) <= _store_budget(_report(tmp_path))
    assert sum(r["bytes_p2p"] for r in ranks) == 0 and sum(r["bytes_parts"] for r in ranks) > 0
    assert sum(r["images_written"] for r in ranks) == 3
    assert not (tmp_path / PARTS).exists(), "part stores left behind"
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".tilerun-shared")]


def test_one_decode_per_node_for_a_spread_image(big, tmp_path):
    """Two processes of one node compute one image: one decodes it, the other maps that decode."""
    from tilerun.decoded import SHM

    inp, reference = big
    before = set(SHM.glob("tilerun-decoded-*"))
    r = run_tilerun([str(inp), str(tmp_path), "--tile", "64"], nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_outputs(tmp_path, reference)
    report = _report(tmp_path)
    assert sorted(r["decodes_shared"] for r in report["ranks"]) == [0, 1]
    # The finisher may be the process that mapped the decode: the decoder's note reached it.
    assert report["files"][0]["radiometry"]["dtype"] == "uint8"
    assert set(SHM.glob("tilerun-decoded-*")) <= before, "a shared decode was left behind"


# -- tile-level resume ----------------------------------------------------------------

@pytest.fixture(scope="module")
def big(tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    """One image of 70 tiles at tile 64 (long enough to be killed in), with a hole; and its 1-process outputs."""
    root = tmp_path_factory.mktemp("big")
    src = np.asarray(Image.open(Path(__file__).parent.parent / "sample_images" / "coffee.png").convert("RGB"))
    crop = src[:400, :600].copy()
    rgba = np.dstack([crop, np.full(crop.shape[:2], 255, np.uint8)])
    rgba[100:160, 200:330, 3] = 0
    Image.fromarray(rgba).save(root / "big.png")
    ref = tmp_path_factory.mktemp("bigref")
    r = run_tilerun([str(root), str(ref), "--tile", "64"])
    assert r.returncode == 0, r.stderr
    return root, outputs(ref)


def _part_files(out: Path) -> list[Path]:
    return list((out / PARTS).glob("*/p2-c*.part")) if (out / PARTS).exists() else []


def _wait_for_parts(agent: subprocess.Popen, out: Path, n: int) -> int:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline and agent.poll() is None:
        found = len(_part_files(out))
        if found >= n:
            return found
        time.sleep(0.02)
    raise AssertionError("the job ended (or stalled) before the kill: make it longer")


def _assert_resumed(out: Path, reference: dict[str, bytes], kept: int) -> None:
    assert_same_outputs(out, reference)
    report = _report(out)
    ranks = report["ranks"]
    total = report["files"][0]["tiles"]
    reused = sum(r["tiles_reused"] for r in ranks)
    # The finished tiles were read back, not recomputed: each tile once over both runs.
    assert reused >= kept > 0, (reused, kept)
    assert sum(r["tiles"]["main"] for r in ranks) == total - reused
    assert not (out / PARTS).exists()


def test_killed_worker_resumes_a_spread_image_at_tile_level(big, tmp_path):
    inp, reference = big
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=1",
           "-m", "tilerun", "run", str(inp), str(out), "--tile", "64"]
    agent = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        kept = _wait_for_parts(agent, out, 6)
        victims = [p for p in _children(agent.pid) if _rank_of(p) == 1]
        assert victims
        os.kill(victims[0], signal.SIGKILL)
        _, err = agent.communicate(timeout=TIMEOUT)
    finally:
        agent.kill()
    assert agent.returncode == 0, err[-3000:]
    assert kept < 70
    _assert_resumed(out, reference, kept)


def test_whole_job_killed_then_rerun_resumes_at_tile_level(big, tmp_path):
    inp, reference = big
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "tilerun", "run", str(inp), str(out), "--tile", "64"]
    agent = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                             start_new_session=True)
    try:
        kept = _wait_for_parts(agent, out, 6)
        os.killpg(agent.pid, signal.SIGKILL)  # the agent and every worker: a node lost
        agent.communicate(timeout=TIMEOUT)
    finally:
        agent.kill()
    assert not list(out.glob("*.inpainted.png"))
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=_env())
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stderr
    _assert_resumed(out, reference, kept)
