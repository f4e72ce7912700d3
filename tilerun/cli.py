"""The tilerun command: thin click commands over the library. torch is imported inside commands."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click

from . import options as o

log = logging.getLogger("tilerun")


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.ERROR if quiet else logging.DEBUG if verbose > 1 else logging.INFO
    logging.basicConfig(level=level, format="tilerun: %(message)s", stream=sys.stderr, force=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tilerun")
def main() -> None:
    """Exact tiled inference of an image model over folders of images: class maps and inpainting."""


@main.command()
@click.argument("input_path", metavar="INPUT", type=click.Path(exists=True, path_type=Path))
@click.argument("output", metavar="OUTPUT", type=click.Path(file_okay=False, path_type=Path))
@o.model_opt
@o.tile_opt
@o.halo_opt
@o.batch_opt
@o.device_opt
@o.backend_opt
@click.option("--mask-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Folder of sidecar masks NAME.mask.png at the inputs' relative paths (nonzero = missing).")
@o.overwrite_opt
@o.verbose_opt
@o.quiet_opt
def run(input_path, output, model_path, tile, halo, batch_size, device, backend, mask_dir, overwrite, verbose, quiet):
    """Run the model over INPUT (an image or a folder, recursive) into the folder OUTPUT.

    For a/b/NAME.ext writes OUTPUT/a/b/NAME.pred.png (class map, palette PNG) and
    OUTPUT/a/b/NAME.inpainted.png. Missing pixels: alpha = 0, or a sidecar NAME.mask.png.
    """
    _setup_logging(verbose, quiet)
    import torch

    from .dist import launched_by_torchrun, session
    from .errors import DistributedError

    if backend == "nccl" and not torch.cuda.is_available():
        raise click.UsageError("--backend nccl needs CUDA; use --backend gloo (or auto) on CPU")
    if launched_by_torchrun() and int(os.environ["RANK"]) != 0:
        logging.getLogger("tilerun").setLevel(logging.ERROR)  # other ranks print nothing but errors
    try:
        with session(backend=backend, device=device) as ctx:
            summary = _run(ctx, input_path, output, model_path=model_path, tile=tile, halo=halo,
                           batch_size=batch_size, mask_dir=mask_dir)
    except DistributedError as e:
        raise click.ClickException(str(e)) from e
    if summary is None:  # not rank 0: rank 0 reports for the job
        sys.exit(0)
    log.info("%d ok, %d failed, %d skipped in %.1fs -> %s", summary.ok, summary.failed, summary.skipped,
             summary.seconds, output)
    sys.exit(1 if summary.failed else 0)


def _run(ctx, input_path, output, *, model_path, tile, halo, batch_size, mask_dir):
    from .engine import Engine
    from .images import find_inputs
    from .model import load_model
    from .runner import run_job

    model = load_model(model_path)
    try:
        engine = Engine(model, tile=tile, halo=halo, batch_size=batch_size, device=ctx.device)
    except ValueError as e:
        raise click.UsageError(str(e)) from e
    items = find_inputs(input_path, exclude=[output])
    if not items:
        raise click.UsageError(f"no images found in {input_path}")
    return run_job(ctx, engine, items, output, mask_dir=mask_dir, palette=getattr(model, "palette", None))
