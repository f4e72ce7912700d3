"""Part stores: a spread image's finished chunks on a filesystem every process of the job sees.

On the data road plan -> claim -> compute -> assemble -> write, a part store holds what
lies between compute and assemble for an image whose tiles many processes compute
(`owners`). Each process writes the chunks it computed straight beside the output; the
image's finishing process assembles them, encodes and writes the image, then removes the
store. Nothing of it passes through rank 0 or the c10d store.

Layout: ``OUTPUT/.tilerun-parts/<id>/`` (``id``: a hash of the input's key; the hidden
name keeps it out of input listings) holding

* ``meta.json``: the format and the *digest* that binds the store to one job's plan for
  one input (`part_digest`: the settings fingerprint, the input's identity, its size and
  the chunk layout). A store whose digest differs was made by another job, other settings
  or another version of the input: it is discarded with a message, never trusted.
* ``p1-c<k>.part``: pass 1's partial sums of chunk k (float64 rows), kept so that a rerun
  skips pass 1 of the image when all of them are there;
* ``p2-c<k>.part``: pass 2's uint8 cores of chunk k (the wire format of `transport`).

Every file is written to a hidden temporary name in the same folder and renamed into
place, so a chunk is either whole or absent: a SIGKILL of one process or of the whole job
leaves the finished chunks for the rerun (tile-level resume), and `inventory` says which
they are. No fsync per chunk: a killed process's writes are in the page cache and survive
it; after a power loss a short file is caught by its length check and recomputed.

Chunk files, not one preallocated tiled file (np.memmap): on NFS two clients writing
neighbouring bytes of one file can overwrite each other's pages (the client writes whole
pages, and close-to-open consistency says nothing of concurrent writers), while
whole-file renames are atomic on every shared filesystem. They are faster too, on one
node's disk: 8192^2 of cores at tile 512 written by 4 processes, 0.64 s for chunk files vs
2.11 s for a memmap (page faults on a sparse file), assembled by one in 0.54 vs 0.92 s
(`python bench/part_store_layout.py`, best of 3).

Shared or not (`shared_output`): rank 0 writes a random token into OUTPUT and every rank
must read it back; otherwise the cores go over the process group (`transport`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import secrets
import shutil
import struct
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .errors import TilerunError
from .transport import pack, unpack

__all__ = ["PARTS_DIR", "PartStore", "PartStoreError", "part_digest", "shared_output"]

log = logging.getLogger("tilerun")

PARTS_DIR = ".tilerun-parts"
# /2: pass 1 chunks carry their context cell sums compressed (`work._pass1_payload`).
_FORMAT = "tilerun.parts/2"
_META = "meta.json"
_TEMP_SUFFIX = ".tmp"


class PartStoreError(TilerunError, RuntimeError):
    """A part store is missing or belongs to another job (a process opened it before its finisher prepared it)."""


def part_digest(*, fingerprint: str, key: str, identity: Any, height: int, width: int,
                chunks: dict[int, list[list[int]]]) -> str:
    """What a part store's chunks were computed for: settings, input, size and chunk layout.

    ``identity``: the input's identity (`resume.identity`: size and mtime of the input and its
    mask); ``chunks``: pass -> chunks of tile indices, as the plan cut them.
    """
    doc = {"fingerprint": fingerprint, "key": key, "identity": identity, "size": [height, width],
           "chunks": {str(p): c for p, c in sorted(chunks.items())}}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def _image_id(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:24]


def _name(pass_: int, chunk: int) -> str:
    return f"p{pass_}-c{chunk}.part"


def _write_atomic(path: Path, chunks: Iterable[bytes | bytearray | memoryview]) -> int:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_TEMP_SUFFIX, dir=path.parent)
    n = 0
    try:
        with os.fdopen(fd, "wb") as f:
            for c in chunks:
                f.write(c)
                n += len(c)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return n


class PartStore:
    """One spread image's part store. `prepare` it once (its finisher, or rank 0, before any
    claim), `open` it from every other process, `put` chunks, `inventory`, `get`, `remove`."""

    def __init__(self, folder: Path, digest: str) -> None:
        self.folder, self.digest = Path(folder), digest
        self.bytes_written = 0

    @staticmethod
    def folder_for(out_dir: str | os.PathLike, key: str) -> Path:
        return Path(out_dir) / PARTS_DIR / _image_id(key)

    @classmethod
    def prepare(cls, out_dir: str | os.PathLike, key: str, *, digest: str) -> "PartStore":
        """The store of input ``key``, kept if an earlier run of this same plan left it (its
        chunks are reused), else discarded and made anew. Call it while no process writes into it."""
        folder = cls.folder_for(out_dir, key)
        store = cls(folder, digest)
        if folder.exists():
            reason = store._mismatch(key)
            if reason is None:
                for tmp in folder.glob(f".*{_TEMP_SUFFIX}"):  # a killed writer's
                    tmp.unlink(missing_ok=True)
                done = store.inventory()
                if any(done.values()):
                    log.info("%s: resuming from %s (%s chunks of pass 2, %s of pass 1 kept)", key, folder,
                             len(done.get(2, ())), len(done.get(1, ())))
                return store
            log.warning("%s: discarding the part store %s: %s", key, folder, reason)
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        _write_atomic(folder / _META, [json.dumps({"format": _FORMAT, "key": key, "digest": digest}).encode()])
        return store

    @classmethod
    def open(cls, out_dir: str | os.PathLike, key: str, *, digest: str) -> "PartStore":
        """The store `prepare` made for this plan; PartStoreError if it is absent or another job's."""
        store = cls(cls.folder_for(out_dir, key), digest)
        reason = store._mismatch(key)
        if reason is not None:
            raise PartStoreError(f"{key}: part store {store.folder}: {reason}")
        return store

    def _mismatch(self, key: str) -> str | None:
        """None when the store's meta file names this input and this digest; else why not."""
        try:
            meta = json.loads((self.folder / _META).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return "it has no meta file (not made by this version of tilerun, or cut short)"
        except (OSError, ValueError) as e:
            return f"its meta file is unreadable ({e})"
        if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
            return f"unknown format {meta.get('format') if isinstance(meta, dict) else meta!r}"
        if meta.get("key") != key:
            return f"it belongs to another input ({meta.get('key')!r})"
        if meta.get("digest") != self.digest:
            return "it was made by another job (other settings, another version of the input, or another tiling)"
        return None

    def put(self, pass_: int, chunk: int, header: dict, arrays=()) -> int:
        """Write one chunk's results (atomically); its size in bytes."""
        n = _write_atomic(self.folder / _name(pass_, chunk), [pack(header, arrays)])
        self.bytes_written += n
        return n

    def get(self, pass_: int, chunk: int) -> tuple[dict, list[np.ndarray]]:
        """One chunk's header and arrays (views of one buffer read from the file)."""
        path = self.folder / _name(pass_, chunk)
        data = bytearray(path.stat().st_size)
        with open(path, "rb", buffering=0) as f:
            f.readinto(data)
        return unpack(data)

    def inventory(self) -> dict[int, set[int]]:
        """Pass -> the chunks whose files are complete (a short file, cut by a crash, is not)."""
        done: dict[int, set[int]] = {}
        try:
            names = os.listdir(self.folder)
        except FileNotFoundError:
            return done
        for name in names:
            if name.startswith(".") or not name.endswith(".part"):
                continue
            try:
                p, c = name[: -len(".part")].split("-")
                pass_, chunk = int(p[1:]), int(c[1:])
            except ValueError:
                continue
            if self._complete(self.folder / name):
                done.setdefault(pass_, set()).add(chunk)
        return done

    @staticmethod
    def _complete(path: Path) -> bool:
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                (n,) = struct.unpack("<I", f.read(4))
                header = json.loads(f.read(n))
            need = 4 + n + sum(int(np.prod(s)) * np.dtype(d).itemsize for d, s in header["arrays"])
        except (OSError, ValueError, KeyError, TypeError, struct.error):
            return False
        return size == need

    @staticmethod
    def sweep(out_dir: str | os.PathLike, keep: Iterable[str]) -> int:
        """Remove the part stores in OUTPUT of every input but those keyed in ``keep`` (an earlier
        run's, whose images are now written, or no longer spread); their count. Call it while no
        process writes into them."""
        root = Path(out_dir) / PARTS_DIR
        if not root.is_dir():
            return 0
        wanted = {_image_id(k) for k in keep}
        removed = 0
        for folder in root.iterdir():
            if folder.name not in wanted:
                shutil.rmtree(folder, ignore_errors=True)
                removed += 1
        if removed:
            log.info("removed %d part store%s an earlier run left in %s", removed, "s" * (removed > 1), root)
        try:
            root.rmdir()
        except OSError:
            pass
        return removed

    def remove(self) -> None:
        """Delete the store (its image is written), and the parts folder once empty."""
        shutil.rmtree(self.folder, ignore_errors=True)
        try:
            self.folder.parent.rmdir()
        except OSError:  # other images' stores still there
            pass


_SHARED_KEY = "sharedfs"
_ROUNDS = itertools.count()  # every rank calls in the same order: the n-th call's keys are the n-th's
#: How long a rank keeps looking for rank 0's token before it says OUTPUT is not shared. A
#: wrong "not shared" costs only speed (the cores go over the network); a wrong "shared" is
#: impossible (the token must be read back).
SHARED_WAIT_S = 0.5


def shared_output(ctx, out_dir: str | os.PathLike, *, override: bool | None = None) -> bool:
    """Whether every process of the job sees the same OUTPUT folder (the same answer on every rank).

    ``override``: `--shared-output` (True) / `--no-shared-output` (False) skip the test. One
    process: True. Else rank 0 writes a random token file into OUTPUT, every rank reads it
    back and says what it saw through the store, and all must have seen it. Collective: every
    rank calls it once, at the same point of the job.
    """
    if override is not None:
        return override
    if not ctx.distributed:
        return True
    store = ctx.store_client()
    out = Path(out_dir)
    prefix = f"{_SHARED_KEY}/{next(_ROUNDS)}"
    if ctx.rank == 0:
        token = secrets.token_hex(16)
        out.mkdir(parents=True, exist_ok=True)
        _write_atomic(out / f".tilerun-shared-{token}", [token.encode()])
        store.set(f"{prefix}/token", token)
    else:
        ctx.wait(store, [f"{prefix}/token"], ranks=[0])
        token = store.get(f"{prefix}/token").decode()
    path = out / f".tilerun-shared-{token}"
    deadline = time.monotonic() + SHARED_WAIT_S
    while True:
        try:
            seen = path.read_text() == token
        except OSError:
            seen = False
        if seen or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    store.set(f"{prefix}/seen/{ctx.rank}", "1" if seen else "0")
    keys = [f"{prefix}/seen/{r}" for r in range(ctx.world_size)]
    ctx.wait(store, keys)
    shared = all(store.get(k) == b"1" for k in keys)
    if ctx.rank == 0:
        path.unlink(missing_ok=True)  # every rank has looked
    return shared
