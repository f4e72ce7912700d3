"""Images in, images out: finding inputs, decoding to uint8 RGB + missing mask, naming and writing outputs.

Decoding: TIFFs that tifffile reads tile by tile (`tiff`), 8/16-bit PNGs by imagecodecs, the rest
by Pillow, each as stored; `radiometry` then makes the model's uint8 RGB (bands, input range,
nodata: ``--bands``, ``--input-range``, ``--nodata``). PNG outputs are encoded by `png`, TIFF
outputs by tifffile (with the input's georeferencing, `georef`).

Conventions (docs/formats.md says the same for users):

* **Inputs**: files ending in one of `IMAGE_EXTENSIONS` (any case) under INPUT, recursively,
  and zarr / OME-Zarr folders (``*.zarr``, not descended into; `sources` reads them).
  Never inputs: hidden names (``.x``), sidecar masks (``*.mask.png``), files named like
  tilerun outputs (``*.pred.png``, ``*.inpainted.png``, ``*.preview.png``), and anything
  under an excluded folder (OUTPUT, when it lies inside INPUT).
* **Masks** (True = missing) are the union of the image's own transparency (alpha == 0,
  including palette and colour-key transparency) and a sidecar mask: ``NAME.EXT.mask.png``
  or else ``NAME.mask.png``, beside the image or at the same relative path under
  ``--mask-dir``. In a sidecar, a nonzero pixel is missing (soft masks: any nonzero value);
  where the sidecar has alpha, transparent pixels are not missing. Masks are in the
  image's *displayed* orientation: EXIF orientation is applied to the image and to the
  mask (each by its own tag) before their sizes are compared.
* **Outputs**: ``OUTPUT/REL_DIR/NAME.pred.png`` and ``NAME.inpainted.png`` (``.tif`` with
  ``--format tiff``; never read back as inputs in either format). When two inputs
  of one folder share a stem (``x.png`` and ``x.jpg``; compared case-insensitively, since
  macOS and Windows folders are), each keeps its extension: ``x.png.pred.png``,
  ``x.jpg.pred.png``. `plan_outputs` applies this rule over the whole job, never per file.
* **Writes** are atomic and durable: a hidden temporary file in the target folder, fsync,
  rename, fsync of the folder. A temporary file is named for its writer,
  ``.NAME.<host>-<pid>-<random>.tmp``, so that a job's cleanup can tell its own and dead
  jobs' leftovers from another live writer's (`remove_stale_temps`).
"""

from __future__ import annotations

import atexit
import glob
import json
import os
import re
import shutil
import socket
import tempfile
import threading
import warnings
from collections import defaultdict
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

try:  # a dependency; the guard keeps Pillow's path for an install without it
    import imagecodecs
except ImportError:
    imagecodecs = None

from .errors import InputImageError, too_many_pixels
from .png import write_png
from .radiometry import RadiometrySpec, resolve, to_uint8
from .sources import SLIDE_EXTENSIONS
from .tiff import TIFF_EXTENSIONS, NotForTifffile, read_tiff, tiff_size, write_tiff

__all__ = [
    "IMAGE_EXTENSIONS",
    "OUTPUT_KINDS",
    "InputItem",
    "find_inputs",
    "plan_outputs",
    "output_paths",
    "load_image",
    "image_size",
    "load_mask",
    "sidecar_mask_path",
    "to_rgb_and_alpha_mask",
    "set_max_pixels",
    "set_radiometry",
    "radiometry_spec",
    "radiometry_note",
    "keep_radiometry_note",
    "read_output_text",
    "OUTPUT_FORMATS",
    "output_suffixes",
    "write_png_atomic",
    "write_tiff_atomic",
    "remove_stale_temps",
]

# Whole-slide formats (read through OpenSlide, `sources`) are inputs too.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", *TIFF_EXTENSIONS, ".bmp", ".webp", *SLIDE_EXTENSIONS)
MASK_SUFFIX = ".mask.png"
#: Output file formats (`run --format`): PNG, tiled TIFF through tifffile (the tiff extra), or
#: OME-Zarr through zarr (the ome extra; `omezarr`: one folder, the class map in its labels/).
OUTPUT_FORMATS = ("png", "tiff", "ome-zarr")


def output_suffixes(fmt: str = "png") -> dict[str, str]:
    """Output kinds and the suffix each adds to a name; "preview" (always PNG) is reserved for
    the colour preview some commands write, so that it too is never read back as input."""
    if fmt not in OUTPUT_FORMATS:
        raise ValueError(f"output format must be one of {OUTPUT_FORMATS}, got {fmt!r}")
    if fmt == "ome-zarr":
        return {"pred": ".inpainted.ome.zarr/labels/pred", "inpainted": ".inpainted.ome.zarr", "preview": ".preview.png"}
    ext = ".tif" if fmt == "tiff" else ".png"
    return {"pred": ".pred" + ext, "inpainted": ".inpainted" + ext, "preview": ".preview.png"}


OUTPUT_KINDS = output_suffixes("png")
_NOT_INPUT_SUFFIXES = (MASK_SUFFIX, *sorted({s for f in OUTPUT_FORMATS for s in output_suffixes(f).values()}))
_TEMP_SUFFIX = ".tmp"
_UMASK = os.umask(0o022)
os.umask(_UMASK)


@dataclass(frozen=True)
class InputItem:
    path: Path  # absolute
    rel: Path  # relative to the input root (just the name for a single file)

    @property
    def key(self) -> str:
        return self.rel.as_posix()


def _is_not_input(name: str) -> bool:
    low = name.lower()
    return name.startswith(".") or not low.endswith(IMAGE_EXTENSIONS) or low.endswith(_NOT_INPUT_SUFFIXES)


def _is_zarr_input(path: Path) -> bool:
    """A zarr / OME-Zarr folder (``*.zarr``, read window by window: `sources`), not an OME-Zarr output of ours."""
    low = path.name.lower()
    return low.endswith(".zarr") and not low.endswith(".inpainted.ome.zarr") and path.is_dir()


def find_inputs(root: str | os.PathLike, *, exclude: Iterable[str | os.PathLike] = ()) -> list[InputItem]:
    """Images under ``root`` (or ``root`` itself), sorted by relative path; sidecars and outputs excluded.

    Folders in ``exclude`` (an OUTPUT inside INPUT) are never descended into, so outputs,
    reports and temporary files are never read back as input. A folder named like an
    image (``x.png/``) is a folder; a dangling symlink named like an image is listed, so
    that it is reported rather than silently dropped. Symlinked folders are not followed
    (a link cycle would never end).
    """
    root = Path(root).absolute()
    if root.is_file() or _is_zarr_input(root):
        return [InputItem(root, Path(root.name))]
    if not root.is_dir():
        raise FileNotFoundError(f"input {root} does not exist")
    # realpath: `in/../in/out` and a symlinked OUTPUT are still the same folder.
    skip = {os.path.realpath(e) for e in exclude}
    items = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        d = Path(dirpath)
        dirnames[:] = sorted(
            n for n in dirnames if not n.startswith(".") and os.path.realpath(d / n) not in skip
        )
        for name in [n for n in dirnames if _is_zarr_input(d / n)]:  # an image, not a folder to descend
            dirnames.remove(name)
            items.append(InputItem(d / name, (d / name).relative_to(root)))
        for name in filenames:
            if not _is_not_input(name):
                p = d / name
                items.append(InputItem(p, p.relative_to(root)))
    items.sort(key=lambda it: it.key)
    return items


def plan_outputs(
    items: Iterable[InputItem], out_dir: str | os.PathLike, *, kinds: Iterable[str] = ("pred", "inpainted"),
    fmt: str = "png",
) -> dict[str, dict[str, Path]]:
    """Output paths of every input, ``{item.key: {kind: path}}``, with the collision rule applied.

    Inputs of one folder whose stems are equal ignoring case (``x.png``, ``X.jpg``) all
    name their outputs after their full file name (``x.png.pred.png``). Should even full
    names meet (``x.PNG`` and ``x.png`` on a case-sensitive disk), an index keeps them
    apart (``x.png.1.pred.png``) in sorted order. The plan depends on the whole item
    list, so every process of a job must plan from the same list.
    """
    items = sorted(items, key=lambda it: it.key)
    by_folder: dict[tuple[Path, str], list[InputItem]] = defaultdict(list)
    for it in items:
        by_folder[(it.rel.parent, it.rel.stem.casefold())].append(it)
    bases: dict[str, str] = {}
    for group in by_folder.values():
        for it in group:
            bases[it.key] = it.rel.name if len(group) > 1 else it.rel.stem
    # Second round: a full name can still meet another base (``x.png`` as a stem of ``x.png.jpg``).
    taken: dict[tuple[Path, str], int] = defaultdict(int)
    for it in items:
        k = (it.rel.parent, bases[it.key].casefold())
        taken[k] += 1
        if taken[k] > 1:
            bases[it.key] = f"{bases[it.key]}.{taken[k] - 1}"
    out = Path(out_dir)
    suffixes = output_suffixes(fmt)
    return {
        it.key: {kind: out / it.rel.parent / (bases[it.key] + suffixes[kind]) for kind in kinds} for it in items
    }


def output_paths(item: InputItem, out_dir: str | os.PathLike, stem: str | None = None, *, fmt: str = "png") -> dict[str, Path]:
    """Output paths of one input considered alone (no collision rule: use `plan_outputs` for a job)."""
    base = Path(out_dir) / item.rel.parent / (stem or item.rel.stem)
    return {kind: base.parent / (base.name + suffix) for kind, suffix in output_suffixes(fmt).items()}


# -- decoding --------------------------------------------------------------------------


def set_max_pixels(max_pixels: int | None) -> None:
    """Pillow's decompression-bomb limit for this process (None: no limit). Default: Pillow's own.

    Pillow only warns between its limit and twice it; `load_image` treats the warning as
    an error, so the limit given here is the limit that holds.
    """
    if max_pixels is not None and max_pixels < 1:
        raise ValueError(f"--max-pixels must be a positive number of pixels, got {max_pixels}")
    Image.MAX_IMAGE_PIXELS = max_pixels


_SPEC = RadiometrySpec()
_NOTES: dict[str, dict] = {}  # str(path) -> the radiometry this process used for it (`radiometry_note`)
_NOTES_LOCK = threading.Lock()


def set_radiometry(spec: RadiometrySpec) -> None:
    """``--input-range``, ``--bands``, ``--nodata`` for every image this process decodes
    (`load_image`); `radiometry.RadiometrySpec()`: the defaults (auto, default bands, the file's nodata)."""
    global _SPEC
    _SPEC = spec


def radiometry_spec() -> RadiometrySpec:
    return _SPEC


def radiometry_note(path: str | os.PathLike, *, forget: bool = False) -> dict | None:
    """How this process mapped ``path``'s pixels the last time it decoded it (`radiometry.finish`'s
    note: dtype, bands, range, nodata, warnings); None if it has not decoded it. ``forget``: drop
    it (the report has taken it), so that a job over many images keeps none of them."""
    with _NOTES_LOCK:
        return _NOTES.pop(str(path), None) if forget else _NOTES.get(str(path))


def keep_radiometry_note(path: str | os.PathLike, note: dict | None) -> None:
    """Record ``note`` as this process's for ``path``: the pixels came decoded from another
    process of the node (`decoded.NodeDecodes`), which made the note."""
    if note is not None:
        with _NOTES_LOCK:
            _NOTES[str(path)] = note


@dataclass
class _Native:
    """An image's pixels as stored (after EXIF orientation): (h, w) or (h, w, bands) of any dtype,
    alpha taken out; ``missing`` where alpha == 0 (None: no alpha); the file's own nodata."""

    pixels: np.ndarray
    missing: np.ndarray | None = None
    nodata: float | None = None


def _upright(im: Image.Image) -> Image.Image:
    """EXIF orientation applied. Without one (orientations 2-8), ``im`` itself: exif_transpose
    would copy it, ~36 ms a 4096^2 photo on the loader's critical path on a GPU host."""
    if im.getexif().get(0x0112, 1) not in range(2, 9):
        return im
    return ImageOps.exif_transpose(im)


def _native_pillow(im: Image.Image) -> _Native:
    """Any Pillow mode -> its pixels: 8-bit modes as uint8 RGB (Pillow's own conversion), 16/32-bit
    integer and float modes (I;16, I, F) as their grey values; EXIF orientation applied."""
    im = _upright(im)
    if "transparency" in im.info and im.mode in ("1", "L", "P", "RGB"):
        # Palette transparency and colour-key (tRNS) transparency become an alpha channel.
        im = im.convert("RGBA")
    alpha = None
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        alpha = np.asarray(im.getchannel("A"))
        im = im.convert("RGB") if im.mode != "LA" else im.convert("L")
    if im.mode.startswith(("I", "F")):
        raw = np.asarray(im)
        raw = raw.astype(raw.dtype.newbyteorder("="), copy=False)  # I;16B
        key = im.info.get("transparency")
        if isinstance(key, int):  # a 16-bit grey PNG's colour key, compared before scaling to 8 bits
            alpha = np.where(raw == key, 0, 255).astype(np.uint8)
        pixels = raw
    else:
        # 1, L, P, CMYK, YCbCr, LAB, HSV: Pillow's own conversion is the sensible one (RGB as it
        # is: convert would copy it).
        pixels = np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
    return _Native(pixels, None if alpha is None else alpha == 0)


def _to_model(native: _Native, *, extra_missing: np.ndarray | None = None,
              spec: RadiometrySpec | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """(uint8 HxWx3, bool HxW missing, the radiometry note) of decoded pixels, by ``spec`` (default:
    `set_radiometry`'s). The auto range counts the pixels known in the file and not in ``extra_missing``."""
    missing = native.missing
    if extra_missing is not None:
        missing = extra_missing if missing is None else missing | extra_missing
    try:
        r, note = resolve(spec or _SPEC, native.pixels, missing=missing, file_nodata=native.nodata)
    except ValueError as e:  # --bands asks for a band the image lacks
        raise InputImageError(str(e)) from e
    rgb, known = to_uint8(native.pixels, r)
    if known.strides == (0, 0):  # every pixel known (`radiometry.known_mask`): no h x w pass
        missing = np.zeros(known.shape, bool) if missing is None else missing
    else:
        missing = ~known if missing is None else missing | ~known
    return np.ascontiguousarray(rgb), missing, note


def to_rgb_and_alpha_mask(im: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """Any Pillow mode -> (uint8 HxWx3, bool HxW missing: alpha == 0, NaN, nodata); EXIF orientation
    applied, radiometry by `set_radiometry`."""
    rgb, missing, _ = _to_model(_native_pillow(im))
    return rgb, missing


def _describe_unreadable(path: Path) -> str | None:
    """A reason for a path that is not a readable file, before Pillow tries it."""
    if path.is_symlink() and not path.exists():
        return f"dangling symlink (to {os.readlink(path)})"
    if path.is_dir():
        return "is a folder, not an image file"
    if not path.exists():
        return "no such file (removed while the job ran?)"
    if not path.is_file():  # a FIFO would block the reader forever, a device could be endless
        return "not a regular file"
    if path.stat().st_size == 0:
        return "empty file (0 bytes)"
    return None


def _decode(path: Path, convert, *, load: bool = True):
    """Open ``path`` with Pillow and apply ``convert`` to it; every decoding failure -> InputImageError.

    ``load=False`` reads the header only (size, EXIF), not the pixels.
    """
    reason = _describe_unreadable(path)
    if reason:
        raise InputImageError(reason)
    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that; the limit is the limit.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if load:
                    im.load()
                return convert(im)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # Pillow's error names twice the limit (where it stops warning); name the limit that holds.
        found = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{int(found.group(1)):,} pixels" if found else str(e)
        raise too_many_pixels(size, Image.MAX_IMAGE_PIXELS) from e
    except UnidentifiedImageError as e:
        raise InputImageError("not an image Pillow can read (wrong extension or corrupt header)") from e
    except PermissionError as e:
        raise InputImageError(f"permission denied ({e.strerror})") from e
    except (OSError, SyntaxError, ValueError, TypeError, IndexError, KeyError, EOFError) as e:
        # Truncated data ("image file is truncated"), broken EXIF or headers, unsupported
        # mode conversions: Pillow raises all of these for bad files.
        raise InputImageError(f"cannot decode: {e}") from e


def _displayed_size(im: Image.Image) -> tuple[int, int]:
    w, h = im.size
    if im.format == "TIFF":
        # Pillow's TIFF plugin reports the displayed size already and turns the pixels on load.
        return h, w
    # EXIF orientations 5-8 swap the axes (ImageOps.exif_transpose's table).
    return (w, h) if im.getexif().get(0x0112, 1) in (5, 6, 7, 8) else (h, w)


def _tifffile_reads(path: Path) -> bool:
    return path.suffix.lower() in TIFF_EXTENSIONS and _describe_unreadable(path) is None


def image_size(item: InputItem) -> tuple[int, int]:
    """(height, width) of an input as `load_image` will return it (EXIF orientation applied), from its
    header; for an input read window by window, of the level `sources.set_level` picks."""
    from .sources import source_size

    size = source_size(item.path)
    if size is not None:
        return size
    if _tifffile_reads(item.path):
        try:
            return tiff_size(item.path)
        except NotForTifffile:
            pass
    return _decode(item.path, _displayed_size, load=False)


def _png_header(path: Path) -> tuple[int, int, int, int, set[bytes]] | None:
    """(height, width, bit depth, colour type, chunk types before the image data) of a PNG; None if not one."""
    chunks = set()
    with open(path, "rb") as f:
        if f.read(8) != b"\x89PNG\r\n\x1a\n":
            return None
        head = None
        while True:
            hdr = f.read(8)
            if len(hdr) < 8:
                return None
            size, kind = int.from_bytes(hdr[:4], "big"), hdr[4:]
            if kind == b"IHDR":
                head = f.read(size)
                f.seek(4, os.SEEK_CUR)
            elif kind == b"IDAT":
                break
            else:
                chunks.add(kind)
                f.seek(size + 4, os.SEEK_CUR)
    if head is None or len(head) < 13:
        return None
    return int.from_bytes(head[4:8], "big"), int.from_bytes(head[0:4], "big"), head[8], head[9], chunks


def _read_png(path: Path) -> _Native | None:
    """A grey, grey+alpha, RGB or RGBA PNG of 8 or 16 bits by imagecodecs (libpng/libspng): all
    16 bits kept (Pillow truncates 16-bit RGB to 8), and faster. None: Pillow's (palettes,
    transparency keys, EXIF orientation, animation, fewer bits, a broken file: Pillow names why)."""
    if imagecodecs is None:
        return None
    try:
        header = _png_header(path)
    except OSError:
        return None
    if header is None:
        return None
    h, w, depth, colour, chunks = header
    if depth not in (8, 16) or colour not in (0, 2, 4, 6) or chunks & {b"tRNS", b"eXIf", b"acTL"}:
        return None
    if Image.MAX_IMAGE_PIXELS is not None and h * w > Image.MAX_IMAGE_PIXELS:
        raise too_many_pixels(f"{h * w:,} pixels", Image.MAX_IMAGE_PIXELS)
    try:
        arr = imagecodecs.png_decode(path.read_bytes())
    except Exception:  # imagecodecs' PngError and friends: Pillow's path says what is wrong
        return None
    if arr.shape[:2] != (h, w):
        return None
    if colour in (4, 6):  # grey + alpha, RGBA
        return _Native(arr[..., :-1], arr[..., -1] == 0)
    return _Native(arr)


def _pixels(path: Path) -> _Native:
    if _tifffile_reads(path):
        try:
            t = read_tiff(path, max_pixels=Image.MAX_IMAGE_PIXELS)
            return _Native(t.pixels, t.missing, t.nodata)
        except NotForTifffile:
            pass
    if path.suffix.lower() == ".png" and _describe_unreadable(path) is None:
        native = _read_png(path)
        if native is not None:
            return native
    return _decode(path, _native_pillow)


def sidecar_mask_path(item: InputItem, mask_dir: str | os.PathLike | None) -> Path | None:
    """The sidecar mask of ``item``: ``NAME.EXT.mask.png`` if present, else ``NAME.mask.png``, else None."""
    base = Path(mask_dir) / item.rel if mask_dir is not None else item.path
    for cand in (base.with_name(base.name + MASK_SUFFIX), base.with_name(base.stem + MASK_SUFFIX)):
        if cand.exists() or cand.is_symlink():
            return cand
    return None


def _mask_array(im: Image.Image) -> np.ndarray:
    """bool HxW: nonzero = missing; a transparent sidecar pixel is never missing."""
    im = _upright(im)
    alpha = None
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        im = im.convert("RGBA") if im.mode != "LA" else im
        alpha = np.asarray(im.getchannel("A"))
        im = im.convert("RGB") if im.mode != "LA" else im.getchannel("L")
    if im.mode == "P":
        im = im.convert("RGB")  # the palette colour, not the index, is what a painter sees
    elif im.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        im = im.convert("L")
    arr = np.asarray(im)
    if arr.ndim == 3:
        arr = arr.max(axis=2)
    missing = arr != 0
    if alpha is not None:
        missing &= alpha != 0
    return missing


def load_mask(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """A sidecar mask resized never: bool HxW (True = missing), or InputImageError naming the mask."""
    try:
        missing = _decode(path, _mask_array)
    except InputImageError as e:
        raise InputImageError(f"mask {path.name}: {e}") from e
    if missing.shape != shape:
        raise InputImageError(
            f"mask {path.name} is {missing.shape[1]}x{missing.shape[0]} but the image is {shape[1]}x{shape[0]} "
            "(after EXIF orientation; masks are in the displayed orientation)"
        )
    return missing


def load_image(item: InputItem, *, mask_dir: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 HxWx3, bool HxW missing) for one input, or InputImageError with the reason.

    Decoded as stored (TIFFs by tifffile when it reads their layout, `tiff.read_tiff`; 8/16-bit
    PNGs by imagecodecs; the rest by Pillow), then mapped to uint8 by the radiometry of
    `set_radiometry` (`radiometry`: bands, input range, nodata). Missing: alpha == 0, NaN,
    nodata, and the sidecar mask. The note of what was used is kept (`radiometry_note`).
    """
    native = _pixels(item.path)
    side = sidecar_mask_path(item, mask_dir)
    extra = load_mask(side, native.pixels.shape[:2]) if side is not None else None
    rgb, mask, note = _to_model(native, extra_missing=extra)
    with _NOTES_LOCK:
        _NOTES[str(item.path)] = note
    return rgb, mask


# -- writing -----------------------------------------------------------------------------


def read_output_text(path: str | os.PathLike, key: str) -> str | None:
    """A text entry of an output written with ``text`` (`write_png_atomic`, `write_tiff_atomic`),
    reading the header only; None if absent or unreadable."""
    if os.path.isdir(path):  # an OME-Zarr group (`omezarr`)
        from .omezarr import read_text

        return read_text(path, key)
    try:
        with Image.open(path) as im:
            if im.format == "TIFF":  # our entries: a JSON object in the ImageDescription tag
                value = json.loads(im.tag_v2.get(270, "{}")).get(key)
            else:
                # Our chunks precede the image data, so `info` has them without decoding pixels.
                value = im.info.get(key)
    except (OSError, SyntaxError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def _temp_pattern(path: Path) -> str:
    return str(path.parent / f".{glob.escape(path.name)}.*{_TEMP_SUFFIX}")


# A host name as it may appear in a file name (no separators); `_temp_owner` splits on the last dashes.
_HOST = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "host"


def _temp_owner(tmp: str, target: Path) -> tuple[str, int] | None:
    """(host, pid) of the writer that named ``tmp`` (`_write_atomic`), None for another naming."""
    middle = os.path.basename(tmp)[len(target.name) + 2 : -len(_TEMP_SUFFIX)]  # .NAME.<middle>.tmp
    parts = middle.rsplit("-", 2)  # mkstemp's random part has no dash; a host name may
    return (parts[0], int(parts[1])) if len(parts) == 3 and parts[0] and parts[1].isdigit() else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename in folder ``path`` durable: without it a power cut can forget the new name
    (ext4, XFS). Where folders cannot be opened (Windows: no O_DIRECTORY) it is skipped."""
    flag = getattr(os, "O_DIRECTORY", None)
    if flag is None:
        return
    fd = os.open(path, os.O_RDONLY | flag)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems (and FUSE mounts) refuse fsync on a folder; the rename itself is done
        pass
    finally:
        os.close(fd)


# Temporary files being written now. The writer is a daemon thread (so that a failing main
# thread never waits on it), and daemon threads die mid-statement when the interpreter exits,
# e.g. after Ctrl-C: the exit hook removes what they were writing.
_IN_FLIGHT: set[str] = set()
_IN_FLIGHT_LOCK = threading.Lock()
_EXITING = False


@atexit.register
def _remove_in_flight_temps() -> None:
    global _EXITING
    with _IN_FLIGHT_LOCK:
        _EXITING = True
        for tmp in _IN_FLIGHT:
            Path(tmp).unlink(missing_ok=True)


def write_png_atomic(
    pixels: np.ndarray,
    path: str | os.PathLike,
    *,
    palette: list[tuple[int, int, int]] | None = None,
    text: dict[str, str] | None = None,
    compress_level: int = 1,
    pool: Executor | None = None,
    ready: Callable[[int], None] | None = None,
) -> None:
    """Write ``pixels`` as a PNG (`png.write_png`: greyscale, palette indices or RGB), atomically
    (`_write_atomic`). ``text`` goes into tEXt chunks before the image data
    (`read_output_text` reads them back); ``pool`` compresses strips of the image on its threads;
    ``ready(y)`` blocks until rows [0, y) are final (`png.write_png`).
    """
    _write_atomic(path, lambda f: write_png(f, pixels, palette=palette, text=text, level=compress_level, pool=pool,
                                            ready=ready))


def write_tiff_atomic(
    pixels: np.ndarray,
    path: str | os.PathLike,
    *,
    palette: list[tuple[int, int, int]] | None = None,
    text: dict[str, str] | None = None,
    threads: int = 1,
    extratags: tuple = (),
) -> None:
    """Write ``pixels`` as a tiled TIFF (`tiff.write_tiff`), atomically (`_write_atomic`).
    ``text``: a JSON object in the ImageDescription tag (`read_output_text` reads it back);
    ``extratags``: more tags (georeferencing, nodata)."""
    _write_atomic(path, lambda f: write_tiff(f, pixels, palette=palette,
                                             description=json.dumps(text or {}, sort_keys=True), threads=threads,
                                             extratags=extratags))


def _write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """``write(f)`` to a hidden temporary file in the same folder, fsync, rename, fsync the
    folder: never a half-written output, and a finished one survives a power cut."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _IN_FLIGHT_LOCK:
        if _EXITING:
            raise RuntimeError(f"not writing {path}: the interpreter is exiting")
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_HOST}-{os.getpid()}-", suffix=_TEMP_SUFFIX, dir=path.parent)
        _IN_FLIGHT.add(tmp)
    try:
        os.close(fd)
        with open(tmp, "wb") as f:  # by name, not fdopen: tifffile reads ``f.name`` as a path
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get the usual mode
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        with _IN_FLIGHT_LOCK:
            _IN_FLIGHT.discard(tmp)


def remove_stale_temps(paths: Iterable[str | os.PathLike], *, since: float | None = None) -> int:
    """Delete temporary files that killed writers of any of ``paths`` left behind; their count.

    A process killed with SIGKILL cannot clean up after itself. Removed: this process's own
    temporary files, those of processes of this host that no longer run, and, with ``since``
    (`resume.OutputLock.since`: when this job took OUTPUT, on the filesystem's clock), any
    older than that: no other job writes into an OUTPUT we hold, so they are a dead job's.
    A live writer's file from another host or process is left alone. Call it when this
    process's own writers are done.
    """
    removed = 0
    me = os.getpid()
    for p in map(Path, paths):
        for tmp in glob.glob(_temp_pattern(p)):
            owner = _temp_owner(tmp, p)
            try:
                stale = owner is not None and owner[0] == _HOST and (owner[1] == me or not _pid_alive(owner[1]))
                if not stale and not (since is not None and os.stat(tmp).st_mtime < since):
                    continue
                if os.path.isdir(tmp):  # an OME-Zarr output's folder (`omezarr.OmeZarrCanvas`)
                    shutil.rmtree(tmp)
                else:
                    os.unlink(tmp)
                removed += 1
            except FileNotFoundError:
                pass
    return removed
