"""Options shared by the commands, defined once (rasterio's rio/options.py pattern)."""

from __future__ import annotations

import click

from .defaults import DEFAULT_BATCH, DEFAULT_TILE

model_opt = click.option(
    "--model",
    "model_path",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Model weights (.safetensors). Default: the weights shipped with tilerun.",
)
tile_opt = click.option(
    "--tile",
    type=int,
    default=DEFAULT_TILE,
    show_default=True,
    help="Core side of a tile in pixels, a multiple of the model stride; 0 = whole image.",
)
halo_opt = click.option(
    "--halo",
    type=int,
    default=None,
    help="Context around each tile core. Default: the model's measured receptive field (exact).",
)
batch_opt = click.option("--batch-size", type=int, default=DEFAULT_BATCH, show_default=True, help="Tiles per forward.")
device_opt = click.option(
    "--device", default="auto", show_default=True, help="auto (CUDA when available), cpu, cuda, cuda:N."
)
overwrite_opt = click.option("--overwrite", is_flag=True, help="Redo every input even if its outputs exist.")
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
