"""Shared fixtures: seeded random images that are checked to be what they claim, and a
*sensitive* test model (a random-init TileNet is nearly constant, which would let a broken
tiler pass)."""

from __future__ import annotations

from typing import Callable

import numpy as np
import pytest


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """One intra-op thread unless TILERUN_TEST_THREADS says otherwise: on 2 shared cores with a
    background job, torch's second thread waits for a busy core and the receptive-field probe runs
    ~4x slower (measured: 1.7 s vs 7 s for the small TileNet below)."""
    import os

    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("TILERUN_TEST_THREADS", "1")))
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session", autouse=True)
def _probe_cache(tmp_path_factory):
    """The CLI's remembered probes (`receptive.probe_cached`) in a folder of this session's
    own, never the user's ~/.cache: the first CLI run of a model probes it, later ones reuse."""
    import os

    from tilerun.receptive import CACHE_ENV

    before = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("probe-cache"))
    yield
    if before is None:
        del os.environ[CACHE_ENV]
    else:
        os.environ[CACHE_ENV] = before


@pytest.fixture
def make_image() -> Callable[..., np.ndarray]:
    """``make_image(h, w, seed=0)``: uint8 HxWx3 noise over the full 0..255 range.

    Drawn as integers, not ``random() -> uint8`` (which is all zeros, see STYLE.md); checked.
    """

    def make(h: int, w: int, seed: int = 0) -> np.ndarray:
        img = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        if h * w >= 64:  # big enough for the check to mean something
            assert img.min() < 16 and img.max() > 239 and img.std() > 50, "fixture image is degenerate"
        return img

    return make


@pytest.fixture
def make_holes() -> Callable[..., np.ndarray]:
    """``make_holes(h, w, fraction=0.1, seed=1)``: bool HxW, True = missing: scattered pixels plus one block."""

    def make(h: int, w: int, fraction: float = 0.1, seed: int = 1) -> np.ndarray:
        mask = np.random.default_rng(seed).random((h, w)) < fraction
        mask[h // 3 : h // 3 + h // 4, w // 5 : w // 5 + w // 3] = True  # a large hole needs real filling
        if h * w >= 64:
            assert 0 < mask.mean() < 0.6, "fixture mask is degenerate"
        return mask

    return make


# The scale that makes the small TileNet below sensitive: with its default init the logits
# barely depend on the input (one class everywhere); x4 on every weight gives several classes,
# RGB spread over the whole range, and an output that changes measurably when the halo is one
# stride too small (tests/test_exact.py proves it).
SENSITIVE_SCALE = 4.0


def build_sensitive_tilenet(palette=None, prefill_radii: tuple[int, ...] = (), prefill_iterations: int = 0):
    """A small TileNet (same layer layout as the shipped one, so the same receptive field) with
    weights scaled up; a plain function so that tests can build it outside fixtures."""
    import torch

    from tilerun.model import TileNet, TileNetConfig

    cfg = TileNetConfig(classes=6, stem=8, mid=8, width=8, global_dim=8, prefill_radii=prefill_radii,
                        prefill_iterations=prefill_iterations)
    state = torch.random.get_rng_state()
    torch.manual_seed(0)  # checked in test_exact: several classes, RGB spread
    try:
        model = TileNet(cfg, palette)
        if prefill_radii:  # its RGB head starts at zero (output = the smooth pre-fill): give it weights
            model.decoder.rgb.reset_parameters()
    finally:
        torch.random.set_rng_state(state)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:  # weights, not biases
                p.mul_(SENSITIVE_SCALE)
    return model.eval()


@pytest.fixture(scope="session")
def sensitive_model():
    return build_sensitive_tilenet()


@pytest.fixture(scope="session")
def sensitive_probe(sensitive_model):
    """Measured once per session: the probe is the slow part of building an Engine."""
    from tilerun.receptive import probe_model

    return probe_model(sensitive_model)


@pytest.fixture(scope="session")
def whole_forward() -> Callable:
    """``whole_forward(model, image, mask)`` -> (classes uint8 HxW, rgb uint8 HxWx3) from ONE forward
    of the whole image, converted exactly as the engine converts tiles: the reference for exactness."""
    import torch

    def forward(model, image: np.ndarray, mask: np.ndarray | None = None):
        h, w = image.shape[:2]
        if mask is None:
            mask = np.zeros((h, w), bool)
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float().div(255)
        m = torch.from_numpy(np.ascontiguousarray(mask))[None, None].float()
        with torch.inference_mode():
            out = model(x, m)
        logits, rgb = out if isinstance(out, (tuple, list)) else (None, out)
        classes = None if logits is None else logits.argmax(1)[0].to(torch.uint8).numpy()
        rgb8 = None if rgb is None else rgb[0].clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        return classes, rgb8

    return forward
