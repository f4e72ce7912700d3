"""Shared pieces of the benchmarks: a real photo at any size, holes, timing and machine notes.

Every ratio is measured in one process with its two sides interleaved (A B A B ...) and
the best of N taken per side: on a shared, noisy machine the minimum is the run that was
disturbed least, and interleaving exposes both sides to the same background load.
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PHOTO = ROOT / "sample_images" / "retina.jpg"


def vm_mb(field: str) -> float:
    """A /proc/self/status memory field in MB, e.g. ``VmHWM:`` (this process's peak RSS; Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def photo(size: int, *, source: Path = PHOTO) -> np.ndarray:
    """A real photo resized to ``size`` x ``size`` uint8 RGB (Lanczos)."""
    from PIL import Image

    with Image.open(source) as im:
        return np.asarray(im.convert("RGB").resize((size, size), Image.LANCZOS)).copy()


def holes(size: int, *, seed: int = 0) -> np.ndarray:
    """bool mask, True = missing: a few large blocks plus scattered pixels, ~8% of the image."""
    rng = np.random.default_rng(seed)
    mask = rng.random((size, size)) < 0.02
    for _ in range(6):
        h, w = rng.integers(size // 32, size // 8, size=2)
        y, x = rng.integers(0, size - h), rng.integers(0, size - w)
        mask[y : y + h, x : x + w] = True
    return mask


def interleaved(fns: dict[str, Callable[[], object]], *, repeats: int,
                cpu: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """Run each function ``repeats`` times, interleaved; seconds per run, per name.

    ``cpu``: also filled with each run's process CPU seconds (all threads), which other
    tenants' load moves less than the wall time on a shared machine.
    """
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            times[name].append(time.perf_counter() - t0)
            if cpu is not None:
                cpu.setdefault(name, []).append(time.process_time() - c0)
    return times


def machine() -> str:
    """A short description of the machine and its load, for BENCHMARKS.md."""
    import torch

    lines = []
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines()
        keep = ("Architecture", "CPU(s):", "Model name", "Thread(s) per core", "Core(s) per socket", "L2 cache", "L3 cache")
        lines += [" ".join(l.split()) for l in lscpu if l.startswith(keep)]
    except (OSError, subprocess.CalledProcessError):
        lines.append(platform.processor() or platform.machine())
    lines.append(f"python {platform.python_version()}, torch {torch.__version__}, {torch.get_num_threads()} torch threads")
    lines.append("load average at start: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    return "\n".join(lines)


def fmt_times(ts: list[float]) -> str:
    return f"best {min(ts):.2f} s (runs: {', '.join(f'{t:.2f}' for t in ts)})"


def print_ratio(times: dict[str, list[float]], num: str, den: str) -> None:
    """Each side's times, then best ``num`` / best ``den`` (`interleaved`'s output)."""
    for name, ts in times.items():
        print(f"{name:>6}: {fmt_times(ts)}")
    print(f"{num} / {den} (best of {len(times[num])}): {min(times[num]) / min(times[den]):.3f}")


def load_model_spec(spec: str):
    """``PATH`` or ``PATH:key=value,...`` (TileNetConfig fields switched on the same weights; a
    tuple as ``1/3/``)."""
    import tilerun
    from tilerun.model.net import TileNet

    path, _, sets = spec.partition(":")
    model = tilerun.load_model(Path(path))
    if sets:
        new = TileNet(model.cfg.with_settings(sets.split(",")), model.palette)
        new.load_state_dict(model.state_dict())
        new.metadata = getattr(model, "metadata", {})
        model = new.eval()
    return model
