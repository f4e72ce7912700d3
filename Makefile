PY ?= python3
OUT ?= out
NPROC ?= 2

.PHONY: install test run run-dist bench clean

# torch first: the pinned CPU wheel is on this machine's disk; an unpinned torch
# would pull a multi-GB CUDA build. A machine that already has torch keeps it.
install:
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "torch==2.13.0"
	$(PY) -m pip install -e ".[dev]"

test:
	$(PY) -m pytest -q

run:
	$(PY) -m tilerun run sample_images $(OUT)

run-dist:
	$(PY) -m torch.distributed.run --standalone --nproc-per-node $(NPROC) -m tilerun run sample_images $(OUT)

clean:
	rm -rf $(OUT) .pytest_cache build *.egg-info

# Issue 4: the shipped weights and the inpainting-quality benchmark.
# coffee and chelsea are held out of training: bench/quality.py measures on them.
WEIGHTS_STEPS ?= 1500
WEIGHTS_OUT ?= build/weights/default.safetensors
.PHONY: weights bench-quality
weights:
	mkdir -p $(dir $(WEIGHTS_OUT))
	$(PY) -m tilerun train sample_images train_images --exclude 'coffee.*' --exclude 'chelsea.*' \
		--out $(WEIGHTS_OUT) --steps $(WEIGHTS_STEPS) --crop 96 --batch-size 4 --classes 16 --seed 0 \
		--checkpoint-every 25 $(if $(wildcard $(WEIGHTS_OUT)),--resume)
	cp $(WEIGHTS_OUT) tilerun/weights/default.safetensors

bench-quality:
	$(PY) -c "import cv2, skimage" 2>/dev/null || $(PY) -m pip install opencv-python-headless scikit-image
	$(PY) bench/quality.py --write BENCHMARKS.md
