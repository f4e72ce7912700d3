"""One job: every input image through the engine into OUTPUT, one failure costing one file.

The road: plan (`scheduler`, `owners`) -> claim -> compute (`work`) -> assemble -> write
(`assemble`, with `parts` and `transport` for images spread over processes); `report`
records it. This module runs that road once: resume and output naming first (rank 0,
`resume`), then every process's share, then the report (rank 0). No module below it
imports it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import assemble
from .engine import Engine
from .errors import Interrupted
from .georef import nodata_tag, read_georef
from .images import InputItem, plan_outputs, write_png_atomic, write_tiff_atomic
from .owners import assign
from .report import REPORT_NAME
from .resume import Fingerprint, Manifest, OutputLock, OutputPlan, fingerprint, prepare_outputs
from .scheduler import JobPlan, job_settings, plan_job
from .sources import describe
from .work import run_worker

__all__ = ["FileResult", "JobSummary", "run_job", "write_outputs"]

log = logging.getLogger("tilerun")

#: The nodata value a TIFF class map declares (GDAL_NODATA), outside the classes (at most 255 of them).
CLASS_NODATA = 255


@dataclass
class FileResult:
    input: str
    status: str  # "ok" | "failed" | "skipped" | "interrupted" (not done: the run was stopped)
    outputs: list[str] = field(default_factory=list)
    size: tuple[int, int] | None = None
    tiles: int = 0
    seconds: float = 0.0
    error: str | None = None
    radiometry: dict | None = None  # how its pixels became uint8 (`radiometry.finish`'s note)
    read: dict | None = None  # an input read window by window: `sources.describe` (reader, level, µm per pixel)


@dataclass
class JobSummary:
    files: list[FileResult]
    seconds: float
    ranks: list = field(default_factory=list)  # work.RankStats per process

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
    threads: int = 1, georef: tuple = (), ready: Callable[[int], None] | None = None,
) -> list[str]:
    """Write the outputs there are, atomically, as PNG or tiled TIFF by the paths' suffixes.
    ``text_for(kinds)``: text entries for them (`resume.OutputPlan.output_text`: the resume
    stamp), the same in every output of one input. ``pool`` compresses a PNG's strips on its
    threads; a TIFF's tiles are compressed on ``threads`` of tifffile's own.

    ``ready(y)``: the arrays are still being filled and this blocks until rows [0, y) are
    final. PNGs are then encoded strip by strip as rows become final, both outputs at once
    (the class map on a thread of its own); a TIFF waits for the whole image.

    The class map is a palette image: the pixel is the class index, the palette colours it
    (no palette: every entry black; the indices are the data). A TIFF carries ``georef`` (the
    input's GeoTIFF tags, `georef.read_georef`), and a TIFF class map the nodata value
    `CLASS_NODATA` when the palette leaves it free."""
    from .omezarr import Plane, finish

    if isinstance(rgb, Plane):  # an `omezarr.OmeZarrCanvas`'s: its chunks are on disk already
        if ready is not None:  # the pyramid is made from the whole of level 0
            ready(rgb.canvas.height)
        kinds = [k for k, a in (("pred", classes), ("inpainted", rgb)) if a.written]
        return finish(rgb.canvas, palette=palette, text=text_for(kinds) if text_for else None)
    kinds = [k for k, a in (("pred", classes), ("inpainted", rgb)) if a is not None]
    text = text_for(kinds) if text_for else None

    def write(kind: str, pixels: np.ndarray, pal) -> str:
        path = paths[kind]
        if path.suffix == ".tif":
            if ready is not None:
                ready(pixels.shape[0])
            tags = georef + ((nodata_tag(CLASS_NODATA),) if kind == "pred" and len(pal) <= CLASS_NODATA else ())
            write_tiff_atomic(pixels, path, palette=pal, text=text, threads=threads, extratags=tags)
        else:
            write_png_atomic(pixels, path, palette=pal, text=text, pool=pool, ready=ready)
        return str(path)

    jobs = [(kind, pixels, pal) for kind, pixels, pal in (("pred", classes, list(palette or [])), ("inpainted", rgb, None))
            if pixels is not None]
    if ready is None or len(jobs) < 2:
        return [write(*job) for job in jobs]
    with ThreadPoolExecutor(len(jobs) - 1, thread_name_prefix="tilerun-stream") as side:
        futures = [side.submit(write, *job) for job in jobs[:-1]]
        last = write(*jobs[-1])
        return [f.result() for f in futures] + [last]


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
    shared_output: bool | None = None,
) -> JobSummary | None:
    """Run ``items`` on this process's share of the job (`tilerun.dist.session` gives ``ctx``).

    One process or many, the same road: plan -> claim -> compute -> assemble -> write
    (`work`). Every process writes the images it finishes, as ``fmt``
    (`images.OUTPUT_FORMATS`). ``shared_output``: whether every process sees the same
    OUTPUT (None: tested, `parts.shared_output`). Returns the summary on rank 0, None
    elsewhere. ``started``: `time.perf_counter` when the command began (default: now), for
    the summary's and the report's seconds. ``model_id``: `tilerun.model.model_identity` of
    the model (None: the loaded weights' digest), which every process must share, as the
    options and inputs.

    Ctrl-C or SIGTERM (`errors.Interrupted`, or a plain KeyboardInterrupt) once the work
    has started: rank 0 writes the report -- the inputs it knows written so far ``ok``, the
    rest ``interrupted`` -- and raises `errors.Interrupted` with them; a rerun resumes.

    Rank 0 holds OUTPUT (`resume.OutputLock`) for the whole job: a second job into it
    raises `OutputBusyError` (exit 2).
    """
    t0 = time.perf_counter() if started is None else started
    if ctx.distributed:  # before anything is written: a process that differs stops every process
        ctx.agree_settings(job_settings(engine, items, model_id=model_id, fmt=fmt))
    with OutputLock(out_dir) if ctx.is_writer else contextlib.nullcontext() as lock:
        return _run_job(ctx, engine, items, Path(out_dir), mask_dir=mask_dir, palette=palette, on_tiles=on_tiles,
                        overwrite=overwrite, progress=progress, fmt=fmt, t0=t0, verify_inputs=verify_inputs,
                        shared_output=shared_output, since=getattr(lock, "since", None))


def _run_job(ctx, engine, items, out_dir, *, mask_dir, palette, on_tiles, overwrite, progress, fmt, t0,
             verify_inputs, shared_output, since):

    # Resume and the collision rule: rank 0 alone reads and claims OUTPUT and tells the
    # others what is left to do and what each output's stamp says (the inputs' identities).
    # OutputExistsError -> exit 2 on rank 0, and torchrun stops the rest.
    # Rank 0 alone plans the work (sizes, claims) and every process follows that one plan.
    out_plan = fp = job = None
    skipped: list[FileResult] = []
    failed: list[FileResult] = []
    mine = None
    if ctx.rank == 0:
        fp = fingerprint(model=engine.model, engine=engine)
        out_plan = prepare_outputs(items, out_dir, fp=fp, overwrite=overwrite, mask_dir=mask_dir, claim=True, fmt=fmt,
                                   verify_inputs=verify_inputs)
        skipped = [FileResult(it.key, "skipped", **out_plan.done_info(it)) for it in out_plan.done]
        job, unreadable = plan_job(engine, out_plan.todo, world_size=ctx.world_size)
        failed = [FileResult(key, "failed", error=error) for key, error in unreadable]
        mine = json.dumps({"plan": job.to_json(), "identities": out_plan.identities, "fingerprint": dict(fp.settings)})
    shared_doc = json.loads(ctx.share_from_rank0("plan", mine))
    if out_plan is None:  # rank 0's paths and stamps, whoever writes an output
        fp = Fingerprint(shared_doc["fingerprint"])
        out_plan = OutputPlan(Manifest(out_dir, fp, overwrite=overwrite), plan_outputs(items, out_dir, fmt=fmt),
                              [], [], shared_doc["identities"])
    plans = JobPlan.from_json(shared_doc["plan"]).image_plans(items)
    own = assign([len(p.tiles) for p in plans], ctx.world_size, pixels=[p.height * p.width for p in plans])
    io, kept = _spread_io(ctx, plans, own, out_dir, fp, shared_doc["identities"], shared_output)
    if progress is not None:  # `progress.Progress`: rank 0 sees every process's tiles through the store
        # Every input counts: those already done and those that failed here are done at once.
        progress.set_totals(tiles=sum(len(p.tiles) for p in plans), images=len(items),
                            pixels=sum(p.height * p.width for p in plans))
        progress.advance(images=len(skipped) + len(failed), failed=len(failed), skipped=len(skipped))
        on_tiles = on_tiles or progress.on_tiles
    if ctx.rank == 0:
        paths_by_key = {it.key: it.path for it in items}  # name bad files by path
        for f in failed:
            log.error("%s: %s", paths_by_key[f.input], f.error)
    by_key = {it.key: it for it in items}
    encoders = assemble.encoder_count(getattr(engine, "device", torch.device("cpu")).type)

    def write(key, classes, rgb, strips, ready=None):
        item = by_key[key]

        def text_for(kinds):
            text = out_plan.output_text(item, kinds)
            read = describe(item.path)  # the level read and its pixel size, in the outputs too
            return text if read is None else {**text, "tilerun.read": json.dumps(read, sort_keys=True)}

        return write_outputs(out_plan.outputs(item), classes, rgb, palette, pool=strips, threads=encoders,
                             text_for=text_for, ready=ready,
                             georef=read_georef(item.path) if fmt == "tiff" else ())

    new_canvas = None
    if fmt == "ome-zarr":  # cores go straight into the output's zarr chunks: no full-size array
        from .omezarr import OmeZarrCanvas

        def new_canvas(p):
            read = describe(p.item.path) or {}  # the pixel size of the level read: the zarr's scale in µm
            return OmeZarrCanvas(p.height, p.width, p.tiles, path=out_plan.outputs(by_key[p.key])["inpainted"],
                                 mpp=read.get("mpp"))

    try:
        results, stats = run_worker(ctx, engine, plans, own, write=write, io=io, kept=kept, mask_dir=mask_dir,
                                    on_tiles=on_tiles if ctx.rank == 0 else None, new_canvas=new_canvas)
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        if ctx.rank != 0:
            raise Interrupted(signum) from e
        written = [_result(r) for r in getattr(e, "results", None) or []]
        summary = _record(items, out_dir, out_plan, fp, skipped + failed + written, t0, [], interrupted=signum,
                          since=since)
        raise Interrupted(signum, results=summary.files, report=Path(out_dir) / REPORT_NAME) from e
    if ctx.rank != 0:
        return None
    return _record(items, out_dir, out_plan, fp, skipped + failed + [_result(r) for r in results], t0, stats,
                   since=since)


def _result(d: dict) -> FileResult:
    size = d.get("size")
    return FileResult(d["input"], d["status"], d.get("outputs") or [], tuple(size) if size else None,
                      d.get("tiles", 0), d.get("seconds", 0.0), d.get("error"), d.get("radiometry"),
                      d.get("read"))


def _spread_io(ctx, plans, own, out_dir, fp, identities, shared_output):
    """How this job's spread images travel (`work.SpreadIO`, None when none is spread), and the
    chunks an earlier run left in their part stores. Collective: every rank calls it."""
    from .parts import PartStore, part_digest, shared_output as detect_shared
    from .transport import PointToPoint
    from .work import SpreadIO

    shared = detect_shared(ctx, out_dir, override=shared_output) if own.spread else True
    if ctx.rank == 0:
        if own.spread:
            names = [plans[i].key for i in own.spread]
            log.info("%d image%s spread over %d processes (%s%s); their tiles meet %s", len(names),
                     "s" * (len(names) > 1), ctx.world_size, ", ".join(names[:3]), ", ..." * (len(names) > 3),
                     "in part stores in OUTPUT (shared by every process)" if shared
                     else "over the process group (OUTPUT not shared)")
        # An earlier run's part stores that this run will not read.
        PartStore.sweep(out_dir, [plans[i].key for i in own.spread] if shared else [])
    if not own.spread:
        return None, {}
    if not shared:
        return SpreadIO(ctx.rank, p2p=PointToPoint.create(ctx.backend)), {}
    # Rank 0 prepares every spread image's part store (keeping an earlier run's chunks of
    # the same plan) before any claim; every rank then opens them.
    digests = {i: part_digest(fingerprint=fp.digest, key=plans[i].key, identity=identities.get(plans[i].key),
                              height=plans[i].height, width=plans[i].width, chunks=plans[i].chunks)
               for i in own.spread}
    inventory = None
    if ctx.rank == 0:
        inv = {i: PartStore.prepare(out_dir, plans[i].key, digest=digests[i]).inventory() for i in own.spread}
        inventory = json.dumps({i: {p: sorted(c) for p, c in v.items()} for i, v in inv.items()})
    kept = {int(i): {int(p): set(c) for p, c in v.items()}
            for i, v in json.loads(ctx.share_from_rank0("parts", inventory)).items()}
    parts = {i: PartStore.open(out_dir, plans[i].key, digest=digests[i]) for i in own.spread}
    return SpreadIO(ctx.rank, parts=parts), kept


def _record(items, out_dir, out_plan, fp, results, t0, stats, *, interrupted: int | None = None,
            since: float | None = None) -> JobSummary:
    """Rank 0, its writer done: the job's summary, in input order, and its report. Interrupted:
    the inputs without a result are ``interrupted``."""
    from .images import remove_stale_temps
    from .report import write_report

    # Every process has written its outputs (their results are in): leftovers are ours or a killed run's.
    remove_stale_temps(out_plan.all_paths(), since=since)
    by_key = {r.input: r for r in results}
    if interrupted:
        ordered = [by_key.get(it.key) or FileResult(it.key, "interrupted") for it in items]
    else:
        ordered = [by_key[it.key] for it in items if it.key in by_key]
    summary = JobSummary(ordered, time.perf_counter() - t0, stats)
    for f in summary.files:  # whichever process decoded an image, its radiometry warnings show here
        for warning in (f.radiometry or {}).get("warnings", ()):
            log.warning("%s: %s", f.input, warning)
    write_report(out_dir, summary.files, seconds=summary.seconds, settings=dict(fp.settings), ranks=stats,
                 interrupted=signal.Signals(interrupted).name if interrupted else None)
    return summary
