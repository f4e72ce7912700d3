"""The remembered probe: one per model object and weights, kept on disk, and never trusted blindly.

A cache entry that is wrong breaks exactness silently (a halo one pixel short changes hundreds
of pixels), so an entry is taken only if this user owns it and no one else can write it, its
checksum holds, its values are ones the probe can give, and a window with its halo reproduces
the model on a small random image.
"""

from __future__ import annotations

import json
import logging
import os
import types

import numpy as np
import pytest
import torch
from test_receptive import ConvStack

import tilerun.receptive as receptive
from tilerun.engine import Engine, infer_image
from tilerun.receptive import ModelProbe


@pytest.fixture
def probes(tmp_path, monkeypatch) -> list:
    """A fresh cache folder; every real probe is appended to the returned list."""
    monkeypatch.setenv(receptive.CACHE_ENV, str(tmp_path / "cache"))
    calls = []
    real = receptive.probe_model
    monkeypatch.setattr(receptive, "probe_model", lambda m, **kw: calls.append(m) or real(m, **kw))
    return calls


def _entry(model, probes) -> tuple[ModelProbe, object]:
    """Measure ``model`` once under identity "m" and return the probe and its cache file."""
    first, kept = receptive.probe_cached(model, "m")
    assert kept is None and len(probes) == 1
    again, path = receptive.probe_cached(model, "m")
    assert again == first and path is not None and len(probes) == 1
    return first, path


def _forge(path, **changes) -> None:
    """Rewrite the entry at ``path`` with ``changes``, its checksum recomputed: what only a
    deliberate forger or a bug would write, so only the plausibility or halo checks catch it."""
    entry = json.loads(path.read_text())
    entry.update(changes)
    fields = {k: entry[k] for k in receptive._FIELDS}
    entry["check"] = receptive._checksum(fields, entry["key"])
    path.write_text(json.dumps(entry))


def _one_warning(caplog, *words: str) -> None:
    lines = [r.getMessage() for r in caplog.records if r.name == "tilerun" and r.levelno == logging.WARNING]
    assert len(lines) == 1, lines
    assert all(w in lines[0] for w in words), lines[0]


def test_a_poisoned_radius_is_discarded_and_outputs_equal_a_fresh_run(probes, caplog, make_image):
    model = ConvStack(1)  # radius 1
    fresh, path = _entry(model, probes)
    assert fresh.radius == 1
    _forge(path, radius=0)  # plausible, checksum valid, owned by us: only the halo check can tell
    with caplog.at_level(logging.WARNING, logger="tilerun"):
        probe, kept = receptive.probe_cached(model, "m")
    _one_warning(caplog, str(path), "does not reproduce")
    assert (probe, kept) == (fresh, None) and len(probes) == 2  # measured again
    assert json.loads(path.read_text())["radius"] == 1  # and rewritten
    img, everything = make_image(40, 52, seed=3), np.ones((40, 52), bool)  # RGB = the model's everywhere

    def run(p):
        return infer_image(Engine(model, tile=8, batch_size=4, probe=p), img, everything)

    ref, out, poisoned = run(receptive.probe_model(model)), run(probe), run(ModelProbe(1, 0, None, False))
    assert all(np.array_equal(a, b) for a, b in zip(out, ref))
    assert not np.array_equal(poisoned[1], ref[1])  # what the poisoned entry would have given


def test_an_entry_in_the_old_format_is_not_taken(probes, caplog):
    model = ConvStack(1)
    fresh, path = _entry(model, probes)
    path.write_text(json.dumps({"stride": 1, "radius": 0, "global_radius": None, "has_global": False}))
    with caplog.at_level(logging.WARNING, logger="tilerun"):
        assert receptive.probe_cached(model, "m") == (fresh, None)
    _one_warning(caplog, str(path), "not a probe entry")


def test_a_tampered_entry_fails_its_checksum(probes, caplog):
    model = ConvStack(2)
    fresh, path = _entry(model, probes)
    entry = json.loads(path.read_text())
    entry["radius"] = 1  # hand-edited, checksum left as it was
    path.write_text(json.dumps(entry))
    with caplog.at_level(logging.WARNING, logger="tilerun"):
        assert receptive.probe_cached(model, "m") == (fresh, None) and len(probes) == 2
    _one_warning(caplog, str(path), "checksum")
    assert receptive.probe_cached(model, "m") == (fresh, path) and len(probes) == 2  # rewritten: good again


def test_an_entry_moved_from_another_key_is_refused(probes, caplog):
    a, b = ConvStack(1), ConvStack(3)
    _, path_a = _entry(a, probes)
    probe_b, _ = receptive.probe_cached(b, "other")
    path_b = next(p for p in path_a.parent.iterdir() if p != path_a)
    os.replace(path_a, path_b)  # a's valid entry (radius 1) under b's key (radius 3)
    with caplog.at_level(logging.WARNING, logger="tilerun"):
        assert receptive.probe_cached(b, "other") == (probe_b, None)
    _one_warning(caplog, "another model")


@pytest.mark.parametrize("changes,why", [
    (dict(stride=3), "stride 3"),
    (dict(stride=64), "stride 64"),
    (dict(radius=-1), "radius -1"),
    (dict(radius=receptive.MAX_PROBE), f"radius {receptive.MAX_PROBE}"),
    (dict(radius=True), "radius True"),
    (dict(has_global=True), "has no global_terms"),
    (dict(global_radius=4), "global radius"),
])
def test_implausible_values_are_refused(probes, caplog, changes, why):
    model = ConvStack(1)
    fresh, path = _entry(model, probes)
    _forge(path, **changes)
    with caplog.at_level(logging.WARNING, logger="tilerun"):
        assert receptive.probe_cached(model, "m") == (fresh, None)
    _one_warning(caplog, str(path), why)


def test_an_entry_others_can_write_is_not_trusted(probes, caplog):
    model = ConvStack(1)
    fresh, path = _entry(model, probes)
    path.chmod(0o666)
    with caplog.at_level(logging.WARNING, logger="tilerun"):
        assert receptive.probe_cached(model, "m") == (fresh, None) and len(probes) == 2
    _one_warning(caplog, str(path), "writable by others")
    assert path.stat().st_mode & 0o777 == 0o644  # rewritten, ours alone
    old = os.umask(0o002)  # a umask that makes files group-writable (user-private-group systems)
    try:
        path.unlink()
        receptive.probe_cached(model, "m")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o022 == 0 and receptive.probe_cached(model, "m")[1] == path


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="POSIX ownership")
def test_an_entry_owned_by_another_user_is_not_trusted(probes, caplog, monkeypatch):
    model = ConvStack(1)
    _, path = _entry(model, probes)
    me = os.geteuid()
    monkeypatch.setattr(receptive.os, "geteuid", lambda: me + 1)  # the file is now someone else's
    with caplog.at_level(logging.WARNING, logger="tilerun"):
        receptive.probe_cached(model, "m")
    _one_warning(caplog, f"owned by uid {me}")


# -- one probe per model object -----------------------------------------------------------


def test_infer_image_probes_a_model_once(probes, make_image, monkeypatch):
    monkeypatch.setenv(receptive.CACHE_ENV, "")  # no disk: the model object remembers it
    model = ConvStack(2)
    img = make_image(30, 34)
    first = infer_image(model, img, tile=8)
    assert len(probes) == 1
    assert all(np.array_equal(a, b) for a, b in zip(infer_image(model, img, tile=8), first))
    Engine(model, tile=8)  # the Engine (which made the weights channels_last: same key) too
    assert len(probes) == 1


@pytest.mark.parametrize("how", ["no_grad", "data", "load_state_dict"])
def test_changed_weights_probe_again(probes, make_image, monkeypatch, how):
    monkeypatch.setenv(receptive.CACHE_ENV, "")
    model = ConvStack(1)
    infer_image(model, make_image(20, 20), tile=8)
    assert len(probes) == 1
    w = model.convs[0].weight
    if how == "no_grad":
        with torch.no_grad():
            w[0, 0, 0, 0] += 1
    elif how == "data":  # bumps no version counter: only the hash of the values sees it
        w.data[0, 0, 0, 0] += 1
    else:
        state = {k: v.clone() for k, v in model.state_dict().items()}
        state["out.bias"] += 1
        model.load_state_dict(state)
    infer_image(model, make_image(20, 20), tile=8)
    assert len(probes) == 2


def test_a_changed_layer_probes_again(probes, make_image, monkeypatch):
    monkeypatch.setenv(receptive.CACHE_ENV, "")
    model = ConvStack(1)
    assert receptive.probe_for(model)[0].radius == 1
    model.convs[0].dilation = (3, 3)  # same weights, wider reach
    model.convs[0].padding = (3, 3)
    probe, measured = receptive.probe_for(model)
    assert probe.radius == 3 and measured and len(probes) == 2
    assert receptive.probe_for(model) == (probe, False)


def test_big_models_rehash_when_a_tensor_moves(probes, monkeypatch):
    monkeypatch.setenv(receptive.CACHE_ENV, "")
    monkeypatch.setattr(receptive, "HASH_EVERY_CALL_BYTES", 0)  # every model is "big"
    model = ConvStack(1)
    receptive.probe_for(model)
    hashed = []
    real = receptive._tensor_bytes
    monkeypatch.setattr(receptive, "_tensor_bytes", lambda t: hashed.append(1) or real(t))
    receptive.probe_for(model)
    assert not hashed and len(probes) == 1  # fingerprint unchanged: no bytes read
    with torch.no_grad():
        model.out.bias += 1  # an in-place update bumps the version counter
    receptive.probe_for(model)
    assert hashed and len(probes) == 2


def test_an_identical_model_object_reads_the_disk_cache(probes):
    a, b = ConvStack(2), ConvStack(2)  # same class (source known), same seeded weights
    assert receptive.probe_for(a) == (receptive.probe_for(b)[0], True) and len(probes) == 1
    entries = list((receptive.cache_dir() / "probes").iterdir())
    assert len(entries) == 1


def test_a_model_whose_code_is_unknown_stays_off_disk(probes):
    notebook = types.ModuleType("notebook_cell")  # no __file__, as a class typed at a prompt

    class Cell(ConvStack):
        pass

    Cell.__module__ = notebook.__name__
    import sys

    sys.modules[notebook.__name__] = notebook
    try:
        a, b = Cell(1), Cell(1)
        receptive.probe_for(a)
        receptive.probe_for(a)
        assert len(probes) == 1  # kept on the object
        receptive.probe_for(b)
        assert len(probes) == 2 and not (receptive.cache_dir() / "probes").exists()
    finally:
        del sys.modules[notebook.__name__]


def test_edited_source_is_another_key(probes, tmp_path, monkeypatch):
    import importlib

    src = tmp_path / "edited_model.py"
    body = "from test_receptive import ConvStack\nclass M(ConvStack):\n    pass\n"
    src.write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = importlib.import_module("edited_model")
    try:
        before = receptive._code_key(mod.M(1))
        src.write_text(body + "# another helper\n")
        os.utime(src, ns=(1, 1))  # a new mtime even on a coarse clock
        assert receptive._code_key(mod.M(1)) != before
    finally:
        sys_modules = __import__("sys").modules
        sys_modules.pop("edited_model", None)
