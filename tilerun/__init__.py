"""tilerun: exact tiled (and distributed) inference of an image model over folders of images."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

__all__ = ["load_model", "infer_image", "Engine"]
__version__ = "0.1.0"

# Back CPU tensors of >= 2 MB with transparent huge pages (PyTorch's allocator, Linux, where
# THP is "madvise" or "always"). The engine trims the heap every few CPU batches (memory:
# tilerun.engine.TRIM_EVERY_BATCHES), so windows' activations are faulted in afresh;
# in 2 MB pages that is 512x fewer faults. Measured on 2048^2 (2 cores, alternated runs):
# 6.23-6.44 s vs 7.52-7.98 s with it at 0, peak RSS ~730-770 MB either way; 8192^2
# unchanged at 1408 MB (python bench/memory.py --sizes 8192).
# PyTorch reads the variable at its first allocation of >= 2 MB, hence here, on import,
# before any; a value already set (e.g. 0 to opt out) is kept. Process-wide.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

if TYPE_CHECKING:
    from .engine import Engine, infer_image
    from .model import load_model


def __getattr__(name: str):
    # Lazy: `tilerun --help` must not pay for importing torch.
    if name in ("infer_image", "Engine"):
        from . import engine

        return getattr(engine, name)
    if name == "load_model":
        from .model import load_model

        return load_model
    raise AttributeError(f"module 'tilerun' has no attribute {name!r}")
