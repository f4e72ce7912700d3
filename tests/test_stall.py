"""Long work never times out; a stopped process is named within the stall limit (real torchrun launches)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_dist import TIMEOUT, _env, _rank_of_children, outputs

SLOW_MODEL = """
import os, signal, time, torch

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 3, 3, padding=1)
        self.acted = False

    def forward(self, image, mask):
        # Once a process, in the engine's first forward: inference mode (the probe's is not) and
        # one image (load_model's contract check runs two).
        if (torch.is_inference_mode_enabled() and image.shape[0] == 1 and not self.acted
                and os.environ.get("RANK", "0") == os.environ["ACT_RANK"]):
            self.acted = True
            if os.environ["ACT"] == "sleep":
                time.sleep(float(os.environ["SLEEP_S"]))
            else:  # the whole process stops, its heartbeat thread too
                with open(os.environ["STOPPED_MARK"], "w") as f:
                    f.write(str(os.getpid()))
                os.kill(os.getpid(), signal.SIGSTOP)
        elif (torch.is_inference_mode_enabled() and os.environ.get("ACT") == "stop"
                and os.environ.get("RANK", "0") != os.environ["ACT_RANK"]):
            # The other ranks go slowly, so that they cannot claim every image before the
            # stopping rank has started (whole images are claimed, not tiles).
            time.sleep(1.0)
        return torch.sigmoid(self.conv(torch.cat([image * (1 - mask), mask], 1)))

def make():
    torch.manual_seed(0)
    return Net()
"""


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("in")
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40 + 8 * i, 56, 3), dtype=np.uint8)).save(root / f"img{i}.png")
    return root


def _env_with_model(tmp_path: Path, **extra: str) -> dict[str, str]:
    (tmp_path / "slowmodel.py").write_text(SLOW_MODEL)
    return dict(_env(), PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **extra)


def _command(inputs: Path, out: Path, nproc: int | None) -> list[str]:
    run = ["-m", "tilerun", "run", str(inputs), str(out), "--tile", "0", "--model", "slowmodel:make"]
    if nproc is None:
        return [sys.executable, *run]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *run]


@pytest.mark.parametrize("nproc", [None, 2])
def test_a_forward_longer_than_the_store_timeout_completes(small, tmp_path, nproc):
    """One whole-image forward (--tile 0) of 6 s while the store's own timeout is 3 s: the waits for
    its result (rank 0's writer; with torchrun, on rank 1's work) go on, the job completes."""
    ref = tmp_path / "ref"
    env = _env_with_model(tmp_path, ACT="none", ACT_RANK="-1")
    r = subprocess.run(_command(small, ref, None), capture_output=True, text=True, timeout=TIMEOUT, env=env)
    assert r.returncode == 0, r.stderr
    env = _env_with_model(tmp_path, ACT="sleep", SLEEP_S="6", ACT_RANK="1" if nproc else "0",
                          TILERUN_STORE_TIMEOUT="3", TILERUN_STALL_TIMEOUT="3")
    t0 = time.monotonic()
    r = subprocess.run(_command(small, tmp_path / "out", nproc), capture_output=True, text=True, timeout=TIMEOUT, env=env)
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - t0 > 6  # the sleep happened
    assert outputs(tmp_path / "out") == outputs(ref)


@pytest.fixture(scope="module")
def six(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("six")
    rng = np.random.default_rng(1)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / f"img{i}.png")
    return root


def test_a_stopped_process_is_named_within_the_stall_limit(six, tmp_path):
    """Rank 1 stops (SIGSTOP: no heartbeat) in its first forward; rank 0 ends the job within the stall
    limit (3 s), naming rank 1 and the image it holds, instead of waiting 30 minutes."""
    mark = tmp_path / "stopped"
    env = _env_with_model(tmp_path, ACT="stop", ACT_RANK="1", STOPPED_MARK=str(mark), TILERUN_STALL_TIMEOUT="3")
    agent = subprocess.Popen(_command(six, tmp_path / "out", 2), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env)
    try:
        deadline = time.monotonic() + TIMEOUT
        rank0 = stopped_at = detected = None
        while time.monotonic() < deadline and agent.poll() is None:
            rank0 = rank0 or _rank_of_children(agent.pid).get(0)
            if stopped_at is None and mark.exists() and mark.read_text():
                stopped_at = time.monotonic()
            if stopped_at is not None and rank0 is not None and not Path(f"/proc/{rank0}").exists():
                detected = time.monotonic()
                break
            time.sleep(0.1)
        assert stopped_at is not None, "rank 1 never stopped"
        assert detected is not None, "rank 0 did not end"
    finally:
        if mark.exists() and mark.read_text():
            os.kill(int(mark.read_text()), signal.SIGCONT)  # torchrun's SIGTERM then ends it
        _, err = agent.communicate(timeout=TIMEOUT)
    assert agent.returncode != 0
    assert "rank 1 has shown no sign of life for" in err, err
    assert "while it holds img" in err and "--stall-timeout" in err, err
    assert detected - stopped_at < 3 + 15, detected - stopped_at
