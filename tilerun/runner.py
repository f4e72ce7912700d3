"""One job: every input image through the engine into OUTPUT, one failure costing one file."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .engine import Engine
from .images import InputItem, write_png_atomic, write_tiff_atomic

__all__ = ["FileResult", "JobSummary", "run_job", "write_outputs"]

log = logging.getLogger("tilerun")


@dataclass
class FileResult:
    input: str
    status: str  # "ok" | "failed" | "skipped"
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
    model_id: str | None = None,
) -> JobSummary | None:
    """Run ``items`` on this process's share of the job (`tilerun.dist.session` gives ``ctx``).

    One process or many, the same path: tiles are claimed from the store and rank 0
    writes every output, as ``fmt`` (`images.OUTPUT_FORMATS`). Returns the summary on rank
    0, None elsewhere. ``model_id``: `tilerun.model.model_identity` of the model (None: the
    loaded weights' digest), which every process must share, as the options and inputs.
    """
    from .scheduler import JobPlan, job_settings, plan_job, run_distributed

    from .resume import fingerprint, prepare_outputs

    t0 = time.perf_counter()
    if ctx.distributed:  # before anything is written: a process that differs stops every process
        ctx.agree_settings(job_settings(engine, items, model_id=model_id, fmt=fmt))
    # Resume and the collision rule: rank 0 alone reads and claims OUTPUT (it may exist
    # on the first node only) and tells the others what is left to do.
    # OutputExistsError -> exit 2 on rank 0, and torchrun stops the rest.
    # Rank 0 alone plans the work (sizes, claims) and every process follows that one plan.
    out_plan = fp = job = None
    skipped: list[FileResult] = []
    failed: list[FileResult] = []
    if ctx.rank == 0:
        fp = fingerprint(model=engine.model, engine=engine)
        out_plan = prepare_outputs(items, out_dir, fp=fp, overwrite=overwrite, mask_dir=mask_dir, claim=True, fmt=fmt)
        skipped = [FileResult(it.key, "skipped", **out_plan.done_info(it)) for it in out_plan.done]
        job, failed = plan_job(engine, out_plan.todo, world_size=ctx.world_size)
    job = JobPlan.from_json(ctx.share_from_rank0("plan", job.to_json() if job is not None else None))
    plans = job.image_plans(items)
    if progress is not None:  # `progress.Progress`: rank 0's writer sees every process's tiles
        progress.set_totals(tiles=sum(len(p.tiles) for p in plans), images=len(plans),
                            pixels=sum(p.height * p.width for p in plans))
        on_tiles = on_tiles or progress.on_tiles
    if ctx.rank == 0:
        paths_by_key = {it.key: it.path for it in items}  # name bad files as the writer does: by path
        for f in failed:
            log.error("%s: %s", paths_by_key[f.input], f.error)
    results, stats = run_distributed(
        ctx, engine, plans, Path(out_dir), mask_dir=mask_dir, palette=palette, on_tiles=on_tiles, outputs=out_plan
    )
    if ctx.rank != 0:
        return None
    from .images import remove_stale_temps
    from .report import write_report

    # Rank 0 wrote every output and its writer is done: leftovers are a killed run's.
    remove_stale_temps(out_plan.all_paths())
    by_key = {r.input: r for r in skipped + failed + results}
    ordered = [by_key[it.key] for it in items if it.key in by_key]
    summary = JobSummary(ordered, time.perf_counter() - t0, stats)
    write_report(out_dir, summary.files, seconds=summary.seconds, settings=dict(fp.settings), ranks=stats)
    return summary
