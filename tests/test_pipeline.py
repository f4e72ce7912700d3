"""The engine's performance options (precision, workers, batching) and its memory bound.

No timings here (the machine is shared; speed lives in bench/ and BENCHMARKS.md): only
properties that fail when the code is wrong.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tilerun.engine import Engine, infer_image

from test_exact import assert_exact

# -- engine options --------------------------------------------------------------------------


def test_precision_is_validated(sensitive_model, sensitive_probe):
    with pytest.raises(ValueError, match=r"--precision must be one of fp32, bf16, fp16, got 'fp64'"):
        Engine(sensitive_model, precision="fp64", probe=sensitive_probe)
    with pytest.raises(ValueError, match="--precision fp16 needs a CUDA device"):
        Engine(sensitive_model, precision="fp16", device="cpu", probe=sensitive_probe)
    with pytest.raises(ValueError, match="--batch-size must be >= 1, got 0"):
        Engine(sensitive_model, batch_size=0, probe=sensitive_probe)


def test_bf16_on_cpu_runs_and_stays_close(sensitive_model, sensitive_probe, make_image, make_holes, whole_forward):
    img, holes = make_image(96, 80, seed=3), make_holes(96, 80, seed=4)
    engine = Engine(sensitive_model, tile=32, batch_size=2, precision="bf16", probe=sensitive_probe)
    classes, rgb = infer_image(engine, img, holes)
    ref_classes, ref_rgb = whole_forward(sensitive_model, img, holes)
    assert classes.dtype == np.uint8 and rgb.dtype == np.uint8
    assert np.array_equal(rgb[~holes], img[~holes])  # known pixels: the input, in any precision
    # bf16 has 8 mantissa bits: close to the fp32 forward, not equal to it.
    assert (classes == ref_classes).mean() > 0.8
    assert np.abs(rgb.astype(int) - ref_rgb.astype(int))[holes].mean() < 8


@pytest.mark.parametrize("batch,workers", [(1, 1), (3, 1), (1, 3), (7, 2)])
@pytest.mark.parametrize("channels_last", [True, False])
def test_batches_of_mixed_window_shapes_stay_exact(
    sensitive_model, sensitive_probe, make_image, make_holes, whole_forward, batch, workers, channels_last
):
    # 100x77 with tile 32: windows of several shapes (edges, corners), and batches that end mid-shape;
    # one worker (the GPU's look-ahead path) and several (CPU threads, results back in order).
    img, holes = make_image(100, 77, seed=batch), make_holes(100, 77, seed=5)
    engine = Engine(sensitive_model, tile=32, batch_size=batch, probe=sensitive_probe, channels_last=channels_last,
                    workers=workers)
    tiles = engine.tiles(100, 77)
    assert len({t.window_shape for t in tiles}) >= 4
    threads = torch.get_num_threads()
    assert [r.tile for r in engine.compute(img, holes, tiles, engine.reduce_partials(
        engine.global_partials(img, holes, tiles)))] == tiles  # in order, each once
    assert torch.get_num_threads() == threads  # the workers' one-thread setting does not leak
    assert_exact(infer_image(engine, img, holes), whole_forward(sensitive_model, img, holes))
    with pytest.raises(ValueError, match="workers must be >= 1, got 0"):
        Engine(sensitive_model, probe=sensitive_probe, workers=0)


def test_one_tile_skips_pass_one_and_stays_exact(sensitive_model, sensitive_probe, make_image, make_holes, whole_forward):
    img, holes = make_image(60, 90, seed=8), make_holes(60, 90, seed=9)
    engine = Engine(sensitive_model, tile=128, probe=sensitive_probe)
    assert engine.uses_global and not engine.needs_global_pass(60, 90)
    called = []
    engine.global_partials = lambda *a, **k: called.append(1)  # must not run
    assert_exact(infer_image(engine, img, holes), whole_forward(sensitive_model, img, holes))
    assert not called
    several = Engine(sensitive_model, tile=32, probe=sensitive_probe)
    with pytest.raises(ValueError, match="needs the whole-image global sums"):
        list(several.compute(img, holes, several.tiles(60, 90)))


@pytest.mark.parametrize("budget", ["all", "some", "none"])
def test_features_kept_from_pass_one_change_no_bit(sensitive_model, sensitive_probe, make_image, make_holes,
                                                   whole_forward, budget):
    # Pass 2 given pass 1's encoder features must give the very bits it gives when it runs
    # the encoder itself, whether every batch, some or none of them fit the budget; and the
    # budget must hold (nothing kept beyond it, nothing left behind).
    img, holes = make_image(100, 77, seed=11), make_holes(100, 77, seed=12)
    plain = Engine(sensitive_model, tile=32, batch_size=3, probe=sensitive_probe, workers=2)
    assert not plain.keeps_features  # CPU default: off
    sizes = {"all": 2**30, "some": 300_000, "none": 1}
    kept = Engine(sensitive_model, tile=32, batch_size=3, probe=sensitive_probe, workers=2, feature_cache=sizes[budget])
    assert kept.keeps_features and kept.global_halo == kept.halo  # pass 1 on pass 2's windows
    g, stride = sensitive_probe.global_halo, sensitive_probe.stride
    assert g >= stride
    low = Engine(sensitive_model, tile=32, halo=g - stride, probe=sensitive_probe, feature_cache=2**30)
    assert not low.keeps_features and low.global_halo == g  # a --halo too small for pass 1: its own
    cache = kept._features
    hits, peak = [], []
    put, take = cache.put, cache.take
    cache.put = lambda *a: (put(*a), peak.append(cache.used))[0]
    cache.take = lambda *a: (lambda got: (hits.append(got is not None), got)[1])(take(*a))
    out = infer_image(kept, img, holes)
    for a, b in zip(out, infer_image(plain, img, holes)):
        assert np.array_equal(a, b)
    assert_exact(out, whole_forward(sensitive_model, img, holes))
    assert max(peak) <= sizes[budget] and cache.used == 0
    expected = {"all": all, "some": lambda h: any(h) and not all(h), "none": lambda h: not any(h)}[budget]
    assert len(hits) > 3 and expected(hits), hits


def test_features_are_kept_per_image(sensitive_model, sensitive_probe, make_image, make_holes):
    # Two images' pass 1 before either's pass 2 (the scheduler's order): each pass 2 gets its
    # own image's features; features of an image whose pass 2 never comes here are dropped
    # when a later image's pass 2 starts.
    engine = Engine(sensitive_model, tile=32, probe=sensitive_probe, feature_cache=2**30)
    plain = Engine(sensitive_model, tile=32, probe=sensitive_probe)
    imgs = [(make_image(64, 64, seed=s), make_holes(64, 64, seed=s)) for s in (1, 2, 3)]
    tiles = engine.tiles(64, 64)
    sums = [engine.reduce_partials(engine.global_partials(i, m, tiles, key=k)) for k, (i, m) in enumerate(imgs)]
    for k in (1, 2):  # image 0's pass 2 went to another process
        got = [r.rgb for r in engine.compute(*imgs[k], tiles, sums[k], key=k)]
        ref = [r.rgb for r in plain.compute(*imgs[k], tiles, sums[k])]
        assert all(np.array_equal(a, b) for a, b in zip(got, ref))
        if k == 1:  # image 0's dropped, image 2's still there
            assert {key for key, _ in engine._features._entries} == {2}
    assert engine._features.used == 0


@pytest.mark.parametrize("free, want", [(80 * 2**30, 20 * 2**30), (10 * 2**30, 5 * 2**30)],
                         ids=["idle card: a quarter", "busy card: half of what is free"])
def test_the_cuda_default_cache_budget(monkeypatch, free, want):
    from tilerun.engine import default_feature_cache

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 80 * 2**30))
    assert default_feature_cache(torch.device("cuda", 0)) == want
    assert default_feature_cache(torch.device("cpu")) == 0


def _vm(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's resettable peak RSS")
def test_memory_grows_with_the_image_by_uint8_only(sensitive_model, sensitive_probe, make_image):
    # Peak RSS growth of one image, for a small and a big image: the difference is what
    # scales with the image. uint8 outputs are 4 bytes a pixel; any full-size float32
    # buffer (RGB accumulator: 12, logits: 24, weights for blending: 4 more) would at
    # least double it. The constant part (windows, allocator slack) cancels out.
    engine = Engine(sensitive_model, tile=128, batch_size=2, probe=sensitive_probe)
    infer_image(engine, make_image(300, 300, seed=1))  # allocator pools and kernels warmed up

    def peak_growth(side: int) -> tuple[int, int]:
        img = make_image(side, side, seed=side)
        holes = np.zeros((side, side), bool)
        holes[side // 3 : side // 2, side // 5 : side // 2] = True
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS to the current RSS
        before = _vm("VmRSS:")
        classes, rgb = infer_image(engine, img, holes)
        return _vm("VmHWM:") - before, classes.nbytes + rgb.nbytes

    # Allocator slack only ever adds: the least of three runs per size is the closest to
    # what the code itself holds (single runs reached 2.35x inside the full suite).
    small, small_out = min(peak_growth(1024) for _ in range(3))
    big, big_out = min(peak_growth(2560) for _ in range(3))
    scaling, outputs = big - small, big_out - small_out
    # Bound 2.5x: a full-size float32 RGB accumulator (12 bytes a pixel on top of the 4 of
    # uint8 output) makes it >= 4x, float logits far more.
    assert scaling < 2.5 * outputs, f"grew {scaling / 2**20:.1f} MB more for {outputs / 2**20:.1f} MB more uint8 output"


@pytest.mark.parametrize("preset, expected", [(None, "1"), ("0", "0")])
def test_import_asks_for_huge_pages_unless_the_user_said_otherwise(preset, expected):
    # PyTorch reads THP_MEM_ALLOC_ENABLE at its first allocation of >= 2 MB: importing tilerun
    # must set it before any (a fresh interpreter), and keep a value the user chose.
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if preset is not None:
        env["THP_MEM_ALLOC_ENABLE"] = preset
    code = "import os, tilerun; print(os.environ['THP_MEM_ALLOC_ENABLE'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected
