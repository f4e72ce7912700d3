"""One job: every input image through the engine into OUTPUT, one failure costing one file."""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .engine import Engine
from .errors import Interrupted
from .images import InputItem, write_png_atomic, write_tiff_atomic
from .report import REPORT_NAME

__all__ = ["FileResult", "JobSummary", "run_job", "write_outputs"]

log = logging.getLogger("tilerun")


@dataclass
class FileResult:
    input: str
    status: str  # "ok" | "failed" | "skipped" | "interrupted" (not done: the run was stopped)
    outputs: list[str] = field(default_factory=list)
    size: tuple[int, int] | None = None
    tiles: int = 0
    seconds: float = 0.0
    error: str | None = None


@dataclass
class JobSummary:
    files: list[FileResult]
    seconds: float
    ranks: list = field(default_factory=list)  # scheduler.RankStats per process

    @property
    def failed(self) -> int:
        return sum(f.status == "failed" for f in self.files)

    @property
    def ok(self) -> int:
        return sum(f.status == "ok" for f in self.files)

    @property
    def skipped(self) -> int:
        return sum(f.status == "skipped" for f in self.files)


def write_outputs(
    paths: dict[str, Path], classes: np.ndarray | None, rgb: np.ndarray | None, palette, *, text_for=None, pool=None,
    threads: int = 1,
) -> list[str]:
    """Write the outputs there are, atomically, as PNG or tiled TIFF by the paths' suffixes.
    ``text_for(kinds)``: text entries for them (`resume.OutputPlan.output_text`: the resume
    stamp), the same in every output of one input. ``pool`` compresses a PNG's strips on its
    threads; a TIFF's tiles are compressed on ``threads`` of tifffile's own.

    The class map is a palette image: the pixel is the class index, the palette colours it
    (no palette: every entry black; the indices are the data)."""
    kinds = [k for k, a in (("pred", classes), ("inpainted", rgb)) if a is not None]
    text = text_for(kinds) if text_for else None
    written = []
    for kind, pixels, pal in (("pred", classes, list(palette or [])), ("inpainted", rgb, None)):
        if pixels is None:
            continue
        path = paths[kind]
        if path.suffix == ".tif":
            write_tiff_atomic(pixels, path, palette=pal, text=text, threads=threads)
        else:
            write_png_atomic(pixels, path, palette=pal, text=text, pool=pool)
        written.append(str(path))
    return written


def run_job(
    ctx,
    engine: Engine,
    items: list[InputItem],
    out_dir: Path,
    *,
    mask_dir=None,
    palette=None,
    on_tiles=None,
    overwrite: bool = False,
    progress=None,
    fmt: str = "png",
    started: float | None = None,
    verify_inputs: bool = False,
    model_id: str | None = None,
) -> JobSummary | None:
    """Run ``items`` on this process's share of the job (`tilerun.dist.session` gives ``ctx``).

    One process or many, the same path: tiles are claimed from the store and rank 0
    writes every output, as ``fmt`` (`images.OUTPUT_FORMATS`). Returns the summary on rank
    0, None elsewhere. ``started``: `time.perf_counter` when the command began (default:
    now), for the summary's and the report's seconds. ``model_id``: `tilerun.model.model_identity`
    of the model (None: the loaded weights' digest), which every process must share, as the
    options and inputs.

    Ctrl-C or SIGTERM (`errors.Interrupted`, or a plain KeyboardInterrupt) once the work
    has started: rank 0 writes the report -- the inputs written so far ``ok``, the rest
    ``interrupted`` -- and raises `errors.Interrupted` with them; a rerun resumes.

    The writer holds OUTPUT (`resume.OutputLock`) for the whole job: a second job into it
    raises `OutputBusyError` (exit 2).
    """
    from .scheduler import JobPlan, job_settings, plan_job, run_distributed

    from .resume import OutputLock, fingerprint, prepare_outputs

    t0 = time.perf_counter() if started is None else started
    if ctx.distributed:  # before anything is written: a process that differs stops every process
        ctx.agree_settings(job_settings(engine, items, model_id=model_id, fmt=fmt))
    # Resume and the collision rule: rank 0 alone reads and claims OUTPUT (it may exist
    # on the first node only) and tells the others what is left to do.
    # OutputExistsError -> exit 2 on rank 0, and torchrun stops the rest.
    # Rank 0 alone plans the work (sizes, claims) and every process follows that one plan.
    with OutputLock(out_dir) if ctx.is_writer else contextlib.nullcontext() as lock:
        out_plan = fp = job = None
        skipped: list[FileResult] = []
        failed: list[FileResult] = []
        if ctx.rank == 0:
            fp = fingerprint(model=engine.model, engine=engine)
            out_plan = prepare_outputs(items, out_dir, fp=fp, overwrite=overwrite, mask_dir=mask_dir, claim=True,
                                       fmt=fmt, verify_inputs=verify_inputs)
            skipped = [FileResult(it.key, "skipped", **out_plan.done_info(it)) for it in out_plan.done]
            job, failed = plan_job(engine, out_plan.todo, world_size=ctx.world_size)
        job = JobPlan.from_json(ctx.share_from_rank0("plan", job.to_json() if job is not None else None))
        plans = job.image_plans(items)
        if progress is not None:  # `progress.Progress`: rank 0's writer sees every process's tiles
            # Every input counts: those already done and those that failed here are done at once.
            progress.set_totals(tiles=sum(len(p.tiles) for p in plans), images=len(items),
                                pixels=sum(p.height * p.width for p in plans))
            progress.advance(images=len(skipped) + len(failed), failed=len(failed), skipped=len(skipped))
            on_tiles = on_tiles or progress.on_tiles
        if ctx.rank == 0:
            paths_by_key = {it.key: it.path for it in items}  # name bad files as the writer does: by path
            for f in failed:
                log.error("%s: %s", paths_by_key[f.input], f.error)
        try:
            results, stats = run_distributed(
                ctx, engine, plans, Path(out_dir), mask_dir=mask_dir, palette=palette, on_tiles=on_tiles,
                outputs=out_plan)
        except KeyboardInterrupt as e:
            signum = getattr(e, "signum", signal.SIGINT)
            if ctx.rank != 0:
                raise Interrupted(signum) from e
            written = getattr(e, "results", None) or []
            summary = _record(items, out_dir, out_plan, fp, skipped + failed + written, t0, [], interrupted=signum,
                              since=lock.since)
            raise Interrupted(signum, results=summary.files, report=Path(out_dir) / REPORT_NAME) from e
        if ctx.rank != 0:
            return None
        return _record(items, out_dir, out_plan, fp, skipped + failed + results, t0, stats, since=lock.since)


def _record(items, out_dir, out_plan, fp, results, t0, stats, *, interrupted: int | None = None,
            since: float | None = None) -> JobSummary:
    """Rank 0, its writer done: the job's summary, in input order, and its report. Interrupted:
    the inputs without a result are ``interrupted``."""
    from .images import remove_stale_temps
    from .report import write_report

    # Rank 0 wrote every output and its writer is done: leftovers are ours or a killed run's.
    remove_stale_temps(out_plan.all_paths(), since=since)
    by_key = {r.input: r for r in results}
    if interrupted:
        ordered = [by_key.get(it.key) or FileResult(it.key, "interrupted") for it in items]
    else:
        ordered = [by_key[it.key] for it in items if it.key in by_key]
    summary = JobSummary(ordered, time.perf_counter() - t0, stats)
    write_report(out_dir, summary.files, seconds=summary.seconds, settings=dict(fp.settings), ranks=stats,
                 interrupted=signal.Signals(interrupted).name if interrupted else None)
    return summary
