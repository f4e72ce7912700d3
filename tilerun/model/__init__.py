"""The design document's model and its weights."""

from __future__ import annotations

from .loading import ModelOutputs, check_contract, load_model, model_format, model_identity, tile_exact_warning
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
    "ModelOutputs",
    "check_contract",
    "model_format",
    "tile_exact_warning",
    "model_identity",
]
