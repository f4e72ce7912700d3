"""tilerun: exact tiled (and distributed) inference of an image model over folders of images."""

from __future__ import annotations

from typing import TYPE_CHECKING

__all__ = ["load_model", "infer_image", "Engine"]
__version__ = "0.1.0"

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
