"""How an input's native pixels (any dtype, any number of bands) become the model's uint8 RGB and
its known-pixel mask: band choice (``--bands``), input range (``--input-range``) and nodata
(``--nodata``, or the file's own GDAL_NODATA tag).

* **Bands** are 1-based, as GDAL users type them. Three bands are R, G, B; one band is grey
  (copied to R, G and B). Without ``--bands``: one band is grey, three or more bands use
  1, 2, 3, two bands use band 1 (an alpha band is not a band here: the decoder takes it
  out first). Bands left out are named in a warning.
* **Range.** A value v becomes ``round((v - low) * 255 / (high - low))``, clipped to 0..255:
  one range over the bands used, so their colour balance is kept. ``auto`` (the default)
  leaves 8-bit data as it is (low 0, high 255: 8-bit inputs are decoded exactly as before)
  and stretches any other dtype between the 0.5th and 99.5th percentiles (`AUTO_PERCENTILES`)
  of the image's known values over the bands used.
* **Missing** (not known): a pixel where any band used is NaN or infinite, or where every
  band used equals nodata. Missing pixels count in no histogram and become 0 in the uint8
  image (the model fills them, as it fills alpha = 0).

**The auto range does not depend on tiling or world size.** `Histogram` holds integer counts,
so a sum of histograms is exact and order-free: the histogram of a whole image equals the
sum of the histograms of any set of windows that cover its pixels once (e.g. every tile's
core, or every window a reader reads), whatever their size and whichever process adds them.
Today every process decodes the whole image (`images.load_image`) and histograms it whole,
which is that sum; a reader that reads window by window adds each window's core with
`Histogram.add` and merges the processes' histograms with `Histogram.merge` (or sums
``counts``), then calls `finish` once: the same range, bit for bit.

Bins: 8- and 16-bit integers (signed or not) get one bin per value (256 or 65,536 bins):
their percentiles are exact order statistics. Every other dtype (float, 32/64-bit
integers) is cast to float32 and binned by the top 20 bits of an order-preserving key of
its bits (sign, 8 exponent bits, 11 mantissa bits): 2^20 bins, each spanning a relative
width of at most 2^-11 (0.05%); ``low`` is the lower edge of its bin and ``high`` the upper
edge of its bin. The bins are a function of the value alone, so this too is the same for
any tiling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "AUTO_PERCENTILES",
    "Radiometry",
    "RadiometrySpec",
    "Histogram",
    "parse_input_range",
    "parse_bands",
    "default_bands",
    "select_bands",
    "known_mask",
    "to_uint8",
    "needs_histogram",
    "finish",
    "histogram_for",
    "resolve",
]

#: The auto range: these percentiles of the known values (over the bands used).
AUTO_PERCENTILES = (0.5, 99.5)
#: Warn when more than this share of the known values lies outside the range (auto clips ~1% by design).
CLIP_WARN = 0.02
#: Warn when the values map onto fewer output levels than this (and the data had more distinct values).
COLLAPSE_LEVELS = 32
_FLOAT_SHIFT = 12  # float keys are 32 bits: 2^20 bins
_ROWS_BYTES = 1 << 23  # rows processed at once: temporaries stay ~8 MB a band whatever the image


@dataclass(frozen=True)
class Radiometry:
    """How one image's native pixels map to uint8: 1-based ``bands`` (None: `default_bands`),
    values ``low``..``high`` onto 0..255, and ``nodata`` (a value that, in every band used,
    marks a pixel missing; None: none)."""

    bands: tuple[int, ...] | None
    low: float
    high: float
    nodata: float | None = None


@dataclass(frozen=True)
class RadiometrySpec:
    """What the user asked for (``--input-range``, ``--bands``, ``--nodata``): the same for every
    image of a job; `resolve` / `finish` turn it into each image's `Radiometry`."""

    input_range: tuple[float, float] | None = None  # None: auto
    bands: tuple[int, ...] | None = None
    nodata: float | None = None

    @property
    def is_default(self) -> bool:
        return self == RadiometrySpec()

    def to_json(self) -> dict[str, Any]:
        return {"input_range": list(self.input_range) if self.input_range else "auto",
                "bands": list(self.bands) if self.bands else None, "nodata": self.nodata}


def parse_input_range(text: str) -> tuple[float, float] | None:
    """``auto`` -> None; ``MIN,MAX`` -> (MIN, MAX); ValueError naming the flag otherwise."""
    if text.strip().lower() == "auto":
        return None
    parts = text.split(",")
    try:
        low, high = (float(p) for p in parts)
    except ValueError:
        raise ValueError(f"--input-range takes auto or MIN,MAX (e.g. 0,4095), got {text!r}") from None
    if not (math.isfinite(low) and math.isfinite(high)) or high <= low:
        raise ValueError(f"--input-range MIN,MAX needs finite MIN < MAX, got {text!r}")
    return low, high


def parse_bands(text: str) -> tuple[int, ...]:
    """``4,3,2`` -> (4, 3, 2): one band (grey) or three (R, G, B), 1-based."""
    try:
        bands = tuple(int(p) for p in text.split(","))
    except ValueError:
        raise ValueError(f"--bands takes 1-based band numbers, one or three (e.g. 4,3,2 or 1), got {text!r}") from None
    if len(bands) not in (1, 3) or min(bands) < 1:
        raise ValueError(f"--bands takes one band (grey) or three (R,G,B), numbered from 1, got {text!r}")
    return bands


def default_bands(n_bands: int) -> tuple[int, ...]:
    """The bands used without ``--bands``: grey for one band, band 1 of two, else 1, 2, 3."""
    return (1,) if n_bands < 3 else (1, 2, 3)


def _n_bands(native: np.ndarray) -> int:
    return 1 if native.ndim == 2 else native.shape[2]


def select_bands(native: np.ndarray, bands: tuple[int, ...] | None) -> np.ndarray:
    """(h, w, k) view of the ``bands`` used (k = 1 or 3); ValueError naming --bands if one is absent."""
    n = _n_bands(native)
    bands = bands or default_bands(n)
    if max(bands) > n:
        raise ValueError(f"--bands {','.join(map(str, bands))}: the image has {n} band{'s' * (n > 1)}")
    cube = native[..., None] if native.ndim == 2 else native
    if bands == tuple(range(1, len(bands) + 1)):
        return cube[..., : len(bands)]  # a view: no copy for the common cases
    return cube[..., [b - 1 for b in bands]]


def known_mask(selected: np.ndarray, nodata: float | None) -> np.ndarray:
    """bool (h, w) of a (h, w, k) array: every band finite, and not every band equal to ``nodata``
    (cast to the dtype, as GDAL does; a nodata the dtype cannot hold marks nothing). Integers
    without a nodata are all known: a read-only view then (stride 0), no h x w array."""
    known = None
    if selected.dtype.kind == "f":
        known = np.isfinite(selected).all(axis=2)
    if nodata is not None and not math.isnan(nodata) and _representable(selected.dtype, nodata):
        not_nodata = ~(selected == selected.dtype.type(nodata)).all(axis=2)
        known = not_nodata if known is None else known & not_nodata
    return np.broadcast_to(np.True_, selected.shape[:2]) if known is None else known


def _representable(dtype: np.dtype, value: float) -> bool:
    if dtype.kind in "ui":
        info = np.iinfo(dtype)
        return float(value).is_integer() and info.min <= value <= info.max
    return True


def _row_steps(shape) -> int:
    h, w = shape[:2]
    per_row = max(1, w * (shape[2] if len(shape) > 2 else 1) * 8)
    return max(1, _ROWS_BYTES // per_row)


def to_uint8(native: np.ndarray, r: Radiometry) -> tuple[np.ndarray, np.ndarray]:
    """native (h, w) or (h, w, bands), any dtype -> (uint8 (h, w, 3), bool (h, w) known).

    8-bit data with the range 0..255 is taken as it is (8-bit RGB: ``native`` itself, not a copy).
    Otherwise each value is mapped by
    ``round((v - low) * 255 / (high - low))`` (halves up), clipped to 0..255, in float64, value by
    value: a window of an image maps exactly as the same pixels of the whole image do. Missing
    pixels (NaN, inf, nodata in every band) are 0. ``known`` is read-only when every pixel is
    known by construction (`known_mask`).
    """
    sel = select_bands(native, r.bands)
    known = known_mask(sel, r.nodata)
    h, w, k = sel.shape
    out = np.empty((h, w, 3), np.uint8)
    if sel.dtype == np.uint8 and (r.low, r.high) == (0, 255):
        if sel.shape == native.shape == (h, w, 3) and native.flags.c_contiguous:
            return native, known  # 8-bit RGB as it is: no copy of a large image
        out[...] = sel  # one band broadcasts to the three channels
        return out, known
    span = r.high - r.low
    step = _row_steps(sel.shape)
    for y in range(0, h, step):
        v = sel[y : y + step].astype(np.float64)
        # (v - low) * 255 / span, in this order: exact halves (100 of 0..200 is 127.5, rounded up).
        x = (v - r.low) * 255.0 / span + 0.5 if span > 0 else np.where(v > r.low, 255.0, 0.0)
        np.clip(x, 0, 255, out=x)
        x[~np.isfinite(x)] = 0
        out[y : y + step] = np.floor(x).astype(np.uint8)
    if r.nodata is not None or sel.dtype.kind == "f":
        out[~known] = 0
    return out, known


# -- the histogram ----------------------------------------------------------------------------


def _float_keys(v: np.ndarray) -> np.ndarray:
    """Order-preserving uint32 keys of float32 values: a < b <=> key(a) < key(b) (NaN excluded)."""
    u = v.view(np.uint32)
    return np.where(u & np.uint32(0x80000000), ~u, u | np.uint32(0x80000000))


def _key_floats(keys: np.ndarray) -> np.ndarray:
    """The float32 values (as float64) of uint32 keys (`_float_keys` inverted)."""
    k = keys.astype(np.uint32)
    u = np.where(k & np.uint32(0x80000000), k & np.uint32(0x7FFFFFFF), ~k)
    return u.view(np.float32).astype(np.float64)


def _scheme(dtype: np.dtype) -> tuple[str, int, int]:
    """(kind, bins, offset): 'int' one bin per value of an 8/16-bit integer (value = bin - offset),
    or 'float' 2^20 bins over float32 keys."""
    dtype = np.dtype(dtype)
    if dtype.kind in "ui" and dtype.itemsize <= 2:
        bits = 8 * dtype.itemsize
        return "int", 1 << bits, (1 << (bits - 1)) if dtype.kind == "i" else 0
    if dtype.kind in "uif":
        return "float", 1 << (32 - _FLOAT_SHIFT), 0
    raise ValueError(f"unsupported pixel type {dtype}")


@dataclass
class Histogram:
    """Integer counts of an image's known values over the bands used (see the module's note on
    bins). ``add`` a whole image or its windows (each pixel once), ``merge`` other processes'."""

    dtype: np.dtype
    bands: tuple[int, ...] | None = None
    nodata: float | None = None
    counts: np.ndarray = field(default=None, repr=False)  # int64 per bin

    def __post_init__(self) -> None:
        self.dtype = np.dtype(self.dtype)
        kind, bins, self._offset = _scheme(self.dtype)
        self._float = kind == "float"
        if self.counts is None:
            self.counts = np.zeros(bins, np.int64)
        elif self.counts.shape != (bins,):
            raise ValueError(f"counts of {self.counts.shape} for {bins} bins")

    def _bins(self, values: np.ndarray) -> np.ndarray:
        if self._float:
            v = values.astype(np.float64) if values.dtype.itemsize > 4 or values.dtype.kind != "f" else values
            v = np.clip(v, -np.finfo(np.float32).max, np.finfo(np.float32).max).astype(np.float32)
            return (_float_keys(v) >> np.uint32(_FLOAT_SHIFT)).astype(np.intp)
        return values.astype(np.intp) + self._offset

    def add(self, native: np.ndarray, missing: np.ndarray | None = None) -> "Histogram":
        """Count the known values of ``native`` ((h, w) or (h, w, bands), this histogram's dtype) over
        the bands used; ``missing`` (bool (h, w), e.g. alpha = 0 or a sidecar mask) are not counted."""
        if native.dtype != self.dtype:
            raise ValueError(f"a {native.dtype} window into a {self.dtype} histogram")
        sel = select_bands(native, self.bands)
        step = _row_steps(sel.shape)
        for y in range(0, sel.shape[0], step):
            rows = sel[y : y + step]
            known = known_mask(rows, self.nodata)
            if missing is not None:
                known = known & ~missing[y : y + step]
            values = rows if known.all() else rows[known]  # (.., k): no copy when every pixel counts
            if values.size:
                self.counts += np.bincount(self._bins(values.ravel()), minlength=len(self.counts))
        return self

    def merge(self, other: "Histogram") -> "Histogram":
        if other.dtype != self.dtype or other.counts.shape != self.counts.shape:
            raise ValueError("histograms of different dtypes")
        self.counts += other.counts
        return self

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def _low_values(self, b: np.ndarray) -> np.ndarray:
        if self._float:
            return _key_floats(b.astype(np.uint64) << np.uint64(_FLOAT_SHIFT))
        return (b - self._offset).astype(np.float64)

    def _high_values(self, b: np.ndarray) -> np.ndarray:
        if self._float:
            return _key_floats((b.astype(np.uint64) << np.uint64(_FLOAT_SHIFT)) | np.uint64((1 << _FLOAT_SHIFT) - 1))
        return (b - self._offset).astype(np.float64)

    def range(self, percentiles: tuple[float, float] = AUTO_PERCENTILES) -> tuple[float, float] | None:
        """(low, high): the values of ranks floor(p_low% * (n-1)) and ceil(p_high% * (n-1)) of the n
        known values (bin edges for floats); None when nothing is known."""
        n = self.total
        if n == 0:
            return None
        cum = np.cumsum(self.counts)
        k_lo = math.floor(percentiles[0] / 100 * (n - 1))
        k_hi = math.ceil(percentiles[1] / 100 * (n - 1))
        b_lo = int(np.searchsorted(cum, k_lo, side="right"))
        b_hi = int(np.searchsorted(cum, k_hi, side="right"))
        return float(self._low_values(np.array([b_lo]))[0]), float(self._high_values(np.array([b_hi]))[0])

    def outside(self, low: float, high: float) -> int:
        """Known values below ``low`` or above ``high`` (by bin for floats)."""
        b = np.nonzero(self.counts)[0]
        lows, highs = self._low_values(b), self._high_values(b)
        return int(self.counts[b][(highs < low) | (lows > high)].sum())

    def levels(self, low: float, high: float) -> tuple[int, int]:
        """(distinct values, distinct uint8 levels they map to), by bin for floats."""
        b = np.nonzero(self.counts)[0]
        if not len(b):
            return 0, 0
        vals = self._low_values(b)
        span = high - low
        if span > 0:
            lv = np.floor(np.clip((vals - low) * 255.0 / span + 0.5, 0, 255))
        else:
            lv = np.where(vals > low, 255.0, 0.0)
        return len(b), len(np.unique(lv))


def needs_histogram(dtype: np.dtype, spec: RadiometrySpec) -> bool:
    """Whether `finish` wants a histogram: for the auto range of non-8-bit data, and for the
    clipping and collapse warnings of any data but 8-bit taken as it is."""
    return not (np.dtype(dtype) == np.uint8 and spec.input_range is None)


def _fmt(v: float) -> str:
    return f"{v:.6g}"


def finish(spec: RadiometrySpec, *, dtype: np.dtype, n_bands: int, histogram: Histogram | None,
           file_nodata: float | None = None) -> tuple[Radiometry, dict[str, Any]]:
    """One image's `Radiometry` and its report note (``dtype``, ``bands`` used of ``band_count``,
    ``range``, ``range_from``, ``nodata``, ``warnings``) from the user's ``spec`` and the
    image's histogram (`needs_histogram`; built with the bands and nodata `histogram_for` gives).
    ValueError naming the flag when ``--bands`` asks for a band the image lacks."""
    dtype = np.dtype(dtype)
    bands = spec.bands or default_bands(n_bands)
    if max(bands) > n_bands:
        raise ValueError(f"--bands {','.join(map(str, bands))}: the image has {n_bands} band{'s' * (n_bands > 1)}")
    nodata = spec.nodata if spec.nodata is not None else file_nodata
    warnings: list[str] = []
    if spec.bands is None and n_bands > len(bands):
        unused = [b for b in range(1, n_bands + 1) if b not in bands]
        use = "band 1 as grey" if len(bands) == 1 else "bands 1,2,3 as R,G,B"
        warnings.append(f"{n_bands} bands: using {use}; band{'s' * (len(unused) > 1)} "
                        f"{','.join(map(str, unused))} unused (--bands picks others, e.g. --bands "
                        f"{'4,3,2' if n_bands >= 4 else '2'})")
    if spec.input_range is not None:
        low, high = spec.input_range
        source = "--input-range"
    elif dtype == np.uint8:
        low, high = 0.0, 255.0
        source = "8-bit as is"
    else:
        found = histogram.range() if histogram is not None else None
        source = f"auto {AUTO_PERCENTILES[0]:g}-{AUTO_PERCENTILES[1]:g}%"
        if found is None:
            low, high = 0.0, 1.0
            warnings.append("no known pixel: nothing to take a range from")
        else:
            low, high = found
    if histogram is not None and histogram.total:
        n = histogram.total
        out = histogram.outside(low, high)
        if out > CLIP_WARN * n:
            warnings.append(f"clips: {100 * out / n:.1f}% of the known values lie outside the range "
                            f"{_fmt(low)}..{_fmt(high)} (--input-range sets it; auto takes the "
                            f"{AUTO_PERCENTILES[0]:g}-{AUTO_PERCENTILES[1]:g}% percentiles)")
        distinct, levels = histogram.levels(low, high)
        if high <= low:
            warnings.append(f"collapses: every known value is {_fmt(low)}: the image is one level")
        elif levels < COLLAPSE_LEVELS and distinct > levels:
            warnings.append(f"collapses: {distinct} distinct values map onto {levels} of 256 levels in the range "
                            f"{_fmt(low)}..{_fmt(high)} (--input-range auto stretches to the data)")
    note = {"dtype": str(dtype), "band_count": n_bands, "bands": list(bands), "range": [low, high],
            "range_from": source, "nodata": nodata, "warnings": warnings}
    return Radiometry(tuple(bands), low, high, nodata), note


def histogram_for(spec: RadiometrySpec, *, dtype: np.dtype, n_bands: int,
                  file_nodata: float | None = None) -> Histogram:
    """An empty `Histogram` for one image: its dtype, the bands `finish` will use, the nodata."""
    bands = spec.bands or default_bands(n_bands)
    return Histogram(dtype, bands=bands, nodata=spec.nodata if spec.nodata is not None else file_nodata)


def resolve(spec: RadiometrySpec, native: np.ndarray, *, missing: np.ndarray | None = None,
            file_nodata: float | None = None) -> tuple[Radiometry, dict[str, Any]]:
    """`finish` for a whole decoded image: its histogram over every known pixel (not ``missing``)."""
    n_bands = _n_bands(native)
    hist = None
    if needs_histogram(native.dtype, spec):
        bands = spec.bands or default_bands(n_bands)
        if max(bands) <= n_bands:  # else finish names the flag
            hist = histogram_for(spec, dtype=native.dtype, n_bands=n_bands, file_nodata=file_nodata)
            hist.add(native, missing)
    return finish(spec, dtype=native.dtype, n_bands=n_bands, histogram=hist, file_nodata=file_nodata)
