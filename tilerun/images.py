"""Images in, images out: finding inputs, decoding to uint8 RGB + missing mask, atomic writes.

Masks (True = missing) come from, in order: a sidecar ``name.mask.png`` beside the
image or at the same relative path under ``--mask-dir`` (nonzero = missing), else
the image's own transparency (alpha == 0). No mask: nothing is missing.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputImageError

__all__ = [
    "IMAGE_EXTENSIONS",
    "InputItem",
    "find_inputs",
    "load_image",
    "load_mask",
    "to_rgb_and_alpha_mask",
    "output_paths",
    "write_png_atomic",
    "class_map_image",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
MASK_SUFFIX = ".mask"
_UMASK = os.umask(0o022)
os.umask(_UMASK)
OUTPUT_SUFFIXES = (".pred", ".inpainted", ".preview")


@dataclass(frozen=True)
class InputItem:
    path: Path  # absolute
    rel: Path  # relative to the input root (just the name for a single file)

    @property
    def key(self) -> str:
        return self.rel.as_posix()


def _is_sidecar_or_output(name: str) -> bool:
    stem = Path(name).stem
    return stem.endswith(MASK_SUFFIX) or stem.endswith(OUTPUT_SUFFIXES)


def find_inputs(root: str | os.PathLike, *, exclude: list[str | os.PathLike] = ()) -> list[InputItem]:
    """Images under ``root`` (or ``root`` itself), sorted by relative path; sidecars and outputs excluded.

    Folders in ``exclude`` (e.g. an OUTPUT inside INPUT) are never read back as input.
    """
    root = Path(root).absolute()
    if root.is_file():
        return [InputItem(root, Path(root.name))]
    if not root.is_dir():
        raise FileNotFoundError(f"input {root} does not exist")
    skip = {Path(e).absolute() for e in exclude}
    items = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        d = Path(dirpath)
        dirnames[:] = sorted(n for n in dirnames if (d / n).absolute() not in skip and not n.startswith("."))
        for name in filenames:
            if name.startswith(".") or not name.lower().endswith(IMAGE_EXTENSIONS) or _is_sidecar_or_output(name):
                continue
            p = d / name
            items.append(InputItem(p, p.relative_to(root)))
    items.sort(key=lambda it: it.key)
    return items


def output_paths(item: InputItem, out_dir: str | os.PathLike, stem: str | None = None) -> dict[str, Path]:
    base = Path(out_dir) / item.rel.parent / (stem or item.rel.stem)
    return {
        "pred": base.with_name(base.name + ".pred.png"),
        "inpainted": base.with_name(base.name + ".inpainted.png"),
        "preview": base.with_name(base.name + ".preview.png"),
    }


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """16/32-bit integer or float single-channel data to 8 bits."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype.kind == "f":
        return (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
    if arr.dtype.kind in "ui":
        top = 65535 if arr.max(initial=0) > 255 or arr.dtype.itemsize == 2 else 255
        return (arr.astype(np.float64) * (255 / top)).round().clip(0, 255).astype(np.uint8)
    raise InputImageError(f"unsupported pixel type {arr.dtype}")


def to_rgb_and_alpha_mask(im: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """Any Pillow mode -> (uint8 HxWx3, bool HxW where alpha == 0)."""
    im = ImageOps.exif_transpose(im)
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    alpha = None
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        alpha = np.asarray(im.getchannel("A"))
        im = im.convert("RGB") if im.mode != "LA" else im.convert("L")
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F", "I;16N"):
        arr = _to_uint8(np.asarray(im))
        rgb = np.repeat(arr[..., None], 3, axis=2)
    else:
        rgb = np.asarray(im.convert("RGB"))
    mask = np.zeros(rgb.shape[:2], bool) if alpha is None else alpha == 0
    return np.ascontiguousarray(rgb), mask


def _open(path: Path) -> Image.Image:
    try:
        im = Image.open(path)
        im.load()
    except Image.DecompressionBombError as e:
        raise InputImageError(f"too large for the decompression-bomb guard ({e}); raise it with --max-pixels") from e
    except UnidentifiedImageError as e:
        raise InputImageError("not an image Pillow can read") from e
    except (OSError, SyntaxError, ValueError) as e:  # truncated files, broken headers
        raise InputImageError(f"cannot decode: {e}") from e
    return im


def sidecar_mask_path(item: InputItem, mask_dir: str | os.PathLike | None) -> Path:
    base = Path(mask_dir) / item.rel if mask_dir is not None else item.path
    return base.with_name(base.stem + MASK_SUFFIX + ".png")


def load_mask(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """A sidecar mask: nonzero = missing (any channel, soft masks included)."""
    im = ImageOps.exif_transpose(_open(path))
    arr = np.asarray(im)
    if arr.ndim == 3:
        arr = arr.max(axis=2)
    if arr.shape != shape:
        raise InputImageError(f"mask {path.name} is {arr.shape[1]}x{arr.shape[0]}, image is {shape[1]}x{shape[0]}")
    return arr != 0


def load_image(item: InputItem, *, mask_dir: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 HxWx3, bool HxW missing) for one input."""
    with _open(item.path) as im:
        rgb, mask = to_rgb_and_alpha_mask(im)
    side = sidecar_mask_path(item, mask_dir)
    if side.is_file():
        mask = mask | load_mask(side, rgb.shape[:2])
    return rgb, mask


def class_map_image(classes: np.ndarray, palette: list[tuple[int, int, int]] | None) -> Image.Image:
    """An 8-bit palette image: the pixel value is the class index, the palette colours the classes."""
    im = Image.frombuffer("P", (classes.shape[1], classes.shape[0]), np.ascontiguousarray(classes).tobytes(), "raw", "P", 0, 1)
    flat = [c for rgb in (palette or []) for c in rgb]
    im.putpalette(flat + [0] * (768 - len(flat)))
    return im


def write_png_atomic(im: Image.Image, path: str | os.PathLike, *, compress_level: int = 1) -> None:
    """Write to a temporary file in the same folder, then rename: never a half-written output."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            im.save(f, format="PNG", compress_level=compress_level)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
