"""A fresh process's first image on a GPU vs its next ones: CUDA's warm-up inside a CLI job.

    python bench/first_image.py

Prints CUDA init, first and cached pinned allocations (4 x 72 MB), an 8 GiB device
allocation, engine construction (model load + receptive-field probe, on the CPU) and
`infer_image` on one 4096^2 photo four times. Ran on the H100 (bench/logs/gpu-h100-10-first-image.txt).
With PYTORCH_CUDA_ALLOC_CONF=pinned_use_cuda_host_register:True,pinned_num_register_threads:8
the pinned allocations take a third of the time (the first image did not get faster).
"""
import sys, time, os
sys.path.insert(0, os.getcwd())
import torch, numpy as np
from bench.common import photo, holes
def now(): torch.cuda.synchronize(); return time.perf_counter()
t = time.perf_counter(); torch.zeros(1, device="cuda"); print(f"cuda init {time.perf_counter()-t:.3f}")
t = now(); bufs = [torch.empty(72 * 2**20, dtype=torch.uint8, pin_memory=True) for _ in range(4)]; print(f"4 x 72 MB pinned, first: {now()-t:.3f}")
del bufs
t = now(); bufs = [torch.empty(72 * 2**20, dtype=torch.uint8, pin_memory=True) for _ in range(4)]; print(f"4 x 72 MB pinned, again (cached): {now()-t:.3f}")
t = now(); g = torch.empty(8 * 2**30, dtype=torch.uint8, device="cuda"); print(f"8 GiB cudaMalloc: {now()-t:.3f}"); del g
from tilerun.engine import Engine, infer_image
from tilerun.model import load_model
t = time.perf_counter(); engine = Engine(load_model(), device="cuda"); print(f"engine (load + probe): {time.perf_counter()-t:.3f}")
img = photo(4096); m = holes(4096)
for i in range(4):
    t = now(); infer_image(engine, img, m); print(f"infer_image 4096^2 #{i}: {now()-t:.3f}")
x = torch.zeros(8, 3, 1104, 1104, device="cuda"); mm = torch.zeros(8, 1, 1104, 1104, device="cuda")
t = now()
with torch.inference_mode(): engine.model.encode(x, mm)
print(f"encode 8x1104^2 after warm: {now()-t:.3f}")
print("max allocated GiB", torch.cuda.max_memory_allocated() / 2**30, "reserved", torch.cuda.memory_reserved() / 2**30)
