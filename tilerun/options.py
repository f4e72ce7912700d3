"""Options shared by the commands, defined once (rasterio's rio/options.py pattern)."""

from __future__ import annotations

import click

from .defaults import (
    DEFAULT_BATCH,
    DEFAULT_BATCH_GPU,
    DEFAULT_PRECISION,
    DEFAULT_TILE,
    DEFAULT_TILE_GPU,
    PRECISIONS,
)


class ModelSpec(click.ParamType):
    """A model file that exists, or an import path ``package.module:factory`` (not checked here:
    importing it is loading the model, which the command does)."""

    name = "MODEL"

    def convert(self, value, param, ctx):
        import os
        import re

        text = os.fspath(value)
        if os.path.isfile(text) or (text.lower().rstrip("/").endswith(".zarr") and os.path.isdir(text)):
            return text  # a zarr folder: an input, for `tilerun inspect INPUT`
        if re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*", text):
            return text
        what = "is a folder" if os.path.isdir(text) else "does not exist"
        self.fail(f"{text!r} {what}: give a model file (.safetensors, TorchScript .pt, .pt2) "
                  "or package.module:factory", param, ctx)


class DeviceSpec(click.ParamType):
    """auto, or a torch device that exists here (cpu, cuda, cuda:N, ...): a bad one is a usage
    error (exit 2) before anything is loaded, not a failure of the job."""

    name = "DEVICE"

    def convert(self, value, param, ctx):
        if value == "auto":
            return value
        import torch

        try:
            dev = torch.device(value)
        except RuntimeError:
            self.fail(f"{value!r} is not a device: use auto, cpu, cuda or cuda:N", param, ctx)
        backend = getattr(torch, dev.type, None)  # torch.cuda, torch.xpu, torch.mps: is_available()
        if dev.type != "cpu" and hasattr(backend, "is_available") and not backend.is_available():
            self.fail(f"{value}: {dev.type.upper()} is not available on this machine; use --device cpu (or auto)",
                      param, ctx)
        if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
            self.fail(f"{value}: this machine has {torch.cuda.device_count()} CUDA devices (cuda:0 ...)", param, ctx)
        return value


model_opt = click.option(
    "--model",
    "model_path",
    type=ModelSpec(),
    default=None,
    help="A .safetensors checkpoint, TorchScript (.pt), exported program (.pt2) or package.module:factory. "
    "Pickles are refused. Default: the weights shipped with tilerun.",
)
tile_opt = click.option(
    "--tile",
    type=click.IntRange(min=0),
    default=None,
    help=f"Core side of a tile in pixels, a multiple of the model stride; 0 = whole image. "
    f"Default (measured): {DEFAULT_TILE} on CPU, {DEFAULT_TILE_GPU} on CUDA.",
)
halo_opt = click.option(
    "--halo",
    type=click.IntRange(min=0),
    default=None,
    help="Context around each tile core. Default: the model's measured receptive field (exact).",
)
batch_opt = click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=None,
    help=f"Tiles per forward. Default (measured): {DEFAULT_BATCH} on CPU, {DEFAULT_BATCH_GPU} on CUDA.",
)
feature_cache_opt = click.option(
    "--feature-cache",
    "feature_cache_mib",
    type=click.IntRange(min=0),
    default=None,
    help="MiB of device memory that keep pass 1's encoder features for pass 2 (which then skips the encoder). "
    "Bounded: what does not fit is recomputed. Default on CUDA: a quarter of the GPU's memory, at most half "
    "of what is free; 0 (off) on CPU.",
)
precision_opt = click.option(
    "--precision",
    type=click.Choice(list(PRECISIONS)),
    default=DEFAULT_PRECISION,
    show_default=True,
    help="fp32 is exact (equals a whole-image forward); bf16 (CPU, CUDA) and fp16 (CUDA) autocast are "
    "faster and approximate.",
)
device_opt = click.option(
    "--device", type=DeviceSpec(), default="auto", show_default=True,
    help="auto (CUDA when available), cpu, cuda, cuda:N.",
)
max_pixels_opt = click.option(
    "--max-pixels",
    type=click.IntRange(min=0),
    default=None,
    help="Refuse images with more pixels than this (decompression-bomb guard). "
    "Default: Pillow's limit (about 89 megapixels); 0 = no limit.",
)
format_opt = click.option(
    "--format",
    "fmt",
    type=click.Choice(["png", "tiff", "ome-zarr"]),  # images.OUTPUT_FORMATS (not imported: --help stays fast)
    default="png",
    show_default=True,
    help="Output files: png; tiff (tiled, deflate; NAME.pred.tif, NAME.inpainted.tif) for images too big "
    "for PNG viewers; or ome-zarr (NGFF 0.4: NAME.inpainted.ome.zarr, the class map in its labels/pred), written "
    "chunk by chunk, for napari, QuPath and Dask. tiff needs tifffile (pip install tilerun[tiff]), ome-zarr "
    "needs zarr (pip install tilerun[ome]).",
)
level_opt = click.option(
    "--level",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Pyramid level to read of pyramidal TIFFs, OME-Zarr and whole-slide images (0: full resolution). "
    "Other inputs have only level 0.",
)
mpp_opt = click.option(
    "--mpp",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Instead of --level: read the coarsest level whose pixel size is at most this many µm "
    "(from OME, OpenSlide or TIFF resolution metadata).",
)
overwrite_opt = click.option("--overwrite", is_flag=True, help="Redo every input even if its outputs exist.")
verify_inputs_opt = click.option(
    "--verify-inputs", is_flag=True,
    help="Resume by every input's whole content (a full hash, recorded in the outputs) rather than its size, "
    "mtime and sampled blocks. Outputs of a run without it are redone.",
)
verbose_opt = click.option("-v", "--verbose", count=True, help="More output; -v also shows tracebacks.")
quiet_opt = click.option("-q", "--quiet", is_flag=True, help="Only errors.")
backend_opt = click.option(
    "--backend",
    type=click.Choice(["auto", "gloo", "nccl"]),
    default="auto",
    show_default=True,
    help="Process-group backend under torchrun: auto = NCCL with CUDA, else Gloo. "
    "Each process uses OMP_NUM_THREADS threads when set, else cores / processes per node.",
)
stall_timeout_opt = click.option(
    "--stall-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    envvar="TILERUN_STALL_TIMEOUT",  # dist.STALL_ENV (not imported: --help stays fast)
    help="Seconds a process may show no sign of life (its heartbeat) before the job stops, naming it and the "
    "work it holds. Long work is never cut short: a live process beats while it computes. [default: 600]",
)


def _radiometry_parser(parse):
    def callback(ctx, param, value):
        if value is None:
            return None
        from . import radiometry

        try:
            return getattr(radiometry, parse)(value)
        except ValueError as e:
            raise click.BadParameter(str(e), ctx, param) from None

    return callback


input_range_opt = click.option(
    "--input-range",
    default="auto",
    show_default=True,
    callback=_radiometry_parser("parse_input_range"),
    help="Values mapped to the model's 0..255: auto (8-bit as it is; 16-bit, float and other data between "
    "the 0.5th and 99.5th percentiles of each image's known values) or MIN,MAX (e.g. 0,4095), one range "
    "over the bands used. The report records each image's range.",
)
bands_opt = click.option(
    "--bands",
    default=None,
    callback=_radiometry_parser("parse_bands"),
    help="Bands as R,G,B (e.g. 4,3,2) or one band as grey (e.g. 1), numbered from 1 as in GDAL. "
    "Default: 1,2,3 (grey for one band); unused bands are warned about.",
)
nodata_opt = click.option(
    "--nodata",
    type=float,
    default=None,
    help="A value that marks missing pixels (in every band used), like alpha = 0. Default: the file's own "
    "(GDAL_NODATA). NaN is always missing.",
)
