"""The tilerun command: thin click commands over the library. torch is imported inside commands."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import click

from . import options as o

log = logging.getLogger("tilerun")


class _SettingsError(click.ClickException):
    """A refusal the user fixes with an option (--overwrite, --model): exit 2, like click's usage errors."""

    exit_code = 2


@contextlib.contextmanager
def _error_boundary(verbose: int) -> Iterator[None]:
    """The command's last line of defence: one line per error, a traceback only with -v.

    Per-input failures never get here (the scheduler turns them into report lines);
    this is for the job as a whole: settings refused, OUTPUT unwritable, bugs.
    """
    from .errors import ModelLoadError, OutputExistsError, TilerunError

    try:
        yield
    except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
        raise
    except (OutputExistsError, ModelLoadError) as e:
        log.debug("traceback", exc_info=verbose > 0)
        raise _SettingsError(str(e)) from e
    except (TilerunError, OSError) as e:
        log.debug("traceback", exc_info=verbose > 0)
        raise click.ClickException(str(e)) from e
    except Exception as e:  # a bug: say so, and how to see where
        if verbose:
            raise
        raise click.ClickException(f"internal error: {type(e).__name__}: {e} (rerun with -v for the traceback)") from e


@contextlib.contextmanager
def _interrupts(output: Path, *, started: float) -> Iterator[None]:
    """Ctrl-C and SIGTERM end the command with 128 + the signal (130, 143: the shell's
    convention) and one line saying what was done and that a rerun resumes.

    Both signals raise `errors.Interrupted` in the main thread, once: the job writes its
    report on the way out (`runner.run_job`). Later signals are ignored meanwhile -- under
    torchrun each worker gets Ctrl-C from the terminal and again from the agent (which sends
    SIGKILL to a worker that outstays 30 s); batch schedulers send SIGTERM.
    """
    from .errors import Interrupted

    received: list[int] = []

    def handler(signum, frame):
        if not received:
            received.append(signum)
            raise Interrupted(signum)

    main = threading.current_thread() is threading.main_thread()  # only it may set handlers
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        yield
    except Interrupted as e:
        from .report import summary_line

        if os.environ.get("RANK", "0") == "0":  # -q too: the status alone would not say that a rerun resumes
            seconds = time.perf_counter() - started
            log.error("%s", summary_line(e.results, seconds=seconds, out_dir=output, interrupted=e.signal_name)
                      if e.report else f"interrupted by {e.signal_name}; rerunning the same command resumes")
        sys.exit(128 + e.signum)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _check_output(output: Path) -> None:
    """OUTPUT is a folder; a name like an image file (``out/x.png``) is a mistake, refused
    before anything is written, unless that folder exists."""
    from .images import IMAGE_EXTENSIONS, OUTPUT_FORMATS, output_suffixes

    suffixes = {*IMAGE_EXTENSIONS, *(Path(s).suffix for f in OUTPUT_FORMATS for s in output_suffixes(f).values())}
    suffixes.discard("")  # ome-zarr's class map is a folder inside its image's (labels/pred)
    if not output.is_dir() and output.suffix.lower() in suffixes:
        raise click.UsageError(
            f"OUTPUT {output} looks like an image file name, but OUTPUT is the folder the outputs go into "
            f"(NAME.pred.png, NAME.inpainted.png); give a folder, e.g. {output.with_suffix('')}"
        )


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.ERROR if quiet else logging.DEBUG if verbose > 1 else logging.INFO
    logging.basicConfig(level=level, format="tilerun: %(message)s", stream=sys.stderr, force=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tilerun")
@click.pass_context
def main(ctx: click.Context) -> None:
    """Exact tiled inference of an image model over folders of images: class maps and inpainting."""
    # Before the command's options are parsed (--device imports torch): the summary's seconds
    # are the whole command's, as a user's clock sees them.
    ctx.meta["tilerun.started"] = time.perf_counter()


@main.command()
@click.argument("input_path", metavar="INPUT", type=click.Path(exists=True, path_type=Path))
@click.argument("output", metavar="OUTPUT", type=click.Path(file_okay=False, path_type=Path))
@o.model_opt
@o.tile_opt
@o.halo_opt
@o.batch_opt
@o.precision_opt
@o.feature_cache_opt
@o.device_opt
@o.backend_opt
@click.option("--mask-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Folder of sidecar masks NAME.mask.png at the inputs' relative paths (nonzero = missing).")
@o.max_pixels_opt
@o.input_range_opt
@o.bands_opt
@o.nodata_opt
@o.level_opt
@o.mpp_opt
@o.format_opt
@o.overwrite_opt
@o.verify_inputs_opt
@o.stall_timeout_opt
@click.option("--preview", is_flag=True, help="Also write NAME.preview.png: input with holes | class map | "
              "inpainted, with a legend (at most 1024 px a side).")
@click.option("--shared-output/--no-shared-output", "shared_output", default=None,
              help="Whether every process (node) sees the same OUTPUT folder. Default: tested at start. "
              "Shared: a big image's tiles meet in OUTPUT/.tilerun-parts; not shared: over the process group.")
@click.option("--strict", is_flag=True, help="Under torchrun, exit 1 when any input failed (the default there "
              "is 0: see Exit status in the README). Without torchrun a failed input always means exit 1.")
@o.verbose_opt
@o.quiet_opt
def run(input_path, output, model_path, tile, halo, batch_size, precision, feature_cache_mib, device, backend,
        mask_dir, max_pixels, input_range, bands, nodata, level, mpp, fmt, overwrite, verify_inputs, stall_timeout,
        preview, shared_output, strict, verbose, quiet):
    """Run the model over INPUT (an image or a folder, recursive) into the folder OUTPUT.

    For a/b/NAME.ext writes OUTPUT/a/b/NAME.pred.png (class map, palette PNG) and
    OUTPUT/a/b/NAME.inpainted.png (with --format tiff: .tif). Missing pixels: alpha = 0, or a
    sidecar NAME.mask.png.

    Exit status: 0 every input done (or already done); 1 some inputs failed (listed in
    OUTPUT/tilerun-report.json; under torchrun only with --strict); 2 usage; 130 Ctrl-C,
    143 SIGTERM (the report says what was done; rerunning the same command resumes).
    """
    started = click.get_current_context().meta.get("tilerun.started", time.perf_counter())
    _setup_logging(verbose, quiet)
    _check_output(output)
    with _interrupts(output, started=started):
        import torch

        from .dist import launched_by_torchrun, session
        from .errors import DistributedError

        if backend == "nccl" and not torch.cuda.is_available():
            raise click.UsageError("--backend nccl needs CUDA; use --backend gloo (or auto) on CPU")
        if fmt == "tiff":
            from . import tiff

            if tiff.tifffile is None:
                raise click.UsageError("--format tiff needs tifffile: pip install tilerun[tiff] (or use --format png)")
        if fmt == "ome-zarr" and preview:
            raise click.UsageError("--preview draws PNG or TIFF outputs; an OME-Zarr opens as a pyramid in napari "
                                   "or QuPath (or use --format png)")
        if fmt == "ome-zarr":
            try:
                import zarr  # noqa: F401
            except ImportError:
                raise click.UsageError("--format ome-zarr needs zarr: pip install tilerun[ome] (or use --format png)")
        if launched_by_torchrun() and int(os.environ["RANK"]) != 0:
            logging.getLogger("tilerun").setLevel(logging.ERROR)  # other ranks print nothing but errors
        from .images import set_max_pixels, set_radiometry
        from .radiometry import RadiometrySpec
        from .report import summary_line

        if max_pixels is not None:
            set_max_pixels(None if max_pixels == 0 else max_pixels)
        set_radiometry(RadiometrySpec(input_range=input_range, bands=bands, nodata=nodata))
        if level and mpp is not None:
            raise click.UsageError("give --level or --mpp, not both")
        from .sources import set_level

        set_level(level=level, mpp=mpp)
        with _error_boundary(verbose):
            try:
                with session(backend=backend, device=device, stall=stall_timeout) as ctx:
                    summary = _run(ctx, input_path, output, model_path=model_path, tile=tile, halo=halo,
                                   batch_size=batch_size, precision=precision, feature_cache_mib=feature_cache_mib,
                                   mask_dir=mask_dir, overwrite=overwrite, preview=preview, verbose=verbose,
                                   quiet=quiet, fmt=fmt, started=started, verify_inputs=verify_inputs,
                                   shared_output=shared_output)
            except DistributedError as e:
                raise click.ClickException(str(e)) from e
    if summary is None:  # not rank 0: rank 0 reports for the job
        sys.exit(0)
    log.info("%s", summary_line(summary.files, seconds=summary.seconds, out_dir=output))
    # 0: every input done (or already done); 1: some inputs failed (see the report); 2: usage.
    # Under torchrun a failed input is a result of the job, not a crash: a worker's exit 1
    # makes torchrun print a traceback ("ChildFailedError ... FAILED") and, with --max-restarts,
    # restart every worker, which would fail the same inputs again. --strict asks for 1 anyway.
    if summary.failed and launched_by_torchrun() and not strict:
        log.info("exit status 0: under torchrun, failed inputs are in the report, not in the exit status "
                 "(--strict makes it 1)")
        sys.exit(0)
    sys.exit(1 if summary.failed else 0)


def _run(ctx, input_path, output, *, model_path, tile, halo, batch_size, mask_dir, precision="fp32",
         feature_cache_mib=None, overwrite=False, preview=False, verbose=0, quiet=False, fmt="png", started=None,
         verify_inputs=False, shared_output=None):
    from .engine import Engine
    from .images import find_inputs
    from .model import load_model
    from .runner import run_job

    # Inputs first: "no images" is a usage error that should not wait for a model to load and be probed.
    items = find_inputs(input_path, exclude=[output])
    if not items:
        raise click.UsageError(f"no images found in {input_path}")
    model = load_model(model_path)
    from .model import model_identity
    from .receptive import ModelProbe, probe_cached

    identity = model_identity(model_path)  # every rank's: they must load the same model (run_job checks)
    probe = None
    if ctx.rank == 0:  # measured once, on rank 0: the probe is deterministic, N copies would only cost CPU
        t0 = time.perf_counter()
        probe, kept = probe_cached(model, identity, announce=lambda: log.info(
            "measuring the model's receptive field and stride (%s; seconds to a minute)",
            "once per model file: later runs reuse it" if identity is not None
            else "every run: a model given as package.module:factory is not cached"))
        log.debug("receptive field: %s", f"as measured before ({kept})" if kept else f"probed in {time.perf_counter() - t0:.1f} s")
        if not kept:
            from .engine import _release_free_heap

            _release_free_heap()  # the probe's float64 tensors, as the Engine does after its own probe
    if ctx.distributed:
        import dataclasses
        import json

        mine = json.dumps(dataclasses.asdict(probe)) if ctx.rank == 0 else None
        probe = ModelProbe(**json.loads(ctx.share_from_rank0("probe", mine)))
    try:
        engine = Engine(model, tile=tile, halo=halo, batch_size=batch_size, device=ctx.device, probe=probe,
                        precision=precision,
                        feature_cache=None if feature_cache_mib is None else feature_cache_mib * 2**20)
    except ValueError as e:
        raise click.UsageError(str(e)) from e
    from .model import tile_exact_warning
    from .progress import Progress

    if ctx.rank == 0 and (warning := tile_exact_warning(engine.probe, tile=tile, halo=halo)):
        log.warning("%s", warning)
    # One bar (or log lines) on rank 0 over every process's tiles; other ranks show nothing.
    with Progress(enabled=ctx.rank == 0, quiet=quiet, verbose=verbose) as progress:
        summary = run_job(ctx, engine, items, output, mask_dir=mask_dir, palette=getattr(model, "palette", None),
                          overwrite=overwrite, progress=progress, fmt=fmt, started=started,
                          verify_inputs=verify_inputs, model_id=identity, shared_output=shared_output)
    if preview and summary is not None:  # rank 0, after its writer: previews of what is on disk
        from .preview import write_previews

        write_previews(summary.files, items, mask_dir=mask_dir, palette=getattr(model, "palette", None))
    return summary


@main.command()
@click.argument("images", metavar="IMAGES...", nargs=-1, required=True,
                type=click.Path(exists=True, path_type=Path))
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Checkpoint and final weights (.safetensors); the optimizer state goes beside it.")
@click.option("--steps", type=int, default=2000, show_default=True, help="Total optimizer steps.")
@click.option("--crop", type=int, default=128, show_default=True, help="Side of the random training crops.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Crops per step and process.")
@click.option("--classes", type=int, default=16, show_default=True, help="K colour classes (k-means palette).")
@click.option("--lr", type=float, default=2e-3, show_default=True, help="Peak learning rate (AdamW, cosine decay).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the init, palette, crops and holes.")
@click.option("--exclude", multiple=True, metavar="GLOB", help="Skip images whose name matches (repeatable), "
              "e.g. held-out benchmark photos.")
@click.option("--checkpoint-every", type=int, default=100, show_default=True, help="Steps between checkpoints.")
@click.option("--stop-at", type=int, default=None, help="End this run after this step (the recipe stays --steps).")
@click.option("--resume", is_flag=True, help="Continue the checkpoint at --out exactly where it stopped.")
@click.option("--init-from", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Start from these weights (e.g. an earlier stage) instead of a fresh init.")
@click.option("--class-prior/--no-class-prior", default=True, show_default=True,
              help="Add the classes of the pre-filled colours to the class logits.")
@click.option("--l1-weight", type=float, default=5.0, show_default=True, help="Weight of the hole L1 loss.")
@click.option("--l2-weight", type=float, default=0.0, show_default=True, help="Weight of the hole MSE loss.")
@click.option("--idle-weight", type=float, default=0.0, show_default=True, help="Weight of an L1 loss on the RGB "
              "correction where the coarse context's far field leaves it out (deep in wide holes).")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True,
              help="bf16: autocast (fast on CPUs with AMX and on GPUs); weights stay fp32.")
@click.option("--coarse-scale", type=int, default=0, show_default=True, help="Cell size (px) of the whole-image "
              "coarse context, the pre-fill's far field; 0 = none. 16 for the shipped weights.")
@click.option("--class-fill", is_flag=True, help="Take a hole's class prior from the filled classes of the known "
              "pixels around it (the most frequent class) instead of the class of its fill colour; needs --class-prior.")
@click.option("--class-cells", type=click.IntRange(1, 4), default=4, show_default=True, help="Cells of the coarse "
              "context's class shares, in colour cells across (--coarse-scale px). 2 for the shipped weights.")
@click.option("--slope-fill", is_flag=True, help="Carry the slopes of the pixels around a hole into it (a "
              "first-order continuation, as biharmonic inpainting does) in the pre-fill.")
@click.option("--coarse-biharmonic", is_flag=True, help="Fill the coarse context's holes biharmonically (gradients "
              "run on through a box) instead of harmonically; needs --coarse-scale.")
@click.option("--big-holes", type=float, default=0.0, show_default=True, help="Share of crops that also get one "
              "box or blob 25-70% of the crop across.")
@click.option("--picture-context", is_flag=True, help="Give each crop the global features and coarse context of "
              "its whole picture, as inference gives a tile its image's (slower).")
@click.option("--augment", is_flag=True, help="Also rotate crops by multiples of 90 degrees and permute "
              "their RGB channels (more variety from few photos).")
@o.device_opt
@o.verbose_opt
@o.quiet_opt
def train(images, out, steps, crop, batch_size, classes, lr, seed, exclude, checkpoint_every, stop_at, resume,
          init_from, class_prior, l1_weight, l2_weight, idle_weight, precision, coarse_scale, class_fill, class_cells,
          slope_fill, coarse_biharmonic, big_holes, picture_context, augment, device, verbose, quiet):
    """Self-supervised training on the images in IMAGES (files or folders) into --out.

    Random crops with random holes; the model learns K colour classes and to fill the
    holes. Under torchrun it trains data-parallel (DDP).
    """
    _setup_logging(verbose, quiet)
    from .errors import DistributedError
    from .train import TrainConfig, TrainingError, default_net_config
    from .train import train as run_training

    if class_fill and not class_prior:
        raise click.UsageError("--class-fill is a source of the class prior: drop --no-class-prior")
    if coarse_biharmonic and not coarse_scale:
        raise click.UsageError("--coarse-biharmonic fills the coarse context: give --coarse-scale too")
    try:
        cfg = TrainConfig(steps=steps, crop=crop, batch_size=batch_size, classes=classes, lr=lr, seed=seed,
                          checkpoint_every=checkpoint_every, l1_weight=l1_weight, l2_weight=l2_weight,
                          idle_weight=idle_weight,
                          precision=precision, augment=augment, big_holes=big_holes,
                          picture_context=picture_context)
        net_cfg = default_net_config(classes, class_prior=class_prior, coarse_scale=coarse_scale, class_fill=class_fill,
                                     slope_fill=slope_fill, coarse_biharmonic=coarse_biharmonic,
                                     class_cells=class_cells)
        result = run_training(images, out=out, cfg=cfg, net_cfg=net_cfg, exclude=exclude, resume=resume,
                              init_from=init_from, stop_at=stop_at, device=device, progress=not quiet)
    except (TrainingError, DistributedError) as e:
        raise click.ClickException(str(e)) from e
    if result.last_loss != result.last_loss:  # NaN: --resume found the run already finished
        log.info("already at step %d -> %s", result.steps, result.path)
    else:
        log.info("trained to step %d in %.0fs, loss %.4f -> %s", result.steps, result.seconds, result.last_loss,
                 result.path)


@main.command()
@click.argument("weights", metavar="WEIGHTS...", nargs=-1, required=True,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The merged weights (.safetensors).")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@o.verbose_opt
@o.quiet_opt
def merge(weights, out, overwrite, verbose, quiet):
    """Average the weights of replicas (runs of `tilerun train` from one start) into --out.

    The replicas must have one architecture and palette: train them with other --seed
    values from one --init-from checkpoint, in parallel, then merge.
    """
    _setup_logging(verbose, quiet)
    from .train import merge as merge_weights

    if out.exists() and not overwrite:
        raise _SettingsError(f"{out} exists; pass --overwrite to replace it")
    with _error_boundary(verbose):  # a mismatch between the replicas: exit 1, naming the file
        merge_weights(weights, out=out)
    log.info("merged %d replicas -> %s", len(weights), out)


@main.command()
@click.argument("weights", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--set", "settings", multiple=True, required=True, metavar="FIELD=VALUE",
              help="A TileNetConfig field to switch (repeatable), e.g. class_cells=2.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The switched weights (.safetensors).")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@o.verbose_opt
@o.quiet_opt
def switch(weights, settings, out, overwrite, verbose, quiet):
    """Write WEIGHTS with configuration fields switched that add no parameter to the network.

    For example the coarse context's class cells (class_cells=2: 32-px cells) or its fills:
    the same network with other classical parts around it. An unknown FIELD is refused with the
    list of fields.
    """
    _setup_logging(verbose, quiet)
    from .train import switch as switch_weights

    if out.exists() and not overwrite:
        raise _SettingsError(f"{out} exists; pass --overwrite to replace it")
    with _error_boundary(verbose):  # a field that changes the parameters: exit 1, naming it
        switch_weights(weights, settings, out=out)
    log.info("switched %s -> %s", ", ".join(settings), out)


@main.command("inspect")
@click.argument("model_path", metavar="[MODEL | INPUT]", required=False, type=o.ModelSpec())
# Not o.tile_opt/o.batch_opt: inspect reports for tilerun's default on the chosen device unless told otherwise.
@click.option("--tile", type=int, default=None, help="Tile core side to measure memory for. "
              "Default: tilerun's default for the device.")
@click.option("--batch-size", type=int, default=None, help="Tiles per forward. Default: tilerun's default.")
@o.device_opt
@click.option("--no-memory", is_flag=True, help="Skip the full-size forward that measures memory per tile.")
@o.level_opt
@o.mpp_opt
@o.verbose_opt
@o.quiet_opt
def inspect_cmd(model_path, tile, batch_size, device, no_memory, level, mpp, verbose, quiet):
    """Describe MODEL (default: tilerun's own): architecture, parameters, K and palette,
    measured stride and receptive field, memory per tile, and whether tiles are exact.

    MODEL is a .safetensors checkpoint, TorchScript (.pt), exported program (.pt2) or
    package.module:factory, as for `tilerun run --model`.

    Or describe what `tilerun run` will read of INPUT (an image, a whole slide, a *.zarr
    folder): format, size and pixel size per level, the level read (--level, --mpp),
    tiling, dtype and value range, bands, CRS and nodata.
    """
    _setup_logging(verbose, quiet)
    from .inspect import format_input_report, inspect_input, is_input

    if model_path is not None and is_input(model_path):
        from .sources import set_level

        with _error_boundary(verbose):
            set_level(level=level, mpp=mpp)  # as `run` would read it: a level the input lacks is refused
            click.echo(format_input_report(inspect_input(model_path, level=level, mpp=mpp)))
        return
    from .dist import _device
    from .inspect import format_report, inspect_model
    from .model import load_model

    with _error_boundary(verbose):
        model = load_model(model_path)
        report = inspect_model(model, source=model_path or "tilerun default", tile=tile, batch_size=batch_size,
                               device=_device(device, 0), memory=not no_memory)
    click.echo(format_report(report, color=sys.stdout.isatty()))
