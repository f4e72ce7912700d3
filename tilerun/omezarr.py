"""OME-Zarr outputs (`run --format ome-zarr`, NGFF 0.4): written chunk by chunk, never full size.

One folder per input, ``NAME.inpainted.ome.zarr``:

* the inpainted image as a multiscale image (axes c, y, x; level 0 at ``0/``, each next
  level half the size, 2x2 means rounded, down to one chunk);
* the class map as a label image ``labels/pred`` (levels by nearest neighbour, so every
  level's values are classes), its palette as ``image-label.colors``.

How it shares the scale-out machinery. A spread image's cores already travel one road to
their finisher (`parts` part stores on a shared OUTPUT, `transport` otherwise) and are
placed by `assemble.Canvas.add`, which writes ``canvas.classes[y0:y1, x0:x1] = core``.
`OmeZarrCanvas` is that same Canvas with zarr arrays in place of the two full-size numpy
arrays: every core goes from the wire format straight into the zarr chunks it covers, so
a whole image and a spread one reach disk through the same code, and the only full-size
thing is the folder on disk. The part store stays what it is (the transit, with
tile-level resume); no second chunk writer was needed for the pixels. Chunks are `CHUNK`
pixels a side; cores that do not line up with them (balanced tile cuts) are merged by
zarr into the chunks they touch, one core at a time (a Canvas is filled by one thread).

Written into a hidden temporary folder beside the output (``.NAME...tmp``, the naming
`images.remove_stale_temps` knows), renamed into place once its pyramid and metadata are
written: a folder at the output's name is always complete. The resume stamp
(`images.read_output_text`) is the ``tilerun`` entry of both groups' attributes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .assemble import Canvas
from .geometry import Tile

__all__ = ["SUFFIX", "CHUNK", "OmeZarrCanvas", "Plane", "finish", "read_text"]

SUFFIX = ".inpainted.ome.zarr"
LABEL = "pred"
#: Chunk side of the arrays written (napari and QuPath fetch a view's region by chunks).
CHUNK = 512
_KEYS = {"name": "v2", "separator": "/"}  # NGFF 0.4 stores chunks as c/y/x files


def _zarr():
    try:
        import zarr
    except ImportError as e:  # the optional extra
        raise RuntimeError("--format ome-zarr needs zarr: pip install tilerun[ome]") from e
    return zarr


class Plane:
    """A level-0 array, written by cores: ``plane[y0:y1, x0:x1] = core`` ((h, w) or (h, w, 3))."""

    def __init__(self, canvas: "OmeZarrCanvas", array, channels: bool) -> None:
        self.canvas, self.array, self.channels = canvas, array, channels
        self.written = False

    def __setitem__(self, key, core: np.ndarray) -> None:
        ys, xs = key
        if self.channels:
            self.array[:, ys, xs] = np.moveaxis(core, -1, 0)
        else:
            self.array[ys, xs] = core
        self.written = True


class OmeZarrCanvas(Canvas):
    """`assemble.Canvas` whose outputs are zarr arrays in a temporary folder beside ``path``."""

    def __init__(self, height: int, width: int, tiles: list[Tile], *, path: str | os.PathLike,
                 chunk: int | None = None, mpp: float | None = None) -> None:
        super().__init__(height, width, tiles)
        self.mpp = mpp  # µm per pixel of the level read (`sources`): the y, x scale of level 0
        from .images import _HOST

        zarr = _zarr()
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.{_HOST}-{os.getpid()}-", suffix=".tmp",
                                         dir=self.path.parent))
        self.chunk = chunk = chunk or CHUNK
        root = zarr.open_group(str(self.tmp), mode="w", zarr_format=2)
        c = min(chunk, max(height, width))
        self.rgb = Plane(self, root.create_array("0", shape=(3, height, width), chunks=(3, c, c), dtype="uint8",
                                           fill_value=0, chunk_key_encoding=_KEYS), channels=True)
        labels = root.create_group("labels").create_group(LABEL)
        self.classes = Plane(self, labels.create_array("0", shape=(height, width), chunks=(c, c), dtype="uint8",
                                                 fill_value=0, chunk_key_encoding=_KEYS), channels=False)

    def discard(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def _levels(group, first, *, channels: bool, mean: bool, chunk: int) -> list[str]:
    """Write levels 1.. of ``group`` from level 0 (``first``), region by region; their paths."""
    paths = ["0"]
    prev = first
    while max(prev.shape[-2:]) > chunk:
        h, w = prev.shape[-2:]
        nh, nw = -(-h // 2), -(-w // 2)
        shape = (prev.shape[0], nh, nw) if channels else (nh, nw)
        nxt = group.create_array(str(len(paths)), shape=shape, chunks=prev.chunks, dtype="uint8", fill_value=0,
                                 chunk_key_encoding=_KEYS)
        for y in range(0, nh, chunk):
            for x in range(0, nw, chunk):
                src = np.asarray(prev[..., 2 * y : 2 * (y + chunk), 2 * x : 2 * (x + chunk)])
                if mean:  # 2x2 means; an odd edge row or column stands for itself
                    sh, sw = src.shape[-2:]
                    pad = [(0, 0)] * (src.ndim - 2) + [(0, sh % 2), (0, sw % 2)]
                    s = np.pad(src.astype(np.uint16), pad, mode="edge")
                    s = s[..., 0::2, 0::2] + s[..., 1::2, 0::2] + s[..., 0::2, 1::2] + s[..., 1::2, 1::2]
                    out = ((s + 2) // 4).astype(np.uint8)
                else:
                    out = src[..., 0::2, 0::2]
                nxt[..., y : y + out.shape[-2], x : x + out.shape[-1]] = out
        paths.append(str(len(paths)))
        prev = nxt
    return paths


def _multiscales(name: str, paths: list[str], channels: bool, mpp: float | None) -> list[dict]:
    """NGFF 0.4 multiscales: y and x in µm when the input's pixel size is known, else in pixels."""
    yx = [{"name": a, "type": "space", **({"unit": "micrometer"} if mpp else {})} for a in ("y", "x")]
    axes = [{"name": "c", "type": "channel"}, *yx] if channels else yx
    base = mpp or 1.0
    return [{
        "version": "0.4", "name": name, "axes": axes,
        "datasets": [{"path": p, "coordinateTransformations": [
            {"type": "scale", "scale": [1.0] * channels + [base * 2**i] * 2}]} for i, p in enumerate(paths)],
        "type": "mean" if channels else "nearest",
    }]


def finish(canvas: OmeZarrCanvas, *, palette, text: dict[str, str] | None = None) -> list[str]:
    """Pyramids and metadata, then the rename into place; the output paths written (image, labels)."""
    zarr = _zarr()
    root = zarr.open_group(str(canvas.tmp), mode="r+", zarr_format=2)
    stamp = {"tilerun": dict(text or {})}
    written = []
    try:
        # The image group always carries the multiscales (labels live under an image, NGFF 0.4):
        # a model without an RGB output leaves level 0 at its fill value, without levels.
        paths = _levels(root, root["0"], channels=True, mean=True, chunk=canvas.chunk) if canvas.rgb.written else ["0"]
        root.attrs.update({"multiscales": _multiscales(canvas.path.name, paths, True, canvas.mpp),
                           "omero": {"version": "0.4", "channels": [
                               {"label": c, "color": col, "window": {"start": 0, "end": 255, "min": 0, "max": 255},
                                "active": True} for c, col in (("R", "FF0000"), ("G", "00FF00"), ("B", "0000FF"))],
                               "rdefs": {"model": "color"}}, **stamp})
        labels = root["labels"]
        if canvas.classes.written:
            label = labels[LABEL]
            lpaths = _levels(label, label["0"], channels=False, mean=False, chunk=canvas.chunk)
            colors = [{"label-value": i, "rgba": [int(r), int(g), int(b), 255]}
                      for i, (r, g, b) in enumerate(palette or [])]
            label.attrs.update({"multiscales": _multiscales(LABEL, lpaths, False, canvas.mpp),
                                "image-label": {"version": "0.4", "colors": colors,
                                                "source": {"image": "../../"}}, **stamp})
            labels.attrs["labels"] = [LABEL]
            written.append(str(canvas.path / "labels" / LABEL))
        else:
            shutil.rmtree(canvas.tmp / "labels")
        if canvas.rgb.written:
            written.insert(0, str(canvas.path))
        if canvas.path.exists():  # an earlier run's output (--overwrite, or a redo)
            shutil.rmtree(canvas.path)
        os.replace(canvas.tmp, canvas.path)
    except BaseException:
        canvas.discard()
        raise
    return written


def read_text(path: str | os.PathLike, key: str) -> str | None:
    """A ``tilerun`` text entry of an OME-Zarr group written here (its ``.zattrs``); None if absent."""
    try:
        attrs = json.loads((Path(path) / ".zattrs").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    value = attrs.get("tilerun", {}).get(key) if isinstance(attrs, dict) else None
    return value if isinstance(value, str) else None
