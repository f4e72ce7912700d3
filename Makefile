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
