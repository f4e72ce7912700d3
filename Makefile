PY ?= python3
OUT ?= out
NPROC ?= 2

.PHONY: install test test-isa run run-dist bench clean

# torch first: the pinned CPU wheel is on this machine's disk; an unpinned torch
# would pull a multi-GB CUDA build. A machine that already has torch keeps it.
install:
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "torch==2.13.0"
	$(PY) -m pip install -e ".[dev]"

test:
	$(PY) -m pytest -q

# The tests that promise the same bytes (tile batches, feature cache, CLI runs) with other
# kernels than this CPU's best: ATen's portable ones with oneDNN and MKL held to SSE4.x (oneDNN
# then convolves by im2col + its own GEMM), and all held to AVX2 (an AVX-512 / AMX machine then
# runs what an AMD EPYC runs). The bytes must not depend on the instruction set.
ISA_TESTS ?= tests/test_exact.py tests/test_coarse.py tests/test_cli_core.py tests/test_pipeline.py::test_features_kept_from_pass_one_change_no_bit
test-isa:
	ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 MKL_ENABLE_INSTRUCTIONS=SSE4_2 $(PY) -m pytest -q $(ISA_TESTS)
	ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 $(PY) -m pytest -q $(ISA_TESTS)

run:
	$(PY) -m tilerun run sample_images $(OUT)

run-dist:
	$(PY) -m torch.distributed.run --standalone --nproc-per-node $(NPROC) -m tilerun run sample_images $(OUT)

clean:
	rm -rf $(OUT) .pytest_cache build *.egg-info

# The shipped weights (docs/training.md) and the inpainting-quality benchmark.
# coffee and chelsea stay out of training; bench/quality.py measures on data/photos.csv's test split.
# Fourteen stages: stage 1 without the class prior (1500 steps, batch 4); stage 2 adds the
# class prior and a hole MSE term and continues from stage 1 (800 steps, batch 8, lower
# peak rate); stage 3 continues at half that rate (400 steps); stage 4 is the long run
# (16000 steps in bf16 autocast, which AMX makes ~1.5x faster per step on this CPU, with
# rotations and channel permutations of the crops: --augment); stage 5 adds the three
# photos of train_photos/ (8000 steps at half stage 4's peak rate; it keeps stage 4's
# palette); stage 6 continues stage 5 at a lower rate (6000 steps); stage 7 (below) merges two
# replicas trained in parallel from stage 6; stages 8 to 14 are described below. Each stage resumes its
# own checkpoint if one exists, so an interrupted `make weights` picks up where it was.
WEIGHTS_DIR ?= build/weights
TRAIN_ARGS = sample_images train_images --exclude 'coffee.*' --exclude 'chelsea.*' --crop 96 --classes 16 \
	--seed 0 --checkpoint-every 50
STAGE2_STEPS ?= 800
STAGE4_STEPS ?= 16000
STAGE5_STEPS ?= 8000
STAGE6_STEPS ?= 6000
# Stage 8 (docs/training.md): the whole-image coarse context (--coarse-scale 16) switched on, fine-tuned
# with big boxes and blobs on 128-px crops, the train split of data/photos.csv added.
STAGE8_STEPS ?= 400
# Stage 9: the class prior from the filled classes around a hole (--class-fill), fine-tuned from stage 8
# with new crops (seed 9) and fewer big holes.
STAGE9_STEPS ?= 3000
# Stage 10: the slope continuation in the pre-fill (--slope-fill), fine-tuned from stage 9 with the
# rendered artwork of data/photos.csv (train-art) added.
STAGE10_STEPS ?= 3000
# Stage 11: the coarse context filled biharmonically (--coarse-biharmonic), fine-tuned from stage 10
# with the second batch of rendered artwork of data/photos.csv (train-art2) added.
STAGE11_STEPS ?= 3000
# Stage 12: an L1 loss on the RGB correction where the far field leaves it out (--idle-weight),
# fine-tuned from stage 11.
STAGE12_STEPS ?= 3000
# Stage 13: stage 12 with the coarse context's class shares in 32-px cells (class_cells=2), switched
# without training: it adds no parameter, and a fine-tune scored no better (docs/training.md).
# Stage 14: fine-tuned from stage 13 with each crop given its whole picture's global features and
# coarse context (--picture-context), as inference gives a tile its image's.
STAGE14_STEPS ?= 3000
PHOTOS_DIR ?= build/photos
.PHONY: weights bench-quality quality photos
# The pictures of data/photos.csv (Debian's plasma-workspace-wallpapers, pinned), split by file.
photos:
	$(PY) data/fetch_photos.py --out $(PHOTOS_DIR)

weights:
	mkdir -p $(WEIGHTS_DIR)
	$(PY) -m tilerun train $(TRAIN_ARGS) --no-class-prior --steps 1500 --batch-size 4 \
		--out $(WEIGHTS_DIR)/stage1.safetensors $(if $(wildcard $(WEIGHTS_DIR)/stage1.safetensors),--resume)
	$(PY) -m tilerun train $(TRAIN_ARGS) --class-prior --steps $(STAGE2_STEPS) --batch-size 8 --lr 1e-3 --l2-weight 50 \
		--init-from $(WEIGHTS_DIR)/stage1.safetensors \
		--out $(WEIGHTS_DIR)/stage2.safetensors $(if $(wildcard $(WEIGHTS_DIR)/stage2.safetensors),--resume)
	$(PY) -m tilerun train $(TRAIN_ARGS) --class-prior --steps 400 --batch-size 8 --lr 5e-4 --l2-weight 50 \
		--init-from $(WEIGHTS_DIR)/stage2.safetensors \
		--out $(WEIGHTS_DIR)/stage3.safetensors $(if $(wildcard $(WEIGHTS_DIR)/stage3.safetensors),--resume)
	$(PY) -m tilerun train $(TRAIN_ARGS) --class-prior --steps $(STAGE4_STEPS) --batch-size 8 --lr 1e-3 --l2-weight 50 \
		--precision bf16 --augment --checkpoint-every 250 --init-from $(WEIGHTS_DIR)/stage3.safetensors \
		--out $(WEIGHTS_DIR)/stage4.safetensors $(if $(wildcard $(WEIGHTS_DIR)/stage4.safetensors),--resume)
	$(PY) -m tilerun train $(TRAIN_ARGS) train_photos --class-prior --steps $(STAGE5_STEPS) --batch-size 8 --lr 5e-4 \
		--l2-weight 50 --precision bf16 --augment --checkpoint-every 250 --init-from $(WEIGHTS_DIR)/stage4.safetensors \
		--out $(WEIGHTS_DIR)/stage5.safetensors $(if $(wildcard $(WEIGHTS_DIR)/stage5.safetensors),--resume)
	$(PY) -m tilerun train $(TRAIN_ARGS) train_photos --class-prior --steps $(STAGE6_STEPS) --batch-size 8 --lr 3e-4 \
		--l2-weight 50 --precision bf16 --augment --checkpoint-every 250 --init-from $(WEIGHTS_DIR)/stage5.safetensors \
		--out $(WEIGHTS_DIR)/stage6.safetensors $(if $(wildcard $(WEIGHTS_DIR)/stage6.safetensors),--resume)
	$(MAKE) --no-print-directory stage7
	$(MAKE) --no-print-directory photos
	$(PY) -m tilerun train $(TRAIN_ARGS) train_photos $(PHOTOS_DIR)/train --crop 128 --class-prior --steps $(STAGE8_STEPS) \
		--batch-size 4 --lr 3e-4 --l2-weight 50 --augment --coarse-scale 16 --big-holes 0.5 --checkpoint-every 25 \
		--init-from $(WEIGHTS_DIR)/stage7.safetensors \
		--out $(WEIGHTS_DIR)/stage8.safetensors $(if $(wildcard $(WEIGHTS_DIR)/stage8.safetensors),--resume)
	$(PY) -m tilerun train $(TRAIN_ARGS) train_photos $(PHOTOS_DIR)/train --crop 128 --class-prior --class-fill \
		--steps $(STAGE9_STEPS) --batch-size 4 --lr 3e-4 --l2-weight 50 --augment --coarse-scale 16 --big-holes 0.3 \
		--seed 9 --checkpoint-every 500 --init-from $(WEIGHTS_DIR)/stage8.safetensors \
		--out $(WEIGHTS_DIR)/stage9.safetensors $(if $(wildcard $(WEIGHTS_DIR)/stage9.safetensors),--resume)
	$(PY) -m tilerun train $(TRAIN_ARGS) train_photos $(PHOTOS_DIR)/train $(PHOTOS_DIR)/train-art --crop 128 --class-prior \
		--class-fill --slope-fill --steps $(STAGE10_STEPS) --batch-size 4 --lr 3e-4 --l2-weight 50 --augment \
		--coarse-scale 16 --big-holes 0.3 --seed 10 --checkpoint-every 500 --init-from $(WEIGHTS_DIR)/stage9.safetensors \
		--out $(WEIGHTS_DIR)/stage10.safetensors $(if $(wildcard $(WEIGHTS_DIR)/stage10.safetensors),--resume)
	$(MAKE) --no-print-directory stage11
	$(MAKE) --no-print-directory stage12
	$(MAKE) --no-print-directory stage13
	$(MAKE) --no-print-directory stage14
	install -m 644 $(WEIGHTS_DIR)/stage14.safetensors tilerun/weights/default.safetensors

# Stage 7: two replicas of stage 6's recipe at lower rate (seeds 1 and 2, 3000 steps) trained
# in parallel, one thread each, then merged by averaging their weights (`tilerun merge`).
# Replica b runs --quiet so that one progress bar shows.
STAGE7_ARGS = $(TRAIN_ARGS) train_photos --class-prior --steps 3000 --batch-size 8 --lr 3e-4 --l2-weight 50 \
	--precision bf16 --augment --checkpoint-every 250 --init-from $(WEIGHTS_DIR)/stage6.safetensors
.PHONY: stage7 stage11 stage12 stage13 stage14
stage11:
	$(PY) -m tilerun train $(TRAIN_ARGS) train_photos $(PHOTOS_DIR)/train $(PHOTOS_DIR)/train-art $(PHOTOS_DIR)/train-art2 \
		--crop 128 --class-prior --class-fill --slope-fill --coarse-biharmonic --steps $(STAGE11_STEPS) --batch-size 4 \
		--lr 3e-4 --l2-weight 50 --augment --coarse-scale 16 --big-holes 0.3 --seed 11 --checkpoint-every 500 \
		--init-from $(WEIGHTS_DIR)/stage10.safetensors \
		--out $(WEIGHTS_DIR)/stage11.safetensors $(if $(wildcard $(WEIGHTS_DIR)/stage11.safetensors),--resume)
stage12:
	$(PY) -m tilerun train $(TRAIN_ARGS) train_photos $(PHOTOS_DIR)/train $(PHOTOS_DIR)/train-art $(PHOTOS_DIR)/train-art2 \
		--crop 128 --class-prior --class-fill --slope-fill --coarse-biharmonic --idle-weight 1 --steps $(STAGE12_STEPS) \
		--batch-size 4 --lr 3e-4 --l2-weight 50 --augment --coarse-scale 16 --big-holes 0.3 --seed 12 \
		--checkpoint-every 500 --init-from $(WEIGHTS_DIR)/stage11.safetensors \
		--out $(WEIGHTS_DIR)/stage12.safetensors $(if $(wildcard $(WEIGHTS_DIR)/stage12.safetensors),--resume)
stage13:
	$(PY) -m tilerun switch $(WEIGHTS_DIR)/stage12.safetensors --set class_cells=2 --overwrite \
		--out $(WEIGHTS_DIR)/stage13.safetensors
stage14:
	$(PY) -m tilerun train $(TRAIN_ARGS) train_photos $(PHOTOS_DIR)/train $(PHOTOS_DIR)/train-art $(PHOTOS_DIR)/train-art2 \
		--crop 128 --class-prior --class-fill --class-cells 2 --slope-fill --coarse-biharmonic --idle-weight 1 \
		--picture-context --steps $(STAGE14_STEPS) --batch-size 4 --lr 3e-4 --l2-weight 50 --augment --coarse-scale 16 \
		--big-holes 0.3 --seed 16 --checkpoint-every 500 --init-from $(WEIGHTS_DIR)/stage13.safetensors \
		--out $(WEIGHTS_DIR)/stage14.safetensors $(if $(wildcard $(WEIGHTS_DIR)/stage14.safetensors),--resume)
stage7:
	OMP_NUM_THREADS=1 $(PY) -m tilerun train $(STAGE7_ARGS) --seed 1 --out $(WEIGHTS_DIR)/stage7a.safetensors \
		$(if $(wildcard $(WEIGHTS_DIR)/stage7a.safetensors),--resume) & a=$$!; \
	OMP_NUM_THREADS=1 $(PY) -m tilerun train $(STAGE7_ARGS) --seed 2 --out $(WEIGHTS_DIR)/stage7b.safetensors --quiet \
		$(if $(wildcard $(WEIGHTS_DIR)/stage7b.safetensors),--resume) & b=$$!; \
	wait $$a; ra=$$?; wait $$b; rb=$$?; test $$ra = 0 && test $$rb = 0
	$(PY) -m tilerun merge $(WEIGHTS_DIR)/stage7a.safetensors $(WEIGHTS_DIR)/stage7b.safetensors --overwrite \
		--out $(WEIGHTS_DIR)/stage7.safetensors

# Hole PSNR / SSIM / class accuracy on the test split, and the picture sheet for the README.
quality bench-quality: photos
	$(PY) -c "import cv2, skimage" 2>/dev/null || $(PY) -m pip install opencv-python-headless scikit-image
	$(PY) bench/quality.py --write BENCHMARKS.md --figure docs/quality.png

# Performance benchmarks (bench/*.py; results, commands and machine in BENCHMARKS.md).
# monai is installed with torch pinned to the version already here, so pip cannot swap torch.
BENCH_OUT ?= build/bench
.PHONY: bench
bench:
	mkdir -p $(BENCH_OUT)
	$(PY) -c "import monai" 2>/dev/null || { \
		$(PY) -c "import torch; print('torch==' + torch.__version__)" > $(BENCH_OUT)/torch-pin.txt && \
		$(PY) -m pip install "monai>=1.3" -c $(BENCH_OUT)/torch-pin.txt; }
	$(PY) bench/engine_vs_whole.py > $(BENCH_OUT)/engine_vs_whole.txt && cat $(BENCH_OUT)/engine_vs_whole.txt
	$(PY) bench/monai_compare.py > $(BENCH_OUT)/monai_compare.txt && cat $(BENCH_OUT)/monai_compare.txt
	$(PY) bench/end_to_end.py > $(BENCH_OUT)/end_to_end.txt && cat $(BENCH_OUT)/end_to_end.txt
	$(PY) bench/flops.py > $(BENCH_OUT)/flops.txt && cat $(BENCH_OUT)/flops.txt
	$(PY) bench/memory.py > $(BENCH_OUT)/memory.txt && cat $(BENCH_OUT)/memory.txt
	$(PY) bench/tile_sweep.py > $(BENCH_OUT)/tile_sweep.txt && cat $(BENCH_OUT)/tile_sweep.txt
	$(PY) bench/infer_loop.py > $(BENCH_OUT)/infer_loop.txt && cat $(BENCH_OUT)/infer_loop.txt
	$(PY) bench/png_codecs.py > $(BENCH_OUT)/png_codecs.txt && cat $(BENCH_OUT)/png_codecs.txt
	$(PY) bench/formats_8192.py > $(BENCH_OUT)/formats_8192.txt && cat $(BENCH_OUT)/formats_8192.txt
	$(MAKE) bench-dist
	$(MAKE) bench-scale

# Host-side scale-out: 1, 2 and 4 processes with a model that sleeps like an 8 MP/s card.
.PHONY: bench-scale
bench-scale:
	mkdir -p $(BENCH_OUT)
	$(PY) bench/scale_out.py --repeats 2 > $(BENCH_OUT)/scale_out.txt && cat $(BENCH_OUT)/scale_out.txt
	$(PY) bench/part_store_layout.py > $(BENCH_OUT)/part_store_layout.txt && cat $(BENCH_OUT)/part_store_layout.txt
	$(PY) bench/ownership_tail.py > $(BENCH_OUT)/ownership_tail.txt && cat $(BENCH_OUT)/ownership_tail.txt

# Distributed speed-up: torchrun 2 processes x 1 thread vs 1 process x 1 thread.
.PHONY: bench-dist
bench-dist:
	mkdir -p $(BENCH_OUT)
	$(PY) bench/dist_scaling.py --repeats 2 > $(BENCH_OUT)/dist_scaling.txt && cat $(BENCH_OUT)/dist_scaling.txt
