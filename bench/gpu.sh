#!/bin/sh
# Issue 5, benchmark 6: the prepared GPU run (fp32 and bf16), ~5 minutes on one H100.
# Runs the CUDA code paths (pinned uint8 transfers, one batch in flight, IEEE fp32
# convolutions, autocast) against a whole-image forward on the same card, and sweeps
# the GPU tile/batch defaults (tilerun/defaults.py: DEFAULT_TILE_GPU, DEFAULT_BATCH_GPU).
# Usage: sh bench/gpu.sh > gpu.txt 2>&1
set -e
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"
python -m pytest -q tests/test_exact.py tests/test_pipeline.py -k "cuda or exact or batches"
python bench/engine_vs_whole.py --device cuda --precision fp32 --size 4096 --repeats 3
python bench/engine_vs_whole.py --device cuda --precision bf16 --size 4096 --repeats 3
python bench/tile_sweep.py --device cuda --size 4096 --tiles 512,1024,2048 --batches 2,8 --repeats 2
