"""The wire format, and cores between two real torchrun processes over Gloo, never through the store."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from test_dist import TIMEOUT, _env
from tilerun.transport import pack, unpack


def test_pack_round_trip_without_pickle():
    a = np.arange(24, dtype=np.uint8).reshape(2, 4, 3)
    b = np.linspace(0, 1, 5)
    data = pack({"tiles": [[3, True, False]]}, [a, b[::2]])  # a non-contiguous view too
    header, (a2, b2) = unpack(bytes(data))
    assert header["tiles"] == [[3, True, False]]
    assert a2.dtype == np.uint8 and (a2 == a).all()
    assert (b2 == b[::2]).all()
    assert b"pickle" not in data and not data.startswith(b"\x80")


def test_unpack_refuses_a_truncated_payload():
    data = pack({}, [np.zeros(100, np.uint8)])
    with pytest.raises(ValueError, match="truncated"):
        unpack(bytes(data[:-1]))


SCRIPT = r"""
import sys, threading
import numpy as np
import torch.distributed as dist
from tilerun.dist import session
from tilerun.transport import PointToPoint

def arrays(tag):
    return [np.arange(tag * 1000, dtype=np.int64).astype(np.uint8).reshape(-1, 10), np.full(3, tag / 7)]

with session(backend="gloo", device="cpu") as ctx:
    store = ctx.store_client()
    for base, group in ((0, None), (100, dist.new_group(backend="gloo"))):  # the NCCL road: a Gloo group of its own
        p2p = PointToPoint(group)
        if ctx.rank == 1:
            for tag in (5, 6, 7):
                sent = p2p.send(0, base + tag, {"tiles": [tag]}, arrays(tag))
                assert sent > tag * 1000, sent
            src, h, got = p2p.recv(base + 9)
            assert (src, h["tiles"]) == (0, [9]) and all((x == y).all() for x, y in zip(got, arrays(9)))
        else:
            got = {}
            def receive():  # in another thread, in another order than sent: matched by tag
                for tag in (7, 6, 5):
                    got[tag] = p2p.recv(base + tag)
            t = threading.Thread(target=receive)
            t.start()
            p2p.send(1, base + 9, {"tiles": [9]}, arrays(9))
            t.join()
            for tag, (src, h, arrs) in got.items():
                assert src == 1 and h["tiles"] == [tag]
                assert all((x == y).all() for x, y in zip(arrs, arrays(tag))), tag
            assert p2p.bytes_received == sum(len(__import__("tilerun.transport").transport.pack({"tiles": [t]}, arrays(t)))
                                             for t in (5, 6, 7))
        p2p.flush()
    print("transport ok", ctx.rank, store.num_keys(), flush=True)
"""


def test_point_to_point_between_two_processes(tmp_path):
    script = tmp_path / "p2p.py"
    script.write_text(SCRIPT)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script)],
                       capture_output=True, text=True, timeout=TIMEOUT, env=_env())
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("transport ok") == 2, r.stdout
