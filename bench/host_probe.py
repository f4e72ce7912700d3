"""The writer's host-side pieces on a machine: PNG writing of 4096^2 images on 1-8 threads
(images in parallel, and one image at a time in strips on a pool), tobytes, stitching a
4096^2 image from 16 tiles; file sizes of our PNG encoder vs Pillow's; tiled TIFF writing.
Ran on the H100 host (bench/logs/gpu-h100-6-host.txt, gpu-h100-8.txt; before the TIFF
lines existed):

    python bench/host_probe.py
"""
import os, sys, time, tempfile
from pathlib import Path
import numpy as np
from concurrent.futures import ThreadPoolExecutor
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import PIL
from PIL import Image
from tilerun.images import write_png_atomic
from bench.common import photo
print("Pillow", PIL.__version__, "numpy", np.__version__, "cpus", os.cpu_count())
rgb = photo(4096); cls = (rgb[..., 0] // 16).astype(np.uint8)
d = tempfile.mkdtemp()
def enc(i, pool=None):
    write_png_atomic(rgb, Path(d) / f"r{i}.png", pool=pool)
    write_png_atomic(cls, Path(d) / f"c{i}.png", palette=[], pool=pool)
for n in (1, 2, 4, 8):
    t = time.perf_counter()
    with ThreadPoolExecutor(n) as p: list(p.map(enc, range(8)))
    print(f"{n} threads, 8 images of 4096^2 (RGB + class map): {time.perf_counter() - t:.2f} s")
for n in (2, 4, 8, 16):
    t = time.perf_counter()
    with ThreadPoolExecutor(n) as p:
        for i in range(8):
            enc(i, p)
    print(f"one image at a time, strips on {n} threads, 8 images: {time.perf_counter() - t:.2f} s")
t = time.perf_counter()
for i in range(8):
    Image.fromarray(rgb).save(Path(d) / f"p{i}.png", compress_level=1, compress_type=3)
    Image.fromarray(cls).save(Path(d) / f"q{i}.png", compress_level=1, compress_type=3)
print(f"Pillow's encoder, 1 thread, 8 images: {time.perf_counter() - t:.2f} s")
for n in (1, 4):
    t = time.perf_counter()
    with ThreadPoolExecutor(n) as p: list(p.map(lambda i: bytes(rgb.tobytes()), range(8)))
    print(f"{n} threads tobytes x8: {time.perf_counter() - t:.2f} s")
t = time.perf_counter()
for _ in range(4):
    out = np.zeros((4096, 4096, 3), np.uint8)
    for y in range(0, 4096, 1024):
        for x in range(0, 4096, 1024):
            out[y:y+1024, x:x+1024] = rgb[y:y+1024, x:x+1024]
print(f"stitch 4096^2 RGB from 16 tiles into fresh zeros: {(time.perf_counter() - t) / 4:.3f} s")
# What the encoder's one filter costs in bytes: ours vs Pillow's (five filters tried a row).
photos = [("4096^2 photo (upscaled)", rgb), ("4096^2 class map (16 classes)", cls)]
photos += [(p.name, np.asarray(Image.open(p).convert("RGB"))) for p in sorted((Path(__file__).resolve().parent.parent / "sample_images").iterdir())
           if p.suffix in (".jpg", ".png") and ".mask." not in p.name]
for name, a in photos:
    write_png_atomic(a, Path(d) / "ours.png")
    Image.fromarray(a).save(Path(d) / "pillow.png", compress_level=1, compress_type=3)
    ours, theirs = (Path(d) / "ours.png").stat().st_size, (Path(d) / "pillow.png").stat().st_size
    print(f"file size {name}: ours {ours / 1e6:.2f} MB, Pillow {theirs / 1e6:.2f} MB ({ours / theirs - 1:+.0%})")
# Tiled TIFF outputs (--format tiff): tifffile compresses 512^2 tiles on `threads`.
from tilerun.images import write_tiff_atomic
for n in (1, 2, 4):
    t = time.perf_counter()
    write_tiff_atomic(rgb, Path(d) / "t.inpainted.tif", threads=n)
    print(f"tiled TIFF, 4096^2 photo, {n} threads: {time.perf_counter() - t:.2f} s, "
          f"{(Path(d) / 't.inpainted.tif').stat().st_size / 1e6:.2f} MB")
