"""One decode of a spread image per node, shared by that node's processes.

A spread image's chunks are computed by many processes, and every one of them needs its
pixels. A PNG or JPEG cannot be read window by window, so each process used to decode the
whole file: on one node of N processes, N decodes of the same image at once, competing
for the same cores before any tile could start (an 8192^2 JPEG: 0.8 s of CPU each; with 4
processes on 2 cores, 3 s of every process's job; python bench/scale_out.py).

Here the first process of a node to need the image (``store.add`` on a per-node key
returns 1) decodes it and writes the pixels and the mask as ``.npy`` files into
``/dev/shm`` (memory, not disk); it then publishes their paths in the c10d store. The
node's other processes wait for that key (`Context.wait`: a decoder that dies is named)
and map the files read-only, so the node holds one copy of the image, not N.

* **Falls back, never fails.** Not enough room in ``/dev/shm``, or files another process
  cannot open (a node that shares a host name but not its memory): the process decodes
  privately, as before. A decode error is published, so every process reports the file's
  reason once, without decoding it again.
* **Freed when done.** The decoder removes its files once every pass-2 chunk of the image
  has been delivered (`release_finished`), and all of them when its job ends; mappings
  already made stay valid after the unlink. A process killed with files in ``/dev/shm``
  leaves them under its host and pid in the name: the next job on that host removes the
  files of processes that no longer run (`remove_stale`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import InputImageError

__all__ = ["NodeDecodes", "remove_stale"]

log = logging.getLogger("tilerun")

SHM = Path("/dev/shm")
_PREFIX = "tilerun-decoded-"
_NAME = re.compile(re.escape(_PREFIX) + r"(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]+-\d+\.(?:image|mask)\.npy$")
#: Room left in the folder beyond the image, so that a full /dev/shm does not starve others.
HEADROOM = 0.1


def _folder() -> Path:
    return SHM if SHM.is_dir() and os.access(SHM, os.W_OK) else Path(tempfile.gettempdir())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(folder: Path | None = None) -> int:
    """Remove the shared decodes that processes of this host left when killed; how many."""
    folder = folder or _folder()
    host, n = socket.gethostname(), 0
    for p in folder.glob(_PREFIX + "*"):
        m = _NAME.match(p.name)
        if m and m["host"] == host and not _alive(int(m["pid"])):
            p.unlink(missing_ok=True)
            n += 1
    return n


class NodeDecodes:
    """The spread images this process decoded for its node, or mapped from another's decode.

    ``wait(store, keys, describe)``: `Context.wait`; ``claimed(store, key)``: `Context.claimed`.
    """

    def __init__(self, wait: Callable, claimed: Callable, *, folder: Path | None = None) -> None:
        self.wait, self.claimed = wait, claimed
        self.folder = folder or _folder()
        self.host = socket.gethostname()
        self._token = secrets.token_hex(4)
        self.mine: dict[int, list[Path]] = {}  # image -> the files this process wrote
        self.shared = 0  # images this process mapped from another's decode

    def _key(self, image: int) -> str:
        return f"decoded/{self.host}/{image}"

    def load(self, store, image: int, name: str, decode: Callable[[], tuple[np.ndarray, np.ndarray]], *,
             note: Callable[[], dict | None] = lambda: None, adopt: Callable[[dict | None], None] = lambda n: None,
             ) -> tuple[np.ndarray, np.ndarray]:
        """Image ``image``'s (pixels, mask): decoded here and shared, or mapped from the node's
        decoder. ``decode()`` reads the file (raises `InputImageError`); ``name`` is for messages.
        ``note()``: what the decode recorded of the image (its radiometry), published with it;
        a process that maps the decode gets it through ``adopt(note)``."""
        key = self._key(image)
        if store.add(key + "/first", 1) == 1:
            self.claimed(store, key)
            try:
                pixels, mask = decode()
            except Exception as e:  # every process of the node reports the same reason
                store.set(key, json.dumps({"error": str(e) if isinstance(e, InputImageError) else f"{type(e).__name__}: {e}"}))
                raise
            paths = self._save(image, pixels, mask)
            store.set(key, json.dumps({"paths": [str(p) for p in paths], "note": note()}))
            if paths:  # the node's one copy: this process maps it too, and lets its own go
                pixels, mask = (np.load(p, mmap_mode="r") for p in paths)
            return pixels, mask
        self.wait(store, [key], describe=lambda _: f"{name} (being decoded for this node)")
        doc = json.loads(store.get(key))
        if "error" in doc:
            raise InputImageError(doc["error"])
        if doc["paths"]:
            try:
                pixels, mask = (np.load(p, mmap_mode="r") for p in doc["paths"])
                self.shared += 1
                adopt(doc.get("note"))
                return pixels, mask
            except OSError as e:
                log.debug("%s: cannot map the node's decode (%s); decoding here", name, e)
        return decode()

    def _save(self, image: int, pixels: np.ndarray, mask: np.ndarray) -> list[Path]:
        """Write the arrays where the node's processes can map them; [] (each decodes its own)
        when there is no room."""
        need = pixels.nbytes + mask.nbytes
        try:
            free = shutil.disk_usage(self.folder).free
        except OSError:
            return []
        if need > (1 - HEADROOM) * free:
            log.debug("no room in %s for a shared decode (%d of %d bytes free)", self.folder, free, need)
            return []
        stem = f"{_PREFIX}{self.host}-{os.getpid()}-{self._token}-{image}"
        paths = [self.folder / f"{stem}.image.npy", self.folder / f"{stem}.mask.npy"]
        self.mine[image] = paths
        try:
            for p, a in zip(paths, (pixels, mask)):
                tmp = p.with_name(p.name + ".tmp")
                with open(tmp, "wb") as f:
                    np.save(f, np.ascontiguousarray(a))
                tmp.replace(p)
        except OSError as e:
            log.debug("cannot share a decode in %s: %s", self.folder, e)
            self.forget(image)
            for p in paths:
                p.with_name(p.name + ".tmp").unlink(missing_ok=True)
            return []
        return paths

    def forget(self, image: int) -> None:
        """Remove this process's files of ``image`` (processes that mapped them keep their view)."""
        for p in self.mine.pop(image, []):
            p.unlink(missing_ok=True)

    def release_finished(self, store, pending: Callable[[int], list[str]]) -> None:
        """Remove the files of images whose work is over: ``pending(image)`` are the store keys
        that mark the end of its pass-2 chunks."""
        for image in list(self.mine):
            keys = pending(image)
            if not keys or store.check(keys):
                self.forget(image)

    def close(self) -> None:
        for image in list(self.mine):
            self.forget(image)
