"""tilerun's exceptions. Catch these, not Exception: the one broad catch is the per-file boundary."""

from __future__ import annotations

import signal
from pathlib import Path

__all__ = ["TilerunError", "InputImageError", "ModelLoadError", "OutputExistsError", "OutputBusyError",
           "DistributedError", "Interrupted", "too_many_pixels"]


class TilerunError(Exception):
    """Base of every error tilerun raises on purpose."""


class InputImageError(TilerunError, ValueError):
    """An input image (or its mask) cannot be read or is unusable."""


def too_many_pixels(size: str, limit: int) -> InputImageError:
    """The decompression-bomb refusal, alike from Pillow's path and tifffile's: ``size`` as
    the reader knows it (e.g. "268,435,456 pixels"), ``limit`` the one that holds."""
    return InputImageError(
        f"too many pixels: {size}, over the decompression-bomb limit of {limit:,}; "
        "raise it with --max-pixels if the image is trusted"
    )


class ModelLoadError(TilerunError, ValueError):
    """A model file cannot be loaded safely or does not satisfy the model contract."""


class OutputExistsError(TilerunError, FileExistsError):
    """Outputs exist from a run with other settings; rerun with --overwrite."""


class OutputBusyError(OutputExistsError):
    """Another running job holds OUTPUT (`resume.OutputLock`); wait for it or choose another OUTPUT."""


class DistributedError(TilerunError, RuntimeError):
    """The process group is misconfigured or a peer failed."""


class Interrupted(KeyboardInterrupt):
    """SIGINT (Ctrl-C) or SIGTERM (a batch scheduler, torchrun's agent) stopped a job.

    A KeyboardInterrupt, so that no ``except Exception`` boundary swallows it. ``results``:
    the inputs decided so far (`runner.FileResult`s; None: none known); ``report``: the
    report written for them on the way out, if any.
    """

    def __init__(self, signum: int = signal.SIGINT, *, results: list | None = None,
                 report: Path | None = None) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)
        self.results = results
        self.report = report

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name
