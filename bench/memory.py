"""Benchmark 4: peak RSS of one process for 1024^2, 4096^2 and 8192^2 photos.

    python bench/memory.py [--sizes 1024,4096,8192] [--cli-sizes 1024,8192] [--tiff]

Each measurement is a fresh subprocess reading its own peak (ru_maxrss):

* ``library``: decode the JPEG (tilerun.images.load_image), build the Engine with its
  defaults (the receptive-field probe included), `infer_image`, encode and write both
  PNGs; also the peak from inference on, with the probe's peak excluded (Linux
  /proc/self/clear_refs), and the uint8 arrays that must scale with the image;
* ``cli``: ``python -m tilerun run PHOTO OUT`` (ru_maxrss of the child).

``--tiff``: the CLI's photo is a tiled TIFF (read by tifffile) and its outputs are tiled
TIFFs (``--format tiff``), with ``--max-pixels 0``: for photos past Pillow's comfortable
range, e.g. ``--sizes "" --cli-sizes 16384 --tiff``.

Limit: 1.5 GB for the 8192^2 photo. Pillow's decompression-bomb limit
(89.5 MP by default) is above 8192^2 = 67.1 MP, so no --max-pixels is needed.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import holes, machine, photo, vm_mb  # noqa: E402

LIMIT_MB = 1536


def child(path: Path, out: Path) -> None:

    from tilerun.engine import Engine, infer_image
    from tilerun.images import InputItem, load_image, write_png_atomic
    from tilerun.model import load_model

    model = load_model()
    engine = Engine(model)
    after_probe = vm_mb("VmHWM:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # from here on: the image's share
    image, mask = load_image(InputItem(path, Path(path.name)))
    arrays = image.nbytes + mask.nbytes
    classes, rgb = infer_image(engine, image, mask)
    arrays += classes.nbytes + rgb.nbytes
    write_png_atomic(classes, out / "x.pred.png", palette=model.palette)
    write_png_atomic(rgb, out / "x.inpainted.png")
    print(json.dumps({
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "probe_peak_mb": after_probe,
        "image_phase_peak_mb": vm_mb("VmHWM:"),
        "uint8_arrays_mb": arrays / 2**20,
        "tile": engine.tile, "batch": engine.batch_size,
    }))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1024,4096,8192")
    ap.add_argument("--cli-sizes", default="1024,8192")
    ap.add_argument("--tiff", action="store_true", help="CLI: tiled TIFF in and out, no pixel limit")
    ap.add_argument("--child", nargs=2, type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(*a.child)
        return

    from PIL import Image

    print(machine())
    lib_sizes = [int(s) for s in a.sizes.split(",") if s]
    cli_sizes = [int(s) for s in a.cli_sizes.split(",") if s]
    sizes = sorted(set(lib_sizes) | set(cli_sizes))
    with tempfile.TemporaryDirectory(prefix="tilerun-mem-") as tmp:
        tmp = Path(tmp)
        for size in sizes:
            folder = tmp / f"in{size}"
            folder.mkdir()
            path = folder / f"photo{size}.{'tif' if a.tiff else 'jpg'}"
            if a.tiff:
                import tifffile

                tifffile.imwrite(path, photo(size), photometric="rgb", tile=(512, 512), compression="zlib")
            else:
                Image.fromarray(photo(size)).save(path, quality=92)
            Image.fromarray(holes(size).astype("uint8") * 255).save(folder / f"photo{size}.mask.png")
            if size in lib_sizes:
                out = tmp / f"lib{size}"
                out.mkdir()
                r = subprocess.run([sys.executable, __file__, "--child", str(path), str(out)],
                                   capture_output=True, text=True, check=True)
                d = json.loads(r.stdout.strip().splitlines()[-1])
                verdict = "" if size != 8192 else ("  OK (<= 1.5 GB)" if d["peak_mb"] <= LIMIT_MB else "  OVER 1.5 GB")
                print(f"library {size}^2: peak RSS {d['peak_mb']:.0f} MB{verdict}; probe phase {d['probe_peak_mb']:.0f} MB; "
                      f"image phase {d['image_phase_peak_mb']:.0f} MB, of which uint8 image/mask/outputs "
                      f"{d['uint8_arrays_mb']:.0f} MB (tile {d['tile']}, batch {d['batch']})", flush=True)
            if size in cli_sizes:
                # A wrapper process whose only child is the CLI: its RUSAGE_CHILDREN peak is the CLI's alone.
                wrapper = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
                           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
                r = subprocess.run([sys.executable, "-c", wrapper, sys.executable, "-m", "tilerun", "run", str(folder),
                                    str(tmp / f"cli{size}"), "--device", "cpu", "-q",
                                    *(["--format", "tiff", "--max-pixels", "0"] if a.tiff else [])],
                                   capture_output=True, text=True, check=True)
                peak = int(r.stdout.strip().splitlines()[-1])
                note = "" if size != 8192 else ("  OK (<= 1.5 GB)" if peak / 1024 <= LIMIT_MB else "  OVER 1.5 GB")
                kind = " (tiled TIFF in and out)" if a.tiff else ""
                print(f"cli {size}^2{kind}: peak RSS {peak / 1024:.0f} MB{note}; uint8 image, mask and outputs "
                      f"{size * size * 8 / 2**20:.0f} MB", flush=True)


if __name__ == "__main__":
    main()
