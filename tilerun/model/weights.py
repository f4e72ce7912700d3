"""Saving and loading TileNet weights as safetensors + JSON metadata.

safetensors holds plain tensors and a string->string header: loading never
executes pickled code, whatever the file claims to be.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import ModelLoadError
from .net import TileNet, TileNetConfig

__all__ = ["DEFAULT_WEIGHTS", "save_tilenet", "load_tilenet", "read_metadata", "init_tilenet"]

DEFAULT_WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "default.safetensors"

# The fixed-seed init used when no trained default weights ship with the package.
INIT_SEED = 20261126


def init_tilenet(cfg: TileNetConfig | None = None, *, seed: int = INIT_SEED) -> TileNet:
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return TileNet(cfg)
    finally:
        torch.random.set_rng_state(gen_state)


def save_tilenet(model: TileNet, path: str | os.PathLike, *, extra: dict | None = None) -> None:
    """Write ``model`` to ``path`` atomically; ``extra`` (JSON-able) goes into the metadata."""
    meta = {
        "format": "tilerun.tilenet/1",
        "config": json.dumps(model.cfg.to_dict()),
        "palette": json.dumps([list(c) for c in model.palette]),
        "stride": str(model.stride),
    }
    for key, value in (extra or {}).items():
        meta[key] = value if isinstance(value, str) else json.dumps(value)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(tmp), metadata=meta)
    os.replace(tmp, path)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise ModelLoadError(f"{path}: not a readable safetensors file ({e})") from e


def load_tilenet(path: str | os.PathLike) -> TileNet:
    meta = read_metadata(path)
    if meta.get("format") != "tilerun.tilenet/1":
        raise ModelLoadError(f"{path}: safetensors file without tilerun metadata (format={meta.get('format')!r})")
    try:
        cfg = TileNetConfig.from_dict(json.loads(meta["config"]))
        palette = [tuple(c) for c in json.loads(meta["palette"])]
    except (KeyError, TypeError, ValueError) as e:
        raise ModelLoadError(f"{path}: malformed tilerun metadata ({e})") from e
    model = TileNet(cfg, palette)
    try:
        model.load_state_dict(load_file(str(path)))
    except (RuntimeError, SafetensorError) as e:
        raise ModelLoadError(f"{path}: weights do not match the architecture in its metadata ({e})") from e
    model.metadata = meta
    return model.eval()
