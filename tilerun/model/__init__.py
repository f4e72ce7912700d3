"""The design document's model and its weights."""

from __future__ import annotations

import os

from torch import nn

from .net import TileNet, TileNetConfig, default_palette
from .weights import DEFAULT_WEIGHTS, init_tilenet, load_tilenet, read_metadata, save_tilenet

__all__ = [
    "TileNet",
    "TileNetConfig",
    "default_palette",
    "load_model",
    "save_tilenet",
    "load_tilenet",
    "read_metadata",
    "init_tilenet",
    "DEFAULT_WEIGHTS",
]


def load_model(path: str | os.PathLike | None = None) -> nn.Module:
    """The model at ``path``, or the default model when ``path`` is None.

    The default is the trained weights shipped in ``tilerun/weights/`` when present,
    else a fixed-seed (untrained) init.
    """
    if path is None:
        if DEFAULT_WEIGHTS.exists():
            return load_tilenet(DEFAULT_WEIGHTS)
        return init_tilenet().eval()
    return load_tilenet(path)
