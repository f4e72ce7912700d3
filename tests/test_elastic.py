"""A worker SIGKILLed mid-run under torchrun --max-restarts=1: the job completes, byte-identical, nothing left over."""

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

from test_dist import TIMEOUT, _env, assert_same_outputs, outputs, run_tilerun

N_IMAGES = 8


@pytest.fixture(scope="module")
def many(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("many")
    src = np.asarray(Image.open(Path(__file__).parent.parent / "sample_images" / "coffee.png").convert("RGB"))
    for i in range(N_IMAGES):
        crop = src[i * 20 : i * 20 + 190, i * 30 : i * 30 + 230].copy()
        crop[60:90, 50:120] = 0
        mask = np.zeros(crop.shape[:2], np.uint8)
        mask[60:90, 50:120] = 255
        Image.fromarray(crop).save(root / f"img{i}.png")
        Image.fromarray(mask).save(root / f"img{i}.mask.png")
    return root


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for kv in env:
        if kv.startswith(b"RANK="):
            return int(kv[5:])
    return None


def test_killed_worker_is_restarted_and_outputs_are_identical(many, tmp_path):
    ref_dir = tmp_path / "ref"
    r = run_tilerun([str(many), str(ref_dir), "--tile", "64"])
    assert r.returncode == 0, r.stderr
    reference = outputs(ref_dir)

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=1",
           "-m", "tilerun", "run", str(many), str(out), "--tile", "64"]
    agent = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    killed = None
    deadline = time.monotonic() + TIMEOUT
    while killed is None and time.monotonic() < deadline and agent.poll() is None:
        if list(out.glob("*.inpainted.png")):
            victims = [p for p in _children(agent.pid) if _rank_of(p) == 1]
            if victims:
                done_at_kill = len(list(out.glob("*.inpainted.png")))
                os.kill(victims[0], signal.SIGKILL)
                killed = victims[0]
        time.sleep(0.05)
    _, err = agent.communicate(timeout=TIMEOUT)
    assert killed is not None, "the job ended before a worker could be killed: make it longer"
    assert done_at_kill < N_IMAGES, "the kill came after the last output: it proved nothing"
    assert agent.returncode == 0, err
    assert_same_outputs(out, reference)
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")], "temporary files left behind"
    report = json.loads((out / "tilerun-report.json").read_text())
    # The restarted attempt resumed: finished images were skipped, not redone.
    statuses = [f["status"] for f in report["files"]]
    assert statuses.count("skipped") >= 1 and statuses.count("failed") == 0
