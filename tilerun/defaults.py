"""Defaults shared by the library and the CLI, importable without torch.

The tile and batch defaults are measured, per device kind (``python bench/tile_sweep.py``,
``--device cuda`` on a GPU, reproduces the choice; docs/exactness.md says why).
"""

# CPU (2-core Xeon, TileNet; python bench/tile_sweep.py, python bench/memory.py). With one
# single-threaded worker per core, tiles of 512, 768 and 1024 ran a 2048^2 photo within
# noise of each other (0.82, 0.84, 0.78 x a whole-image forward), but each window in
# flight costs ~1.5 KB a window pixel: two 592^2 windows (tile 512) took an 8192^2 photo
# past its 1.5 GB limit (4096^2 already peaked at 1.6 GB). 384 (windows <= 464^2) keeps
# it under, for ~10% more halo work. Batches > 1 were slower on CPU and cost memory: 1.
DEFAULT_TILE = 384
DEFAULT_BATCH = 1

#: GPU defaults, measured on an H100 (python bench/tile_sweep.py --device cuda --size 4096;
#: fp32): tile 1024 x batch 1 / 4 / 8 ran 62.5 / 68.4 / 68.6 MP/s in 1.0 / 2.0 / 2.0 GiB,
#: tile 2048 67-71 MP/s in 3.7-3.9 GiB. 1024 x 8: the speed of the best for half the memory.
#: (A forward holds tiles of one window shape and core position: at 4096^2 at most 4.)
DEFAULT_TILE_GPU = 1024
DEFAULT_BATCH_GPU = 8

#: On CUDA, 1/this of the card's memory keeps pass 1's encoder features for pass 2 (the
#: engine's ``feature_cache``): pass 2 then skips the encoder, 6-11% of a tiled run on an
#: H100 (python bench/engine_vs_whole.py --device cuda). Per 1024^2 tile in fp32 223 MiB (s0, s1, z of
#: a 1104^2 window): a 4096^2 photo 3.5 GiB, the two images a job has in flight 7 GiB.
FEATURE_CACHE_GPU_SHARE = 4  # and at most half the free memory (engine.default_feature_cache)

PRECISIONS = ("fp32", "bf16", "fp16")
DEFAULT_PRECISION = "fp32"


def default_tile(device: str) -> int:
    """The default tile core side for a device name such as ``cpu``, ``cuda`` or ``cuda:1``."""
    return DEFAULT_TILE_GPU if str(device).startswith("cuda") else DEFAULT_TILE


def default_batch(device: str) -> int:
    return DEFAULT_BATCH_GPU if str(device).startswith("cuda") else DEFAULT_BATCH
