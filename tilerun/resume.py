"""Resume: which inputs still need work, decided from what is already in OUTPUT.

Three records in OUTPUT:

* ``OUTPUT/.tilerun.lock`` — one job per OUTPUT (`OutputLock`): the job's writer holds an
  exclusive ``flock`` on it from before it reads the manifest until its last output and
  temp cleanup, and writes its host, pid and start time into it. A second job refuses
  (`OutputBusyError`, exit 2) naming the first. The kernel drops the lock when the holder
  exits, killed or not, so there is nothing stale to remove by hand. (Over NFS, Linux
  maps ``flock`` to the server's byte-range locks: it holds across nodes where lockd runs.)
* ``OUTPUT/tilerun-manifest.json`` — the job's **fingerprint**: what makes output bytes.
  It claims the folder: a run with another fingerprint refuses (`OutputExistsError`,
  exit 2) unless ``--overwrite``, which rewrites it first. Checked and written under the
  lock, so two jobs cannot both find the folder free and both claim it.
* A ``tilerun`` text entry in every output (a PNG text chunk; in a TIFF, a key of the JSON
  object in its ImageDescription) — the fingerprint digest, the input's identity and its
  sidecar mask's, the input's path, and the list of outputs written for that input.
  An input is done when every listed output exists and carries the current digest and
  the input (and mask) are unchanged since. Outputs are renamed into place whole, so an
  output that exists is complete; a job killed between an input's two outputs redoes
  that input. An output made from *another* file at another path
  (a second job's same-named input aimed at this OUTPUT) is refused, not replaced; a
  moved input folder (same files) resumes.

**Input identity** (`identity`): size, mtime and a sampled content digest
(`content_digest`: SHA-256 of the first, middle and last MiB and 16 evenly spaced 64 KiB
blocks; at most 4 MiB read per file whatever its size, the whole file when smaller).
Size and mtime alone miss a replaced file of the same size whose mtime was kept (``cp -p``,
``rsync -a``, ``tar`` keep mtimes); the samples catch it unless the two files agree in
every sampled block, e.g. a few pixels edited in the middle of an uncompressed TIFF.
``--verify-inputs`` also hashes every input and mask whole (`content_digest` with
``full``) and records it: an input then counts as done only when its whole content
matches what a ``--verify-inputs`` run processed (outputs of a run without it are redone).

What the fingerprint holds, and why:

* ``model``: the model's weights and buffers (SHA-256 over the state dict), class,
  architecture config and palette, and the source of the modules defining its layers'
  classes (outside torch and tilerun; `model_digest`);
* ``model_file``: what the model was loaded from (`tilerun.model.model_source_identity`,
  set by `load_model`): a TorchScript or ``.pt2`` file's bytes, which hold its code as
  well as its weights (two files with the same weights and another ``forward`` differ),
  or an import path's spec and factory module source. None for tilerun's own TileNet,
  which ``model`` and ``code`` describe whole;
* ``code``: the source of tilerun's modules that compute output bytes (`PIXEL_CODE`);
  any edit counts, comments included: cheaper to redo than to argue which edits matter;
* ``receptive``: the measured halo and stride (``engine.probe``), which place every
  tile's window;
* the halo and tile **only when the halo is below the measured receptive field**. With
  the exact (default or larger) halo, tiling reproduces the whole-image forward, so
  ``--tile``, ``--batch-size`` and ``--device`` only move float rounding (class ties,
  ±1 grey level, the tolerance the engine promises): rerunning on a GPU with a bigger
  tile resumes instead of redoing everything. With a too-small halo the seams move
  with the tile size, so both are recorded;
* the precision, when not fp32 (autocast moves more than float ties).

An OUTPUT whose manifest predates this list (``tilerun.manifest/1``) is refused:
its outputs' code is unknown, so only ``--overwrite`` can vouch for them.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import logging
import os
import socket
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from PIL import Image

from .errors import OutputBusyError, OutputExistsError
from .images import InputItem, _fsync_dir, plan_outputs, read_output_text, sidecar_mask_path

__all__ = [
    "LOCK_NAME",
    "MANIFEST_NAME",
    "PIXEL_CODE",
    "STAMP_KEY",
    "Fingerprint",
    "Manifest",
    "OutputLock",
    "OutputPlan",
    "code_digest",
    "content_digest",
    "sample_spans",
    "fingerprint",
    "identity",
    "model_digest",
    "prepare_outputs",
    "write_json_atomic",
]

log = logging.getLogger("tilerun")

MANIFEST_NAME = "tilerun-manifest.json"
LOCK_NAME = ".tilerun.lock"
STAMP_KEY = "tilerun"
_FORMAT = "tilerun.manifest/2"
_OLD_FORMAT = "tilerun.manifest/1"  # without the code: refused (see the module docstring)

#: tilerun's modules on the path from input file to output bytes, whose source the
#: fingerprint holds: decoding (images, radiometry, tiff), tiling and the forward (geometry, engine,
#: channels' argmax), the global sums and stitching (scheduler), TileNet and its weights'
#: loading and the foreign-model wrappers (model/), and the encoders (png, tiff; georef's tags). Not:
#: cli, options, progress, report, dist (orchestration and messages), runner (passes the
#: arrays to the encoders), receptive (its result, the measured halo, is recorded
#: itself), resume (bookkeeping), preview, inspect, train, masks.
PIXEL_CODE = ("images.py", "radiometry.py", "tiff.py", "geometry.py", "engine.py", "channels.py", "scheduler.py",
              "png.py", "georef.py", "model/net.py", "model/weights.py", "model/loading.py")


def write_json_atomic(obj: Any, path: str | os.PathLike) -> None:
    """JSON to a hidden temporary file in the same folder, then rename and fsync the folder
    (names stay readable UTF-8)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        data = json.dumps(obj, indent=2, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:  # file names that are not valid UTF-8 (surrogate escapes)
        data = json.dumps(obj, indent=2).encode("ascii")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data + b"\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """SHA-256 over the source of tilerun's `PIXEL_CODE` modules, as installed."""
    root = Path(__file__).parent
    h = hashlib.sha256()
    for rel in PIXEL_CODE:
        h.update(f"\n{rel}\n".encode())
        h.update((root / rel).read_bytes())
    return h.hexdigest()


def _class_sources(model) -> list[str]:
    """Source files of the modules defining ``model``'s layers' classes, outside torch and tilerun
    (TorchScript and exported modules are torch's classes: their code is in the model file)."""
    files = set()
    for m in model.modules():
        name = type(m).__module__
        if name.split(".")[0] in ("torch", "tilerun", "builtins"):
            continue
        file = getattr(sys.modules.get(name), "__file__", None)
        if file:
            files.add(file)
    return sorted(files)


def model_digest(model) -> str:
    """SHA-256 of a module's class, config, palette, every tensor of its state dict (names,
    dtypes, shapes, bytes) and the source of its layers' classes (`_class_sources`)."""
    import torch

    h = hashlib.sha256()
    h.update(f"{type(model).__module__}.{type(model).__qualname__}\n".encode())
    cfg = getattr(model, "cfg", None)
    if cfg is not None and hasattr(cfg, "to_dict"):
        h.update(json.dumps(cfg.to_dict(), sort_keys=True).encode())
    palette = getattr(model, "palette", None)
    if palette is not None:
        h.update(json.dumps([list(c) for c in palette]).encode())  # colours of the class map
    for file in _class_sources(model):
        try:
            h.update(Path(file).read_bytes())
        except OSError:  # gone since import: the name alone
            h.update(file.encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"\n{name} {t.dtype} {tuple(t.shape)}\n".encode())
        # Viewing as bytes works for every dtype, bfloat16 included (numpy has none).
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class Fingerprint:
    """What makes output bytes; see the module docstring."""

    settings: Mapping[str, Any]

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(dict(self.settings), sort_keys=True).encode()).hexdigest()[:32]

    def differences(self, other: Mapping[str, Any]) -> list[str]:
        """What differs from the recorded ``other``, in words: ``["model differs", "--halo 4, was exact"]``."""
        out = []
        for k in sorted(set(self.settings) | set(other)):
            now, was = self.settings.get(k), other.get(k)
            if now == was:
                continue
            if k in ("model", "model_file"):
                if "model differs" not in out:
                    out.append("model differs")
            elif k == "code":
                out.append("tilerun's code differs (another version, or an edited install)")
            elif k == "receptive":
                out.append(f"measured halo and stride {now}, were {was}")
            elif k in ("halo", "tile"):  # recorded only when the halo is below the measured one
                out.append(f"--{k} {'exact' if now is None else now}, was {'exact' if was is None else was}")
            else:
                out.append(f"{k} {now}, was {was}")
        return out


def fingerprint(*, model, engine) -> Fingerprint:
    """The fingerprint of running ``model`` through ``engine`` (a tilerun `Engine`)."""
    probe = engine.probe
    measured = probe.halo
    # tile 0 (whole image per forward) is exact whatever the halo.
    exact = engine.tile == 0 or (measured is not None and engine.halo >= measured)
    settings: dict[str, Any] = {
        "code": code_digest(),
        "model": model_digest(model),
        "model_file": getattr(model, "tilerun_identity", None),
        "receptive": [measured, probe.stride],
    }
    if not exact:
        settings["halo"] = engine.halo
        settings["tile"] = engine.tile
    if getattr(engine, "precision", "fp32") != "fp32":  # reduced precision moves more than float ties
        settings["precision"] = engine.precision
    from .images import radiometry_spec

    if not (spec := radiometry_spec()).is_default:  # --input-range, --bands, --nodata
        settings["radiometry"] = spec.to_json()

    from .sources import LevelChoice, current_level

    if current_level() != LevelChoice():  # another pyramid level: other pixels (`run --level`, `--mpp`)
        settings["level"] = [current_level().level, current_level().mpp]
    return Fingerprint(settings)


# -- inputs ----------------------------------------------------------------------------

_MIB = 2**20
_SAMPLE = 64 * 2**10
_SAMPLES = 16


def sample_spans(size: int) -> list[tuple[int, int]]:
    """(offset, length) of the blocks `content_digest` reads from a file of ``size`` bytes."""
    if size <= 3 * _MIB + _SAMPLES * _SAMPLE:
        return [(0, size)]
    spans = [(0, _MIB), ((size - _MIB) // 2, _MIB), (size - _MIB, _MIB)]
    return spans + [((size - _SAMPLE) * i // (_SAMPLES - 1), _SAMPLE) for i in range(_SAMPLES)]


def content_digest(path: str | os.PathLike, *, full: bool = False) -> str:
    """SHA-256 of a file's content: sampled (`sample_spans`: the first, middle and last MiB and
    16 evenly spaced 64 KiB blocks; a file of 4 MiB or less whole), or with ``full`` all of it.

    SHA-256 (OpenSSL's, on the CPU's SHA instructions) hashed a 4.8 GB TIFF 2.1x faster than
    BLAKE2b, warm: 13.6 s against 28.9 s; sampled, 10 ms warm, 26 ms cold
    (``python bench/input_digest.py big.tif --make 40000``).
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if full or len(spans := sample_spans(size)) == 1:
            while chunk := f.read(4 * _MIB):
                h.update(chunk)
            return h.hexdigest()
        for offset, length in spans:
            f.seek(offset)
            h.update(f.read(length))
    return h.hexdigest()


def _file_id(path: Path | None, *, full: bool) -> tuple[list | None, str | None]:
    if path is None:
        return None, None
    st = path.stat()
    if stat.S_ISDIR(st.st_mode):  # a zarr input (`sources`): its files' count, bytes and newest mtime
        files = [p.stat() for p in sorted(path.rglob("*")) if p.is_file()]
        return [len(files), sum(f.st_size for f in files), max((f.st_mtime_ns for f in files), default=0)], None
    if not stat.S_ISREG(st.st_mode):  # a FIFO would block the reader forever: the decoder reports it
        raise OSError(f"{path}: not a regular file")
    ident = [st.st_size, st.st_mtime_ns, content_digest(path)]
    return ident, content_digest(path, full=True) if full else None


def identity(item: InputItem, *, mask_dir: str | os.PathLike | None = None, full: bool = False) -> dict[str, Any]:
    """What an output was made from: the input's and its sidecar mask's size, mtime and sampled
    content digest (OSError if gone), where the input was (``source``: to tell another folder's
    same-named input from an edit), and with ``full`` both files' whole-content digests."""
    ident, whole = _file_id(item.path, full=full)
    mask, mask_whole = _file_id(sidecar_mask_path(item, mask_dir), full=full)
    out = {"input": ident, "mask": mask, "source": os.path.abspath(item.path)}
    if full:
        out.update(input_full=whole, mask_full=mask_whole)
    return out


# -- OUTPUT ------------------------------------------------------------------------------


class OutputLock:
    """One job per OUTPUT: an exclusive, non-blocking ``flock`` on ``OUTPUT/.tilerun.lock``,
    held by a job's writer from before it reads the manifest until its last write.

    ``acquire`` raises `OutputBusyError` naming the holder (host, pid, since); ``since`` is
    when this job took the lock, on OUTPUT's filesystem clock (the lock file's mtime), for
    `images.remove_stale_temps`. Where ``fcntl`` is missing (Windows) there is no lock.
    """

    def __init__(self, out_dir: str | os.PathLike) -> None:
        self.path = Path(out_dir) / LOCK_NAME
        self.since: float | None = None
        self._fd: int | None = None

    def acquire(self) -> "OutputLock":
        try:
            import fcntl
        except ImportError:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
            os.close(fd)
            raise OutputBusyError(
                f"{self.path.parent} is in use by another tilerun job ({holder or 'starting'}); "
                "wait for it to finish, or choose another OUTPUT"
            ) from None
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            # A filesystem without locks (some FUSE and NFS mounts without lockd): run, and say so.
            log.warning("cannot lock %s (%s): a second job into this OUTPUT would not be stopped",
                        self.path, e.strerror)
            return self
        started = time.strftime("%Y-%m-%d %H:%M:%S %z")
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"host {socket.gethostname()}, pid {os.getpid()}, since {started}\n".encode(), 0)
            self.since = os.fstat(fd).st_mtime
        except BaseException:  # OUTPUT full: let go of it
            os.close(fd)
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        """Give OUTPUT back (and empty the holder's line, so no one reads a finished job's)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # closing the last descriptor drops the flock

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class Manifest:
    """The fingerprint recorded in OUTPUT and the per-output stamps checked against it."""

    def __init__(self, out_dir: Path, fp: Fingerprint, *, overwrite: bool) -> None:
        self.out_dir, self.fp, self.overwrite = Path(out_dir), fp, overwrite

    @property
    def path(self) -> Path:
        return self.out_dir / MANIFEST_NAME

    @classmethod
    def load(cls, out_dir: str | os.PathLike, fp: Fingerprint, *, overwrite: bool = False) -> "Manifest":
        """Check OUTPUT's recorded fingerprint against ``fp``; OutputExistsError if they differ (no --overwrite).

        Reads only: every process of a job may call it. `claim` writes.
        """
        m = cls(Path(out_dir), fp, overwrite=overwrite)
        if overwrite or not m.path.exists():
            return m
        try:
            recorded = json.loads(m.path.read_text(encoding="utf-8"))
            settings, fmt = recorded["fingerprint"], recorded.get("format")
            if fmt not in (_FORMAT, _OLD_FORMAT) or not isinstance(settings, dict):
                raise ValueError(f"format {fmt!r}")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise OutputExistsError(
                f"{m.path} is unreadable ({e}); rerun with --overwrite to redo every output, or choose another OUTPUT"
            ) from e
        if fmt == _OLD_FORMAT:
            raise OutputExistsError(
                f"{out_dir} holds outputs of an older tilerun, whose manifest does not record the model's code "
                "or tilerun's; rerun with --overwrite to redo them all, or choose another OUTPUT"
            )
        diff = fp.differences(settings)
        if diff:
            raise OutputExistsError(
                f"{out_dir} holds outputs made with other settings ({'; '.join(diff)}); "
                "rerun with --overwrite to redo them all, or choose another OUTPUT"
            )
        return m

    def check_unclaimed(self, paths: Iterable[Path]) -> None:
        """Refuse to replace files in an OUTPUT that no manifest claims (an older run's, or a user's own files)."""
        if self.overwrite or self.path.exists():
            return
        existing = [p for p in paths if os.path.lexists(p)]
        if existing:
            raise OutputExistsError(
                f"{existing[0]} (and {len(existing) - 1} more) exist but {self.out_dir} has no {MANIFEST_NAME} "
                "saying which model made them; rerun with --overwrite to replace them, or choose another OUTPUT"
            )

    def claim(self) -> None:
        """Record this job's fingerprint in OUTPUT (once, by the writer holding `OutputLock`, before any output)."""
        write_json_atomic({"format": _FORMAT, "digest": self.fp.digest, "fingerprint": dict(self.fp.settings)}, self.path)

    def stamp(self, ident: Mapping[str, Any], kinds: Iterable[str]) -> str:
        """The text chunk for one input's outputs: digest, what they were made from, which outputs were written."""
        return json.dumps({"digest": self.fp.digest, **ident, "outputs": sorted(kinds)}, sort_keys=True)

    @staticmethod
    def _stamps(paths: Mapping[str, Path]) -> dict[str, Any] | None:
        """The parsed stamps of the outputs at ``paths`` (None if one is unreadable)."""
        stamps = {}
        for kind, path in paths.items():
            raw = read_output_text(path, STAMP_KEY)
            if raw is not None:
                try:
                    stamps[kind] = json.loads(raw)
                except ValueError:
                    return None
        return stamps

    def made_from_elsewhere(self, ident: Mapping[str, Any], paths: Mapping[str, Path]) -> str | None:
        """The other input an existing output at ``paths`` was made from, if it was not this one.

        Another file (size, mtime or content differ) at another path: a second job's same-named
        input writing into this OUTPUT, which would silently replace the first job's results.
        """
        if self.overwrite:
            return None
        for got in (self._stamps(paths) or {}).values():
            if not isinstance(got, dict) or not got.get("source"):
                continue
            if got["source"] != ident.get("source") and got.get("input") != ident.get("input"):
                return str(got["source"])
        return None

    def needs_run(self, ident: Mapping[str, Any], paths: Mapping[str, Path]) -> bool:
        """False when the outputs at ``paths`` are complete, made with this fingerprint from the input ``ident`` names."""
        if self.overwrite:
            return True
        stamps = self._stamps(paths)
        if not stamps:
            return True
        # Every field of the identity but ``source``: a moved input folder (same files) resumes.
        want = {"digest": self.fp.digest, **{k: v for k, v in ident.items() if k != "source"}}
        for got in stamps.values():
            if not isinstance(got, dict) or any(got.get(k) != v for k, v in want.items()):
                return True
            # Every output listed when the input was done must still be there (and stamped).
            if any(kind not in stamps for kind in got.get("outputs") or ()):
                return True
        return False


@dataclass
class OutputPlan:
    """Where every input's outputs go and which inputs still need work: decided once, before any write."""

    manifest: Manifest
    paths: dict[str, dict[str, Path]]  # item.key -> kind -> path (the collision rule applied)
    todo: list[InputItem]
    done: list[InputItem]
    identities: dict[str, dict[str, Any]]  # item.key -> identity, taken before the input is read

    def outputs(self, item: InputItem) -> dict[str, Path]:
        return self.paths[item.key]

    def output_text(self, item: InputItem, kinds: Iterable[str]) -> dict[str, str]:
        """The text entries for ``item``'s outputs (`runner.write_outputs`'s ``text_for``)."""
        ident = self.identities.get(item.key)
        return {} if ident is None else {STAMP_KEY: self.manifest.stamp(ident, kinds)}

    def done_info(self, item: InputItem) -> dict[str, Any]:
        """``outputs`` and ``size`` (width, height) of an input resumed from an earlier run, for its report entry."""
        outputs = [p for p in self.paths[item.key].values() if p.exists()]
        size = None
        for p in outputs:
            try:
                with Image.open(p) as im:
                    size = im.size
                break
            except (OSError, SyntaxError, ValueError):
                continue
        return {"outputs": [str(p) for p in outputs], "size": size}

    def all_paths(self) -> list[Path]:
        return [p for kinds in self.paths.values() for p in kinds.values()]


def prepare_outputs(
    items: list[InputItem],
    out_dir: str | os.PathLike,
    *,
    fp: Fingerprint,
    overwrite: bool = False,
    mask_dir: str | os.PathLike | None = None,
    claim: bool = True,
    fmt: str = "png",
    verify_inputs: bool = False,
) -> OutputPlan:
    """Plan outputs, check OUTPUT's fingerprint, and split ``items`` into to-do and already done.

    Raises OutputExistsError (exit 2) when OUTPUT was made with other settings and
    ``overwrite`` is false. ``claim``: write the manifest (the job's writer, holding
    `OutputLock`, so that no other job checks and claims between our check and claim);
    every process may plan and gets the same answer as long as no output of this job has
    been written yet. ``fmt``: the outputs' file format (`images.OUTPUT_FORMATS`).
    ``verify_inputs``: hash inputs and masks whole (`identity`'s ``full``).
    """
    paths = plan_outputs(items, out_dir, fmt=fmt)
    manifest = Manifest.load(out_dir, fp, overwrite=overwrite)
    manifest.check_unclaimed(p for kinds in paths.values() for p in kinds.values())
    todo, done, identities, foreign = [], [], {}, []
    for item in items:
        try:
            identities[item.key] = identity(item, mask_dir=mask_dir, full=verify_inputs)
        except OSError:  # unreadable input or mask: the run reports why
            todo.append(item)
            continue
        other = manifest.made_from_elsewhere(identities[item.key], paths[item.key])
        if other is not None:
            foreign.append((item, other))
        (todo if manifest.needs_run(identities[item.key], paths[item.key]) else done).append(item)
    if foreign:
        item, other = foreign[0]
        more = f" (and {len(foreign) - 1} more inputs)" if len(foreign) > 1 else ""
        raise OutputExistsError(
            f"{item.path}: its outputs in {out_dir} were made from another file, {other}{more}; "
            "rerun with --overwrite to replace them, or choose another OUTPUT"
        )
    if claim:
        manifest.claim()
    return OutputPlan(manifest, paths, todo, done, identities)
