"""The job's record: ``OUTPUT/tilerun-report.json`` (one entry per input) and the one-line summary.

Written once, at the end of a job, by the one process that writes the summary (rank 0),
atomically, so a reader never sees half a report. A rerun replaces it: inputs resumed
from an earlier run are listed as ``skipped`` with their outputs. A job stopped by Ctrl-C
or SIGTERM writes it too: what was written is ``ok``, the inputs not done ``interrupted``,
and ``interrupted`` names the signal.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Iterable

from .resume import write_json_atomic

__all__ = ["REPORT_NAME", "REPORT_FIELDS", "STATUSES", "write_report", "summary_line"]

REPORT_NAME = "tilerun-report.json"
# Per input; `outputs` relative to OUTPUT, `size` [width, height], `seconds` spent on it in this run.
# `radiometry`: how its pixels became the model's uint8 (dtype, bands used of band_count, range and where
# it came from, nodata, warnings); None for inputs not decoded in this run.
REPORT_FIELDS = ("input", "status", "outputs", "size", "tiles", "seconds", "error", "radiometry")
STATUSES = ("ok", "failed", "skipped", "interrupted")
_FORMAT = "tilerun.report/1"


def _relative(path: str | os.PathLike, out_dir: Path | None) -> str:
    """Output paths relative to OUTPUT (where the report lies), so the folder can move."""
    if out_dir is not None:
        try:
            return Path(path).absolute().relative_to(out_dir.absolute()).as_posix()
        except ValueError:
            pass
    return str(path)


def _entry(result: Any, out_dir: Path | None = None) -> dict[str, Any]:
    d = asdict(result) if is_dataclass(result) else dict(result)
    e = {k: d.get(k) for k in REPORT_FIELDS}
    e["outputs"] = [_relative(p, out_dir) for p in e["outputs"] or ()]
    e["size"] = list(e["size"]) if e["size"] is not None else None
    e["seconds"] = round(float(e["seconds"] or 0.0), 3)
    if d.get("read"):  # an input read window by window: its reader, level and µm per pixel (`sources.describe`)
        e["read"] = d["read"]
    return e


def _counts(entries: list[dict[str, Any]]) -> dict[str, int]:
    counts = {s: sum(e["status"] == s for e in entries) for s in STATUSES}
    if not counts["interrupted"]:  # a run that was not stopped keeps report/1's three counts
        del counts["interrupted"]
    return counts


def write_report(
    out_dir: str | os.PathLike,
    results: Iterable[Any],
    *,
    seconds: float,
    settings: dict[str, Any] | None = None,
    ranks: Iterable[Any] = (),
    interrupted: str | None = None,
) -> Path:
    """Write the JSON report of ``results`` (runner `FileResult`s or dicts with `REPORT_FIELDS`) into
    ``out_dir``. ``seconds``: the whole command's; ``interrupted``: the signal that stopped the job."""
    entries = [_entry(r, Path(out_dir)) for r in results]
    path = Path(out_dir) / REPORT_NAME
    doc = {
        "format": _FORMAT,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(seconds, 3),
        "interrupted": interrupted,
        "counts": _counts(entries),
        "settings": settings or {},
        "files": entries,
        # Per process: tiles computed in each pass and reused from part stores, seconds computing
        # and waiting, images and bytes it wrote, bytes it sent through the store (bytes_sent),
        # over the process group (bytes_p2p) and into part stores (bytes_parts).
        "ranks": [asdict(r) if is_dataclass(r) else dict(r) for r in ranks],
    }
    write_json_atomic(doc, path)
    return path


def summary_line(results: Iterable[Any], *, seconds: float, out_dir: str | os.PathLike,
                 interrupted: str | None = None) -> str:
    """``3 ok, 1 failed, 2 skipped (already done) in 4.2s -> OUT (report: OUT/tilerun-report.json)``;
    ``seconds`` the whole command's. Interrupted: how many are not done, and that a rerun resumes."""
    c = _counts([_entry(r) for r in results])
    stopped = f", {c.get('interrupted', 0)} not done (interrupted by {interrupted})" if interrupted else ""
    line = (
        f"{c['ok']} ok, {c['failed']} failed, {c['skipped']} skipped (already done){stopped} in {seconds:.1f}s "
        f"-> {out_dir} (report: {Path(out_dir) / REPORT_NAME})"
    )
    return line + "; rerunning the same command resumes" if interrupted else line
