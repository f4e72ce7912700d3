"""Inputs read window by window: tiled and pyramidal TIFF / BigTIFF (tifffile), zarr and
OME-Zarr (zarr), whole-slide formats (OpenSlide, when installed).

A process decodes only the windows its tiles need, halos included, never the whole
image: `open_source` gives a `Source` for an input this module reads, and `Source.image`
is what the engine slices windows from (`Engine._windows` calls `WindowedImage.read_window`;
its ``shape`` and its ``mask``'s are the image's). Pass 1 reads the same windows. Decoded
segments (TIFF tiles, zarr chunks) are kept in a small per-source cache, since neighbouring
windows share their halos.

What goes through here (`windowed`): TIFFs whose pixels tifffile reads and that are tiled
or have pyramid levels (`tiff.read_tiff`'s layouts), zarr / OME-Zarr folders (``*.zarr``),
and whole-slide files OpenSlide opens (``.svs``, ``.ndpi``, ``.mrxs``, ...). Strip TIFFs and
every other format are decoded whole (`images.load_image`), as before.

Pixels to uint8: `Source.window` maps each window's native samples by the image's
`radiometry.Radiometry` (bands, range, nodata), as a whole decode maps the whole image
(`images`), so a windowed run's outputs are byte-identical to a whole decode's
(tests/test_sources.py). When the range must come from the data (``--input-range auto`` on
non-8-bit pixels, or the clipping warnings), `Source.prepare_radiometry` first reads the
level block by block into the image's integer histogram: the sum of any windows' histograms
is the whole image's, so the range is the one a whole decode finds. That costs one more read
of the level per process (8-bit data taken as it is needs none).

Level: `set_level` (``run --level N`` or ``--mpp X``) picks a pyramid level for every source
of this process; the level's own pixels are read (no resampling), and its pixel size (µm,
from OME / OpenSlide metadata or the TIFF resolution tags) is reported (`Source.describe`).
"""

from __future__ import annotations

import os
import types
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import InputImageError

__all__ = ["Source", "WindowedImage", "LevelChoice", "set_level", "open_source", "windowed",
           "ZARR_SUFFIX", "SLIDE_EXTENSIONS"]

ZARR_SUFFIX = ".zarr"
#: Whole-slide formats read through OpenSlide (openslide-python + openslide-bin) when installed.
SLIDE_EXTENSIONS = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide")
#: Bytes of decoded segments a source keeps. Windows of neighbouring tiles share their halos;
#: a few rows of 512^2 RGB tiles fit.
CACHE_BYTES = 192 * 2**20


class LevelError(InputImageError):
    """--level or --mpp names no level of an input."""


@dataclass(frozen=True)
class LevelChoice:
    """Which pyramid level to read: ``level`` (0: full resolution), or the level whose pixel
    size is closest to ``mpp`` µm without being coarser (when the input has one)."""

    level: int = 0
    mpp: float | None = None


_CHOICE = LevelChoice()


def set_level(*, level: int = 0, mpp: float | None = None) -> None:
    """The level every source of this process reads (`run --level` / `--mpp`)."""
    global _CHOICE
    if level < 0:
        raise ValueError(f"--level must be >= 0, got {level}")
    if mpp is not None and mpp <= 0:
        raise ValueError(f"--mpp must be > 0 µm, got {mpp}")
    _CHOICE = LevelChoice(level, mpp)


def current_level() -> LevelChoice:
    return _CHOICE


def _pick(sizes: list[tuple[int, int]], mpps: list[float | None], choice: LevelChoice, path: Path) -> int:
    if choice.mpp is None:
        if choice.level >= len(sizes):
            raise LevelError(f"{path.name} has {len(sizes)} level{'s' * (len(sizes) > 1)} (0..{len(sizes) - 1}); "
                             f"--level {choice.level} is not one of them")
        return choice.level
    if mpps[0] is None:
        raise LevelError(f"{path.name} records no pixel size; pick a level with --level instead of --mpp")
    # The coarsest level still at least as fine as asked (1% slack for rounded metadata).
    fine = [i for i, m in enumerate(mpps) if m is not None and m <= choice.mpp * 1.01]
    return fine[-1] if fine else 0


# -- pixels to uint8 (the radiometry seam) ------------------------------------------------


#: Side of the blocks `Source.prepare_radiometry` reads the level in (bounded memory).
HISTOGRAM_BLOCK = 2048


# -- sources ----------------------------------------------------------------------------------


class Source:
    """One input, one level, read by windows: ``read(y0, y1, x0, x1)`` -> native (h, w, samples)."""

    kind = "?"

    def __init__(self, path: Path, *, sizes: list[tuple[int, int]], mpps: list[float | None], level: int,
                 chunk: tuple[int, int], dtype: np.dtype, samples: int, alpha: bool) -> None:
        self.path, self.sizes, self.mpps, self.level = path, sizes, mpps, level
        self.height, self.width = sizes[level]
        self.chunk, self.dtype, self.samples, self.alpha = chunk, np.dtype(dtype), samples, alpha
        self.alpha_index = samples - 1 if alpha else None  # the sample that is alpha (a subclass may say otherwise)
        self.nodata: float | None = None  # the file's own nodata value (GDAL_NODATA)
        self.radiometry = None  # `radiometry.Radiometry`, from `prepare_radiometry`
        self.note: dict | None = None  # its report note
        self._cache: OrderedDict[Any, np.ndarray] = OrderedDict()
        self._cached = 0
        self._lock = threading.Lock()

    @property
    def mpp(self) -> float | None:
        return self.mpps[self.level]

    def describe(self) -> dict:
        """What the report records: the reader, the level read and its pixel size."""
        return {"reader": self.kind, "level": self.level, "levels": len(self.sizes),
                "size": [self.width, self.height], "mpp": self.mpp}

    def _segment(self, key, load: Callable[[], np.ndarray]) -> np.ndarray:
        with self._lock:
            got = self._cache.get(key)
            if got is not None:
                self._cache.move_to_end(key)
                return got
        got = load()  # outside the lock: several engine workers decode at once
        with self._lock:
            if key not in self._cache:
                self._cache[key] = got
                self._cached += got.nbytes
                while self._cached > CACHE_BYTES and len(self._cache) > 1:
                    self._cached -= self._cache.popitem(last=False)[1].nbytes
        return got

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Native pixels of the window, from the chunks it overlaps."""
        ch, cw = self.chunk
        out = np.zeros((y1 - y0, x1 - x0, self.samples), self.dtype)  # zeros: a segment a file leaves out
        for cy in range(y0 // ch, (y1 - 1) // ch + 1):
            for cx in range(x0 // cw, (x1 - 1) // cw + 1):
                seg = self._segment((cy, cx), lambda cy=cy, cx=cx: self._load(cy, cx))
                if seg is None:
                    continue
                sy, sx = cy * ch, cx * cw
                a0, a1 = max(y0, sy), min(y1, sy + seg.shape[0])
                b0, b1 = max(x0, sx), min(x1, sx + seg.shape[1])
                out[a0 - y0 : a1 - y0, b0 - x0 : b1 - x0] = seg[a0 - sy : a1 - sy, b0 - sx : b1 - sx]
        return out

    def _load(self, cy: int, cx: int) -> np.ndarray | None:
        raise NotImplementedError

    def _split(self, native: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(the bands, alpha taken out; missing where alpha == 0, None without alpha)."""
        if self.alpha_index is None:
            return native, None
        keep = [i for i in range(native.shape[2]) if i != self.alpha_index]
        return native[..., keep], native[..., self.alpha_index] == 0

    def prepare_radiometry(self, spec) -> dict:
        """Decide how this image's samples become uint8 (``spec``: `radiometry.RadiometrySpec`,
        the job's flags) and return the report note; `window` uses it. ValueError naming
        ``--bands`` when it asks for a band the image lacks."""
        from .radiometry import default_bands, finish, histogram_for, needs_histogram

        n_bands = self.samples - (self.alpha_index is not None)
        hist = None
        if needs_histogram(self.dtype, spec) and max(spec.bands or default_bands(n_bands)) <= n_bands:
            hist = histogram_for(spec, dtype=self.dtype, n_bands=n_bands, file_nodata=self.nodata)
            b = HISTOGRAM_BLOCK
            for y in range(0, self.height, b):
                for x in range(0, self.width, b):
                    hist.add(*self._split(self.read(y, min(y + b, self.height), x, min(x + b, self.width))))
        self.radiometry, self.note = finish(spec, dtype=self.dtype, n_bands=n_bands, histogram=hist,
                                            file_nodata=self.nodata)
        return self.note

    def window(self, y0: int, y1: int, x0: int, x1: int) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 (h, w, 3), bool (h, w) missing) of the window, by `prepare_radiometry`'s mapping."""
        from .radiometry import to_uint8

        if self.radiometry is None:
            from .images import radiometry_spec

            self.prepare_radiometry(radiometry_spec())
        colour, missing = self._split(self.read(y0, y1, x0, x1))
        rgb, known = to_uint8(colour, self.radiometry)
        if known.strides != (0, 0):  # (0, 0): every pixel known (`radiometry.known_mask`)
            missing = ~known if missing is None else missing | ~known
        elif missing is None:
            missing = np.zeros(known.shape, bool)
        return np.ascontiguousarray(rgb), missing

    def close(self) -> None:
        pass


class TiffSource(Source):
    """A tiled (or pyramidal) TIFF through tifffile: one page of ``series[0].levels``; its
    tiles (or strips) read and decoded one by one."""

    kind = "tifffile"

    def __init__(self, path: Path, choice: LevelChoice) -> None:
        from . import tiff

        self._tif = tiff._open(path)
        try:
            levels = self._tif.series[0].levels
            pages = [lv.keyframe for lv in levels]
            sizes = [(p.imagelength, p.imagewidth) for p in pages]
            mpp0 = _tiff_mpp(self._tif, pages[0])
            mpps = [None if mpp0 is None else mpp0 * sizes[0][1] / s[1] for s in sizes]
            level = _pick(sizes, mpps, choice, path)
            # The level's page through `tiff._page`'s layout check (it looks at ``pages.first`` only).
            page = tiff._page(types.SimpleNamespace(pages=types.SimpleNamespace(first=levels[level].keyframe)))
        except BaseException:
            self._tif.close()
            raise
        self._page = page
        chunk = (page.tilelength, page.tilewidth) if page.is_tiled else (page.rowsperstrip, page.imagewidth)
        layout = tiff._layout(page)
        super().__init__(path, sizes=sizes, mpps=mpps, level=level, chunk=chunk, dtype=page.dtype,
                         samples=page.samplesperpixel, alpha=layout.alpha is not None)
        self.alpha_index = layout.alpha
        self.nodata = tiff.file_nodata(page)
        self._per_row = -(-page.imagewidth // chunk[1])
        self._file_lock = threading.Lock()
        self._decodeargs: dict = {"_fullsize": page.is_tiled}
        if page.compression in (6, 7, 34892, 33007):  # JPEG: the tables live in the page
            self._decodeargs.update(jpegtables=page.jpegtables, jpegheader=page.jpegheader)

    def _load(self, cy: int, cx: int) -> np.ndarray | None:
        import zlib

        k = cy * self._per_row + cx
        page, fh = self._page, self._tif.filehandle
        offset, count = page.dataoffsets[k], page.databytecounts[k]
        if not offset or not count:
            return None
        with self._file_lock:  # engine workers read at once; tifffile's own handle lock is a no-op by default
            fh.seek(offset)
            data = fh.read(count)
        try:
            seg, _, _ = page.decode(data, k, **self._decodeargs)
        except (ValueError, IndexError, KeyError, EOFError, OSError, RuntimeError, zlib.error) as e:
            raise InputImageError(f"cannot decode tile {k}: {e}") from e
        return None if seg is None else seg[0]

    def close(self) -> None:
        self._tif.close()


def _tiff_mpp(tif, page) -> float | None:
    """µm per pixel at level 0: OME's PhysicalSizeX, an SVS description's MPP, or the resolution tags."""
    import re

    if tif.is_ome:
        m = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', tif.pages.first.description or "")
        if m:
            return float(m.group(1))
    m = re.search(r"MPP\s*=\s*([0-9.]+)", page.description or "")
    if m:
        return float(m.group(1))
    res, unit = page.tags.get(282), page.tags.get(296)
    if res is None or unit is None or int(unit.value) not in (2, 3):
        return None
    num, den = res.value
    if not num or not den:
        return None
    per_unit = num / den
    return (25400.0 if int(unit.value) == 2 else 10000.0) / per_unit  # inch / centimetre in µm


class SlideSource(Source):
    """A whole-slide file through OpenSlide; windows by ``read_region`` (RGBA, alpha 0 outside the scanned area)."""

    kind = "openslide"

    def __init__(self, path: Path, choice: LevelChoice) -> None:
        import openslide

        try:
            self._slide = openslide.OpenSlide(str(path))
        except openslide.OpenSlideError as e:
            raise InputImageError(f"OpenSlide cannot read it: {e}") from e
        sizes = [(h, w) for w, h in self._slide.level_dimensions]
        mpp = self._slide.properties.get(openslide.PROPERTY_NAME_MPP_X)
        mpps = [None if mpp is None else float(mpp) * d for d in self._slide.level_downsamples]
        level = _pick(sizes, mpps, choice, path)
        self._down = self._slide.level_downsamples[level]
        super().__init__(path, sizes=sizes, mpps=mpps, level=level, chunk=(512, 512), dtype=np.uint8, samples=4,
                         alpha=True)

    def _load(self, cy: int, cx: int) -> np.ndarray:
        ch, cw = self.chunk
        y, x = cy * ch, cx * cw
        h, w = min(ch, self.height - y), min(cw, self.width - x)
        # read_region takes the top-left corner in level-0 pixels and the size in the level's.
        region = self._slide.read_region((round(x * self._down), round(y * self._down)), self.level, (w, h))
        return np.asarray(region)

    def close(self) -> None:
        self._slide.close()


class ZarrSource(Source):
    """A zarr array, or an OME-Zarr image (NGFF multiscales: one dataset a level), by its chunks.

    Axes: OME's ``axes`` names them (t and z: the first plane; c: the samples); a plain array
    is (y, x), (y, x, c) with c <= 4, or (c, y, x).
    """

    kind = "zarr"

    def __init__(self, path: Path, choice: LevelChoice) -> None:
        try:
            import zarr
        except ImportError as e:
            raise InputImageError("zarr inputs need zarr: pip install tilerun[ome]") from e
        try:
            node = zarr.open(str(path), mode="r")
        except Exception as e:  # zarr raises many kinds for a folder that is not a store
            raise InputImageError(f"not a zarr store zarr can open: {e}") from e
        axes = None
        if isinstance(node, zarr.Group):
            ms = (node.attrs.get("multiscales") or node.attrs.get("ome", {}).get("multiscales") or [None])[0]
            if ms is None:
                raise InputImageError("a zarr group without OME multiscales metadata: give the array's folder")
            try:
                axes = [a["name"] if isinstance(a, dict) else a for a in ms.get("axes", [])] or None
                arrays = [node[d["path"]] for d in ms["datasets"]]
                mpps = _ome_mpps(ms, axes)
            except (KeyError, TypeError, ValueError, IndexError) as e:
                raise InputImageError(f"its OME multiscales metadata is incomplete ({type(e).__name__}: {e})") from e
        else:
            arrays, mpps = [node], [None]
        if axes is None:
            nd = arrays[0].ndim
            axes = {2: ["y", "x"], 3: ["y", "x", "c"] if arrays[0].shape[-1] <= 4 else ["c", "y", "x"]}.get(nd)
            if axes is None:
                raise InputImageError(f"a {nd}-dimensional zarr array: tilerun reads (y, x), (y, x, c) or (c, y, x)")
        self._axes = axes
        sizes = [(a.shape[axes.index("y")], a.shape[axes.index("x")]) for a in arrays]
        level = _pick(sizes, mpps, choice, path)
        self._arr = arrays[level]
        samples = self._arr.shape[axes.index("c")] if "c" in axes else 1
        if samples not in (1, 2, 3, 4):
            raise InputImageError(f"{samples} channels: tilerun reads 1-4 (grey, grey+alpha, RGB, RGBA)")
        chunks = self._arr.chunks
        super().__init__(path, sizes=sizes, mpps=mpps, level=level,
                         chunk=(chunks[axes.index("y")], chunks[axes.index("x")]), dtype=self._arr.dtype,
                         samples=samples, alpha=samples in (2, 4))

    def _load(self, cy: int, cx: int) -> np.ndarray:
        ch, cw = self.chunk
        index = []
        for ax in self._axes:
            index.append({"y": slice(cy * ch, (cy + 1) * ch), "x": slice(cx * cw, (cx + 1) * cw)}.get(
                ax, slice(None) if ax == "c" else 0))
        block = np.asarray(self._arr[tuple(index)])
        kept = [ax for ax in self._axes if ax in ("y", "x", "c")]
        if "c" not in kept:
            return block[..., None]
        return np.moveaxis(block, kept.index("c"), -1)


def _ome_mpps(ms: dict, axes) -> list[float | None]:
    """Per dataset, the x scale of its coordinate transformations (µm when the axis unit says so)."""
    out: list[float | None] = []
    for d in ms["datasets"]:
        scale = next((t["scale"] for t in d.get("coordinateTransformations", []) if t.get("type") == "scale"), None)
        out.append(float(scale[axes.index("x")]) if scale and axes and "x" in axes else None)
    if any(m is None for m in out):
        return [None] * len(out)
    return out


def _is_zarr(path: Path) -> bool:
    return path.name.lower().endswith(ZARR_SUFFIX) and path.is_dir()


def windowed(path: Path) -> bool:
    """Whether `open_source` reads ``path`` (without decoding any pixel): a zarr folder, a
    whole-slide file OpenSlide can read, or a tiled or pyramidal TIFF tifffile reads."""
    low = path.name.lower()
    if _is_zarr(path):
        return True
    if low.endswith(SLIDE_EXTENSIONS):
        return _openslide() is not None
    from . import tiff

    if not low.endswith(tiff.TIFF_EXTENSIONS) or not path.is_file():
        return False
    try:
        with tiff._open(path) as tif:
            page = tiff._page(tif)
            return page.is_tiled or len(tif.series[0].levels) > 1
    except (tiff.NotForTifffile, InputImageError):
        return False


def _openslide():
    try:
        import openslide
    except (ImportError, OSError):  # openslide-python without the library (openslide-bin)
        return None
    return openslide


def open_source(path: str | os.PathLike, *, choice: LevelChoice | None = None) -> Source:
    """A `Source` for an input `windowed` accepts, at the chosen level (default: `set_level`'s)."""
    path = Path(path)
    choice = choice or _CHOICE
    if _is_zarr(path):
        return ZarrSource(path, choice)
    if path.name.lower().endswith(SLIDE_EXTENSIONS):
        return SlideSource(path, choice)
    return TiffSource(path, choice)


class _Mask:
    """The missing mask of a `WindowedImage`, sliceable like a bool (h, w) array."""

    def __init__(self, image: "WindowedImage") -> None:
        self._image = image
        self.shape = image.shape[:2]
        self.dtype = np.dtype(bool)
        self.ndim = 2

    def __getitem__(self, key) -> np.ndarray:
        return self._image.read_window(*_box(key, self.shape))[1]


def _box(key, shape) -> tuple[int, int, int, int]:
    """``[y0:y1, x0:x1]`` or ``[y0:y1]`` (whole rows, as the coarse context reads bands) -> (y0, y1, x0, x1)."""
    ys, xs = key if isinstance(key, tuple) else (key, slice(None))
    y0, y1, _ = ys.indices(shape[0])
    x0, x1, _ = xs.indices(shape[1])
    return y0, y1, x0, x1


class WindowedImage:
    """What the loader hands the engine in place of a decoded image: ``[y0:y1, x0:x1]`` and
    `read_window` decode just that window (uint8 RGB; the mask is ``.mask``'s, with the
    sidecar mask, when there is one, or'ed in)."""

    def __init__(self, source: Source, sidecar: np.ndarray | None = None) -> None:
        self.source, self.sidecar = source, sidecar
        self.shape = (source.height, source.width, 3)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 3
        self.mask = _Mask(self)

    def read_window(self, y0: int, y1: int, x0: int, x1: int) -> tuple[np.ndarray, np.ndarray]:
        rgb, missing = self.source.window(y0, y1, x0, x1)
        if self.sidecar is not None:
            missing |= self.sidecar[y0:y1, x0:x1]
        return rgb, missing

    def __getitem__(self, key) -> np.ndarray:
        return self.read_window(*_box(key[:2] if isinstance(key, tuple) else key, self.shape))[0]


def source_size(path: Path) -> tuple[int, int] | None:
    """(height, width) of the level `open_source` reads, None when the input is not windowed."""
    if path.name.lower().endswith(SLIDE_EXTENSIONS) and _openslide() is None:
        raise InputImageError("whole-slide files are read through OpenSlide: pip install tilerun[slide]")
    if not windowed(path):
        if _CHOICE != LevelChoice():  # a single-level input: --level / --mpp name nothing in it
            _pick([(0, 0)], [None], _CHOICE, path)
        return None
    src = open_source(path)
    try:
        return src.height, src.width
    finally:
        src.close()


def describe(path: Path) -> dict | None:
    """What `open_source` reads of ``path`` (`Source.describe`: reader, level, levels, size, µm per
    pixel), for the report and the outputs' text; None for an input decoded whole."""
    try:
        if not windowed(path):
            return None
        src = open_source(path)
    except InputImageError:
        return None
    try:
        return src.describe()
    finally:
        src.close()
