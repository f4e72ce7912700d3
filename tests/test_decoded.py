"""One decode of a spread image per node (`tilerun.decoded`), with an in-process store
standing in for the job's c10d store; tests/test_scale.py runs it under torchrun."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch.distributed as dist

from tilerun import decoded
from tilerun.decoded import NodeDecodes, remove_stale
from tilerun.errors import InputImageError


def _node(folder) -> NodeDecodes:
    return NodeDecodes(lambda store, keys, describe: store.wait(keys), lambda store, key: None, folder=folder)


def _pixels():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (40, 30, 3), np.uint8), rng.random((40, 30)) < 0.1


def test_the_second_process_maps_the_first_ones_decode(tmp_path):
    store = dist.HashStore()
    image, mask = _pixels()
    calls = []

    def decode():
        calls.append(1)
        return image.copy(), mask.copy()

    first, second = _node(tmp_path), _node(tmp_path)
    got, notes = {}, []
    t = threading.Thread(target=lambda: got.update(second=second.load(store, 3, "a.png", decode, adopt=notes.append)))
    got["first"] = first.load(store, 3, "a.png", decode, note=lambda: {"range": [0, 4095]})
    t.start()
    t.join(10)
    assert len(calls) == 1 and second.shared == 1
    assert notes == [{"range": [0, 4095]}]  # what the decode recorded (its radiometry) travels with it
    for img, msk in got.values():
        assert np.array_equal(img, image) and np.array_equal(msk, mask)
        assert isinstance(img, np.memmap) and not img.flags.writeable
    assert len(list(tmp_path.glob("tilerun-decoded-*.npy"))) == 2
    first.release_finished(store, lambda i: ["d/3/0"])  # its chunks not all delivered yet: kept
    assert len(list(tmp_path.glob("*.npy"))) == 2
    store.set("d/3/0", "1")
    first.release_finished(store, lambda i: ["d/3/0"])
    assert list(tmp_path.iterdir()) == []
    assert np.array_equal(got["second"][0], image)  # a mapping outlives the unlink


def test_a_decode_error_reaches_every_process_of_the_node(tmp_path):
    store = dist.HashStore()

    def broken():
        raise InputImageError("cannot identify image file")

    with pytest.raises(InputImageError, match="cannot identify"):
        _node(tmp_path).load(store, 0, "bad.png", broken)
    with pytest.raises(InputImageError, match="cannot identify"):
        _node(tmp_path).load(store, 0, "bad.png", lambda: pytest.fail("decoded twice"))


def test_no_room_means_each_process_decodes_its_own(tmp_path, monkeypatch):
    monkeypatch.setattr(decoded, "HEADROOM", 1.0)  # nothing fits
    store = dist.HashStore()
    image, mask = _pixels()
    calls = []

    def decode():
        calls.append(1)
        return image, mask

    for _ in range(2):
        got, _ = _node(tmp_path).load(store, 0, "a.png", decode)
        assert got is image
    assert len(calls) == 2 and list(tmp_path.iterdir()) == []


def test_a_killed_process_files_are_removed_by_the_next_job(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    left = tmp_path / f"tilerun-decoded-{host}-{int(dead.stdout)}-ab12cd34-0.image.npy"
    mine = tmp_path / f"tilerun-decoded-{host}-{os.getpid()}-ab12cd34-0.image.npy"
    other_host = tmp_path / f"tilerun-decoded-elsewhere-{int(dead.stdout)}-ab12cd34-0.image.npy"
    for p in (left, mine, other_host):
        p.write_bytes(b"x")
    assert remove_stale(tmp_path) == 1
    assert not left.exists() and mine.exists() and other_host.exists()
