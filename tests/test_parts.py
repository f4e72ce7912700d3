"""Part stores: chunks written atomically beside the output, bound to one plan; shared-OUTPUT detection."""

from __future__ import annotations

import logging
import subprocess
import sys

import numpy as np
import pytest

from test_dist import TIMEOUT, _env
from tilerun.parts import PARTS_DIR, PartStore, PartStoreError, part_digest, shared_output

CHUNKS = {1: [[0, 1], [2]], 2: [[0, 1], [2]]}


def digest(**kw) -> str:
    args = dict(fingerprint="fp", key="a/b.png", identity={"input": [10, 20]}, height=30, width=40, chunks=CHUNKS)
    return part_digest(**{**args, **kw})


def test_chunks_round_trip_and_inventory(tmp_path):
    store = PartStore.prepare(tmp_path, "a/b.png", digest=digest())
    assert store.folder.parent == tmp_path / PARTS_DIR
    assert store.inventory() == {}
    cls = np.arange(12, dtype=np.uint8).reshape(3, 4)
    rgb = np.full((3, 4, 3), 7, np.uint8)
    store.put(2, 1, {"tiles": [[2, True, True]]}, [cls, rgb])
    store.put(1, 0, {"tiles": [0, 1]}, [np.ones((2, 5))])
    assert store.inventory() == {1: {0}, 2: {1}}
    header, (c2, r2) = PartStore.open(tmp_path, "a/b.png", digest=digest()).get(2, 1)
    assert header["tiles"] == [[2, True, True]] and (c2 == cls).all() and (r2 == rgb).all()
    assert store.bytes_written > cls.nbytes + rgb.nbytes
    assert not list(store.folder.glob(".*.tmp"))
    store.remove()
    assert not (tmp_path / PARTS_DIR).exists()


def test_a_cut_short_chunk_is_not_done_and_temps_go(tmp_path):
    store = PartStore.prepare(tmp_path, "x.png", digest=digest(key="x.png"))
    store.put(2, 0, {"tiles": [[0, True, False]]}, [np.zeros((8, 8), np.uint8)])
    store.put(2, 1, {"tiles": [[2, True, False]]}, [np.zeros((8, 8), np.uint8)])
    path = store.folder / "p2-c1.part"
    path.write_bytes(path.read_bytes()[:-3])  # a power cut mid-file
    (store.folder / ".p2-c0.part.abc.tmp").write_bytes(b"half")  # a killed writer's temp
    assert store.inventory() == {2: {0}}
    again = PartStore.prepare(tmp_path, "x.png", digest=digest(key="x.png"))  # the rerun keeps chunk 0
    assert again.inventory() == {2: {0}}
    assert not list(again.folder.glob(".*.tmp"))


def test_a_store_of_another_plan_is_discarded_with_a_message(tmp_path, caplog):
    old = PartStore.prepare(tmp_path, "a/b.png", digest=digest())
    old.put(2, 0, {"tiles": []})
    new_digest = digest(identity={"input": [10, 21]})  # the input changed since
    with pytest.raises(PartStoreError, match="another job"):
        PartStore.open(tmp_path, "a/b.png", digest=new_digest)
    with caplog.at_level(logging.WARNING, logger="tilerun"):
        new = PartStore.prepare(tmp_path, "a/b.png", digest=new_digest)
    assert "discarding the part store" in caplog.text and "another job" in caplog.text
    assert new.inventory() == {}
    PartStore.open(tmp_path, "a/b.png", digest=new_digest)


def test_a_store_without_meta_is_never_trusted(tmp_path):
    folder = PartStore.folder_for(tmp_path, "a/b.png")
    folder.mkdir(parents=True)
    (folder / "p2-c0.part").write_bytes(b"junk")
    with pytest.raises(PartStoreError, match="no meta"):
        PartStore.open(tmp_path, "a/b.png", digest=digest())
    assert PartStore.prepare(tmp_path, "a/b.png", digest=digest()).inventory() == {}


def test_digest_binds_settings_input_size_and_chunks():
    base = digest()
    for kw in (dict(fingerprint="fp2"), dict(identity={"input": [10, 21]}), dict(height=31),
               dict(chunks={1: [[0], [1, 2]], 2: [[0, 1], [2]]}), dict(key="other.png")):
        assert digest(**kw) != base, kw
    assert digest() == base


def test_one_process_and_overrides(tmp_path):
    from tilerun.dist import session

    with session(device="cpu") as ctx:
        assert shared_output(ctx, tmp_path) is True
        assert shared_output(ctx, tmp_path, override=False) is False


SCRIPT = r"""
import os, sys
import numpy as np
from tilerun.dist import session
from tilerun.parts import PartStore, shared_output

root = sys.argv[1]
with session(backend="gloo", device="cpu") as ctx:
    same = shared_output(ctx, root + "/out")
    # Two "nodes" that do not share OUTPUT: each rank its own folder.
    apart = shared_output(ctx, f"{root}/node{ctx.rank}")
    forced = shared_output(ctx, f"{root}/node{ctx.rank}", override=True)
    # Both ranks write chunks of one image into one store that rank 0 prepared.
    store = ctx.store_client()
    if ctx.rank == 0:
        PartStore.prepare(root + "/out", "big.png", digest="d")
        store.set("prepared", "1")
    store.wait(["prepared"])
    parts = PartStore.open(root + "/out", "big.png", digest="d")
    for c in range(ctx.rank, 6, 2):
        parts.put(2, c, {"tiles": [[c, True, False]]}, [np.full((16, 16), c, np.uint8)])
    store.set(f"written/{ctx.rank}", "1")
    store.wait(["written/0", "written/1"])
    inv = parts.inventory()
    ok = inv == {2: set(range(6))} and all(int(parts.get(2, c)[1][0][0, 0]) == c for c in range(6))
    print(f"rank {ctx.rank}: same={same} apart={apart} forced={forced} parts={ok}", flush=True)
    print("tokens left:", sorted(p for p in os.listdir(root + "/out") if p.startswith(".tilerun-shared")), flush=True)
"""


def test_two_processes_detect_shared_output_and_share_a_part_store(tmp_path):
    script = tmp_path / "shared.py"
    script.write_text(SCRIPT)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script),
                        str(tmp_path)], capture_output=True, text=True, timeout=TIMEOUT, env=_env())
    assert r.returncode == 0, r.stderr[-3000:]
    for rank in (0, 1):
        assert f"rank {rank}: same=True apart=False forced=True parts=True" in r.stdout, r.stdout


def test_sweep_removes_the_stores_no_longer_wanted(tmp_path):
    a = PartStore.prepare(tmp_path, "a.png", digest="1")
    PartStore.prepare(tmp_path, "b.png", digest="2")
    assert PartStore.sweep(tmp_path, ["a.png"]) == 1
    assert a.folder.exists() and not PartStore.folder_for(tmp_path, "b.png").exists()
    assert PartStore.sweep(tmp_path, []) == 1
    assert not (tmp_path / PARTS_DIR).exists()
