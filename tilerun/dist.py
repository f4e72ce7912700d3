"""All rank logic: process group, device, threads and the key-value store.

Read the environment at call time (nanoGPT's pattern): torchrun sets ``WORLD_SIZE``;
without it tilerun runs as one process with no process group, and an in-process
``HashStore`` stands in for torchrun's TCPStore, so the scheduler has one code path.
``RANK`` picks work; ``LOCAL_RANK`` only picks the device (torchrun's own advice).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator

import torch
import torch.distributed as dist

from .errors import DistributedError

__all__ = ["Context", "launched_by_torchrun", "session", "resolve_backend", "threads_per_process"]

STORE_TIMEOUT = timedelta(minutes=30)


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) >= 1 and "RANK" in os.environ


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise DistributedError("--backend nccl needs CUDA devices; use --backend gloo (or auto) on CPU")
    if backend not in ("gloo", "nccl"):
        raise DistributedError(f"--backend must be auto, gloo or nccl, got {backend!r}")
    return backend


def threads_per_process(local_world_size: int) -> int:
    """OMP_NUM_THREADS when set, else the cores shared evenly among this node's processes."""
    env = os.environ.get("OMP_NUM_THREADS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, local_world_size))


@dataclass
class Context:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str | None  # None: single process, no process group
    _store: dist.Store

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    @property
    def is_writer(self) -> bool:
        """Rank 0 writes every output, so OUTPUT needs to exist on the first node only."""
        return self.rank == 0

    def store_client(self) -> dist.Store:
        """A store handle for the calling thread.

        Each thread gets its own TCP connection so that a thread blocked in
        ``wait`` never holds up another's ``add``; a HashStore is shared (it locks).
        """
        if not self.distributed:
            return self._store
        return _tcp_store(is_master=False)

    def share_from_rank0(self, name: str, text: str | None) -> str:
        """Rank 0's ``text`` on every rank (others pass None); through the store, no collective."""
        if not self.distributed:
            return text
        if self.rank == 0:
            self._store.set(f"share/{name}", text.encode())
            return text
        self._store.wait([f"share/{name}"])
        return self._store.get(f"share/{name}").decode()

    def agree(self, text: str, what: str) -> None:
        """Fail unless every rank computed the same ``text`` (e.g. the sorted work list)."""
        if not self.distributed:
            return
        digest = int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "big")
        t = torch.tensor([digest, -digest], dtype=torch.int64, device=self.device if self.backend == "nccl" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        if int(t[0]) != digest or int(t[1]) != -digest:
            raise DistributedError(
                f"rank {self.rank}: the processes disagree on {what}; every node must see the same inputs and options"
            )


def _device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DistributedError("--device cuda requested but CUDA is not available; use --device cpu")
        if dev.index is None:
            dev = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    return dev


def _tcp_store(*, is_master: bool) -> dist.Store:
    """A client (or, for rank 0 outside torchrun's agent store, the server) of the job's TCPStore.

    torchrun's rendezvous store outlives a restart of the workers, and c10d would read
    the killed attempt's Gloo addresses from it: every key lives under a prefix per
    attempt (TORCHELASTIC_RESTART_COUNT), for the process group and tilerun alike.
    """
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    store = dist.TCPStore(host, port, is_master=is_master, timeout=STORE_TIMEOUT, wait_for_workers=False,
                          multi_tenant=True)
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "job")
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"tilerun/{run_id}/{attempt}", store)


@contextlib.contextmanager
def session(*, backend: str = "auto", device: str = "auto") -> Iterator[Context]:
    """The process group for one job; torn down on every exit path."""
    if not launched_by_torchrun():
        dev = _device(device, 0)
        torch.set_num_threads(threads_per_process(1))
        yield Context(0, 1, 0, 1, dev, None, dist.HashStore())
        return
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    dev = _device(device, local_rank)
    be = resolve_backend(backend, dev)
    torch.set_num_threads(threads_per_process(local_world))
    kwargs = {"device_id": dev} if dev.type == "cuda" else {}
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = _tcp_store(is_master=rank == 0 and not agent_store)
    dist.init_process_group(backend=be, store=dist.PrefixStore("pg", store), rank=rank, world_size=world,
                            timeout=STORE_TIMEOUT, **kwargs)
    try:
        yield Context(rank, world, local_rank, local_world, dev, be, store)
    finally:
        dist.destroy_process_group()
