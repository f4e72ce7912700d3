"""All rank logic: process group, device, threads and the key-value store.

Read the environment at call time (nanoGPT's pattern): torchrun sets ``WORLD_SIZE``;
without it tilerun runs as one process with no process group, and an in-process
``HashStore`` stands in for torchrun's TCPStore, so the scheduler has one code path.
``RANK`` picks work; ``LOCAL_RANK`` only picks the device (torchrun's own advice).

No wait on the store can time out on healthy work: `Context.wait` polls for as long as
the ranks it waits on show signs of life. Each process runs a heartbeat
thread (it beats while a long forward runs); a rank that has not beaten for the stall
limit (``--stall-timeout``) is stopped or hung as a whole (SIGSTOP, a frozen host), and
the waiter ends the job naming it and the task it holds. A forward that never returns in
a live process cannot be told from a long one, and is waited on.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist

from .errors import DistributedError

__all__ = ["Context", "launched_by_torchrun", "session", "resolve_backend", "threads_per_process",
           "stall_timeout", "STALL_ENV", "STORE_TIMEOUT_ENV"]

#: Seconds a process may go without a heartbeat before a rank waiting on it ends the job.
STALL_TIMEOUT_S = 600.0
STALL_ENV = "TILERUN_STALL_TIMEOUT"
#: The store's own timeout for any single blocking call (default 30 minutes). tilerun's
#: waits never reach it (`Context.wait` polls); tests shorten it to prove that.
STORE_TIMEOUT_ENV = "TILERUN_STORE_TIMEOUT"
STORE_TIMEOUT_S = 30 * 60.0
#: `Context.wait`'s polls: from POLL_MIN_S apart up to POLL_MAX_S (seconds).
POLL_MIN_S, POLL_MAX_S = 0.001, 0.1
#: Seconds between heartbeats.
BEAT_S = 1.0


def store_timeout() -> timedelta:
    return timedelta(seconds=float(os.environ.get(STORE_TIMEOUT_ENV) or STORE_TIMEOUT_S))


def stall_timeout(value: float | None = None) -> float:
    """``value`` (--stall-timeout), else $TILERUN_STALL_TIMEOUT, else STALL_TIMEOUT_S."""
    if value is None:
        value = float(os.environ.get(STALL_ENV) or STALL_TIMEOUT_S)
    if value <= 0:
        raise DistributedError(f"--stall-timeout must be positive, got {value}")
    return value


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


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _difference(mine: Any, theirs: Any) -> str:
    """``mine`` vs rank 0's ``theirs`` in a few words; lists (the inputs) by count and first difference."""
    if isinstance(mine, list) and isinstance(theirs, list):
        extra = sorted(set(map(str, mine)) - set(map(str, theirs)))
        missing = sorted(set(map(str, theirs)) - set(map(str, mine)))
        what = [f"{len(mine)} vs {len(theirs)}"]
        if missing:
            what.append(f"{missing[0]} missing" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        if extra:
            what.append(f"{extra[0]} only here" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
        return ", ".join(what)
    return f"{_show(mine)} vs {_show(theirs)}"


class _Beats:
    """What this process has seen of every rank's heartbeat counter, and since when (its own clock:
    no two nodes' clocks are compared)."""

    def __init__(self) -> None:
        self._seen: dict[int, tuple[int, float]] = {}
        self._lock = threading.Lock()

    def silent_for(self, store: dist.Store, rank: int) -> float:
        beat = store.add(f"beat/{rank}", 0)
        now = time.monotonic()
        with self._lock:
            last = self._seen.get(rank)
            if last is None or last[0] != beat:
                self._seen[rank] = (beat, now)
                return 0.0
            return now - last[1]


@dataclass
class Context:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str | None  # None: single process, no process group
    _store: dist.Store
    stall_timeout: float = STALL_TIMEOUT_S
    _beats: _Beats = field(default_factory=_Beats, repr=False)
    _agreements: int = 0

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

    # -- waiting that survives long work --------------------------------------------
    def claimed(self, store: dist.Store, key: str) -> None:
        """Record that this rank computes the task whose result goes to ``key`` (for `wait`'s message)."""
        if self.distributed:
            store.set(f"claim/{key}", str(self.rank))

    def forget(self, store: dist.Store, key: str) -> None:
        """Drop ``key`` and its claim record (the result has been taken)."""
        store.delete_key(key)
        if self.distributed:
            store.delete_key(f"claim/{key}")

    def wait(self, store: dist.Store, keys: Sequence[str], *, describe: Callable[[str], str] = str,
             ranks: Sequence[int] | None = None) -> None:
        """Until every key in ``keys`` is set, however long that takes while the job lives.

        Polls (`Store.check`, which never blocks: a TCPStore `wait` that times out makes
        c10d print a warning each time), at most POLL_MAX_S apart and a tenth of the wait so
        far, so that a result that comes soon is seen soon; one process waits in slices. Now and then checks the heartbeat of
        the rank that claimed the first missing key (`claimed`), else of ``ranks`` (default:
        every rank that has not finished): one silent for ``stall_timeout`` seconds ends the
        job with a DistributedError naming it and ``describe(key)``.
        """
        keys = list(keys)
        if not self.distributed:  # a HashStore's wait blocks no other thread and prints nothing
            while True:
                try:
                    store.wait(keys, timedelta(seconds=POLL_MAX_S * 10))
                    return
                except dist.DistStoreError:
                    continue
        # Liveness costs a few store calls a rank: every tenth of the limit is soon enough.
        every = max(POLL_MAX_S, self.stall_timeout / 10)
        start = checked = time.monotonic()
        while keys and not store.check(keys):
            now = time.monotonic()
            if self.distributed and now - checked >= every:
                keys = [k for k in keys if not store.check([k])]
                if keys:
                    self._check_alive(store, keys[0], describe, ranks)
                checked = now
            time.sleep(min(POLL_MAX_S, max(POLL_MIN_S, (now - start) / 10)))

    def _check_alive(self, store: dist.Store, key: str, describe: Callable[[str], str],
                     ranks: Sequence[int] | None) -> None:
        """Raise if the rank that claimed ``key`` (not claimed yet: any of ``ranks``) is silent."""
        claimed = store.check([f"claim/{key}"])
        if claimed:
            suspects = [int(store.get(f"claim/{key}"))]
        elif ranks is None:
            suspects = [r for r in range(self.world_size) if not store.check([f"done/{r}"])]
        else:
            suspects = list(ranks)
        for rank in suspects:
            if rank == self.rank:
                continue
            silent = self._beats.silent_for(store, rank)
            if silent >= self.stall_timeout:
                task = f" while it holds {describe(key)}" if claimed else f" (awaited: {describe(key)})"
                raise DistributedError(
                    f"rank {rank} has shown no sign of life for {silent:.0f} s{task}: its process is stopped "
                    f"or hung; stopping the job (--stall-timeout sets the limit, now {self.stall_timeout:g} s)"
                )

    # -- what every rank must share ---------------------------------------------------
    def share_from_rank0(self, name: str, text: str | None) -> str:
        """Rank 0's ``text`` on every rank (others pass None); through the store, no collective."""
        if not self.distributed:
            return text
        if self.rank == 0:
            self._store.set(f"share/{name}", text.encode())
            return text
        self.wait(self._store, [f"share/{name}"], ranks=[0])
        return self._store.get(f"share/{name}").decode()

    def agree_settings(self, settings: Mapping[str, Any]) -> None:
        """Fail on every rank unless every rank's ``settings`` (JSON values by option name, e.g.
        ``{"--batch-size": 4}``) equal rank 0's. The message names the first rank that differs,
        the setting and both values: "rank 1 disagrees with rank 0 on --batch-size: 2 vs 1".

        Through the store: rank 0 publishes its settings, every other rank compares its own
        and publishes its verdict, every rank reads every verdict; no collective to hang in.
        """
        if not self.distributed:
            return
        self._agreements += 1
        prefix = f"agree/{self._agreements}"
        store = self._store
        mine = json.loads(json.dumps(dict(settings)))  # as rank 0's will read back: tuples are lists
        if self.rank == 0:
            store.set(f"{prefix}/settings", json.dumps(mine))
        else:
            self.wait(store, [f"{prefix}/settings"], ranks=[0])
            theirs = json.loads(store.get(f"{prefix}/settings"))
            verdict = ""
            for name in list(theirs) + [n for n in mine if n not in theirs]:
                if mine.get(name) != theirs.get(name):
                    verdict = f"rank {self.rank} disagrees with rank 0 on {name}: {_difference(mine.get(name), theirs.get(name))}"
                    break
            store.set(f"{prefix}/{self.rank}", verdict)
        others = [f"{prefix}/{r}" for r in range(1, self.world_size)]
        self.wait(store, others, describe=lambda k: "its check of the settings")
        for k in others:
            verdict = store.get(k).decode()
            if verdict:
                raise DistributedError(f"{verdict}; every process must run with the same options, model and inputs")

    def agree(self, text: str, what: str) -> None:
        """Fail unless every rank computed the same ``text`` (e.g. the sorted training images)."""
        self.agree_settings({what: "sha256 " + hashlib.sha256(text.encode()).hexdigest()[:16]})


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
    store = dist.TCPStore(host, port, is_master=is_master, timeout=store_timeout(), wait_for_workers=False,
                          multi_tenant=True)
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "job")
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"tilerun/{run_id}/{attempt}", store)


@contextlib.contextmanager
def _heartbeat(rank: int) -> Iterator[None]:
    """A thread that counts ``beat/RANK`` up every BEAT_S on its own connection, for the life of
    the block; then ``done/RANK``: a finished rank's silence is no stall."""
    store = _tcp_store(is_master=False)
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(BEAT_S):
            try:
                store.add(f"beat/{rank}", 1)
            except Exception:  # the job is ending (the store's server went): nothing to tell
                return

    thread = threading.Thread(target=beat, daemon=True, name="tilerun-heartbeat")
    store.add(f"beat/{rank}", 1)
    thread.start()
    try:
        yield
        store.set(f"done/{rank}", "1")
    finally:
        stop.set()
        thread.join()


@contextlib.contextmanager
def session(*, backend: str = "auto", device: str = "auto", stall: float | None = None) -> Iterator[Context]:
    """The process group for one job; torn down on every exit path.

    ``stall``: seconds without a heartbeat after which a rank is taken for stopped or hung
    (`stall_timeout`: default $TILERUN_STALL_TIMEOUT, else STALL_TIMEOUT_S).
    """
    stall = stall_timeout(stall)
    if not launched_by_torchrun():
        dev = _device(device, 0)
        torch.set_num_threads(threads_per_process(1))
        store = dist.HashStore()
        store.set_timeout(store_timeout())
        yield Context(0, 1, 0, 1, dev, None, store, stall)
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
                            timeout=timedelta(seconds=STORE_TIMEOUT_S), **kwargs)
    try:
        with _heartbeat(rank):
            yield Context(rank, world, local_rank, local_world, dev, be, store, stall)
    finally:
        dist.destroy_process_group()
