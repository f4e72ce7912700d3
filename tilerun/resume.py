"""Resume: which inputs still need work, decided from what is already in OUTPUT.

Two records, each written atomically:

* ``OUTPUT/tilerun-manifest.json`` — the job's **fingerprint**: the settings that change
  output bytes. It claims the folder: a run with another fingerprint refuses
  (`OutputExistsError`, exit 2) unless ``--overwrite``, which rewrites it first.
* A ``tilerun`` text entry in every output (a PNG text chunk; in a TIFF, a key of the JSON
  object in its ImageDescription) — the fingerprint digest, the input's
  size and mtime, its sidecar mask's, the input's path, and the list of outputs written
  for that input.
  An input is done when every listed output exists and carries the current digest and
  the input (and mask) are unchanged since. Outputs are renamed into place whole, so an
  output that exists is complete; a job killed between an input's two outputs redoes
  that input. No shared file is updated per input, so any number of processes can
  write outputs without coordinating. An output made from *another* file at another path
  (a second job's same-named input aimed at this OUTPUT) is refused, not replaced; a
  moved input folder (same files) resumes.

What the fingerprint holds, and why:

* the model's weights and buffers (SHA-256 over the state dict) and its class and
  architecture config — a different model gives different outputs;
* the tilerun version — the code that turns logits into files may change;
* the halo and tile **only when the halo is below the measured receptive field**. With
  the exact (default or larger) halo, tiling reproduces the whole-image forward, so
  ``--tile``, ``--batch-size`` and ``--device`` only move float rounding (class ties,
  ±1 grey level, the tolerance the engine promises): rerunning on a GPU with a bigger
  tile resumes instead of redoing everything. With a too-small halo the seams move
  with the tile size, so both are recorded.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from .errors import OutputExistsError
from PIL import Image

from .images import InputItem, plan_outputs, read_output_text, sidecar_mask_path

__all__ = [
    "MANIFEST_NAME",
    "STAMP_KEY",
    "Fingerprint",
    "Manifest",
    "OutputPlan",
    "fingerprint",
    "identity",
    "model_digest",
    "prepare_outputs",
    "write_json_atomic",
]

MANIFEST_NAME = "tilerun-manifest.json"
STAMP_KEY = "tilerun"
_FORMAT = "tilerun.manifest/1"


def write_json_atomic(obj: Any, path: str | os.PathLike) -> None:
    """JSON to a hidden temporary file in the same folder, then rename (names stay readable UTF-8)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        data = json.dumps(obj, indent=2, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:  # file names that are not valid UTF-8 (surrogate escapes)
        data = json.dumps(obj, indent=2).encode("ascii")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data + b"\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def model_digest(model) -> str:
    """SHA-256 of a module's class, config and every tensor of its state dict (names, dtypes, shapes, bytes)."""
    import torch

    h = hashlib.sha256()
    h.update(f"{type(model).__module__}.{type(model).__qualname__}\n".encode())
    cfg = getattr(model, "cfg", None)
    if cfg is not None and hasattr(cfg, "to_dict"):
        h.update(json.dumps(cfg.to_dict(), sort_keys=True).encode())
    palette = getattr(model, "palette", None)
    if palette is not None:
        h.update(json.dumps([list(c) for c in palette]).encode())  # colours of the class map
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"\n{name} {t.dtype} {tuple(t.shape)}\n".encode())
        # Viewing as bytes works for every dtype, bfloat16 included (numpy has none).
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class Fingerprint:
    """The settings that change output bytes; see the module docstring."""

    settings: Mapping[str, Any]

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(dict(self.settings), sort_keys=True).encode()).hexdigest()[:32]

    def differences(self, other: Mapping[str, Any]) -> list[str]:
        """What differs from the recorded ``other``, in words: ``["model differs", "--halo 4, was exact"]``."""
        out = []
        for k in sorted(set(self.settings) | set(other)):
            now, was = self.settings.get(k), other.get(k)
            if now == was:
                continue
            if k == "model":
                out.append("model differs")
            elif k == "tilerun":
                out.append(f"tilerun {now}, was {was}")
            else:  # halo and tile: recorded only when the halo is below the measured one
                out.append(f"--{k} {'exact' if now is None else now}, was {'exact' if was is None else was}")
        return out


def fingerprint(*, model, engine, version: str | None = None) -> Fingerprint:
    """The fingerprint of running ``model`` through ``engine`` (a tilerun `Engine`)."""
    if version is None:
        from . import __version__ as version
    measured = engine.probe.halo
    # tile 0 (whole image per forward) is exact whatever the halo.
    exact = engine.tile == 0 or (measured is not None and engine.halo >= measured)
    settings: dict[str, Any] = {"tilerun": version, "model": model_digest(model)}
    if not exact:
        settings["halo"] = engine.halo
        settings["tile"] = engine.tile
    if getattr(engine, "precision", "fp32") != "fp32":  # reduced precision moves more than float ties
        settings["precision"] = engine.precision
    return Fingerprint(settings)


def _file_id(path: Path | None) -> list[int] | None:
    if path is None:
        return None
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def identity(item: InputItem, *, mask_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """What an output was made from: the input's and its sidecar mask's size and mtime (OSError if gone),
    and where the input was (``source``: to tell another folder's same-named input from an edit)."""
    return {"input": _file_id(item.path), "mask": _file_id(sidecar_mask_path(item, mask_dir)),
            "source": os.path.abspath(item.path)}


# Identity fields that decide whether an output is current; ``source`` does not: a moved
# input folder (same files, same sizes and mtimes) resumes.
_CURRENT_KEYS = ("input", "mask")


class Manifest:
    """The fingerprint recorded in OUTPUT and the per-output stamps checked against it."""

    def __init__(self, out_dir: Path, fp: Fingerprint, *, overwrite: bool) -> None:
        self.out_dir, self.fp, self.overwrite = Path(out_dir), fp, overwrite

    @property
    def path(self) -> Path:
        return self.out_dir / MANIFEST_NAME

    @classmethod
    def load(cls, out_dir: str | os.PathLike, fp: Fingerprint, *, overwrite: bool = False) -> "Manifest":
        """Check OUTPUT's recorded fingerprint against ``fp``; OutputExistsError if they differ (no --overwrite).

        Reads only: every process of a job may call it. `claim` writes.
        """
        m = cls(Path(out_dir), fp, overwrite=overwrite)
        if overwrite or not m.path.exists():
            return m
        try:
            recorded = json.loads(m.path.read_text(encoding="utf-8"))
            settings = recorded["fingerprint"]
            if recorded.get("format") != _FORMAT or not isinstance(settings, dict):
                raise ValueError(f"format {recorded.get('format')!r}")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise OutputExistsError(
                f"{m.path} is unreadable ({e}); rerun with --overwrite to redo every output, or choose another OUTPUT"
            ) from e
        diff = fp.differences(settings)
        if diff:
            raise OutputExistsError(
                f"{out_dir} holds outputs made with other settings ({'; '.join(diff)}); "
                "rerun with --overwrite to redo them all, or choose another OUTPUT"
            )
        return m

    def check_unclaimed(self, paths: Iterable[Path]) -> None:
        """Refuse to replace files in an OUTPUT that no manifest claims (an older run's, or a user's own files)."""
        if self.overwrite or self.path.exists():
            return
        existing = [p for p in paths if os.path.lexists(p)]
        if existing:
            raise OutputExistsError(
                f"{existing[0]} (and {len(existing) - 1} more) exist but {self.out_dir} has no {MANIFEST_NAME} "
                "saying which model made them; rerun with --overwrite to replace them, or choose another OUTPUT"
            )

    def claim(self) -> None:
        """Record this job's fingerprint in OUTPUT (once, by one process, before any output is written)."""
        write_json_atomic({"format": _FORMAT, "digest": self.fp.digest, "fingerprint": dict(self.fp.settings)}, self.path)

    def stamp(self, ident: Mapping[str, Any], kinds: Iterable[str]) -> str:
        """The text chunk for one input's outputs: digest, what they were made from, which outputs were written."""
        return json.dumps({"digest": self.fp.digest, **ident, "outputs": sorted(kinds)}, sort_keys=True)

    @staticmethod
    def _stamps(paths: Mapping[str, Path]) -> dict[str, Any] | None:
        """The parsed stamps of the outputs at ``paths`` (None if one is unreadable)."""
        stamps = {}
        for kind, path in paths.items():
            raw = read_output_text(path, STAMP_KEY)
            if raw is not None:
                try:
                    stamps[kind] = json.loads(raw)
                except ValueError:
                    return None
        return stamps

    def made_from_elsewhere(self, ident: Mapping[str, Any], paths: Mapping[str, Path]) -> str | None:
        """The other input an existing output at ``paths`` was made from, if it was not this one.

        Another file (size or mtime differ) at another path: a second job's same-named input
        writing into this OUTPUT, which would silently replace the first job's results.
        """
        if self.overwrite:
            return None
        for got in (self._stamps(paths) or {}).values():
            if not isinstance(got, dict) or not got.get("source"):
                continue
            if got["source"] != ident.get("source") and got.get("input") != ident.get("input"):
                return str(got["source"])
        return None

    def needs_run(self, ident: Mapping[str, Any], paths: Mapping[str, Path]) -> bool:
        """False when the outputs at ``paths`` are complete, made with this fingerprint from the input ``ident`` names."""
        if self.overwrite:
            return True
        stamps = self._stamps(paths)
        if not stamps:
            return True
        want = {"digest": self.fp.digest, **{k: ident.get(k) for k in _CURRENT_KEYS}}
        for got in stamps.values():
            if not isinstance(got, dict) or any(got.get(k) != v for k, v in want.items()):
                return True
            # Every output listed when the input was done must still be there (and stamped).
            if any(kind not in stamps for kind in got.get("outputs") or ()):
                return True
        return False


@dataclass
class OutputPlan:
    """Where every input's outputs go and which inputs still need work: decided once, before any write."""

    manifest: Manifest
    paths: dict[str, dict[str, Path]]  # item.key -> kind -> path (the collision rule applied)
    todo: list[InputItem]
    done: list[InputItem]
    identities: dict[str, dict[str, Any]]  # item.key -> identity, taken before the input is read

    def outputs(self, item: InputItem) -> dict[str, Path]:
        return self.paths[item.key]

    def output_text(self, item: InputItem, kinds: Iterable[str]) -> dict[str, str]:
        """The text entries for ``item``'s outputs (`runner.write_outputs`'s ``text_for``)."""
        ident = self.identities.get(item.key)
        return {} if ident is None else {STAMP_KEY: self.manifest.stamp(ident, kinds)}

    def done_info(self, item: InputItem) -> dict[str, Any]:
        """``outputs`` and ``size`` (width, height) of an input resumed from an earlier run, for its report entry."""
        outputs = [p for p in self.paths[item.key].values() if p.exists()]
        size = None
        for p in outputs:
            try:
                with Image.open(p) as im:
                    size = im.size
                break
            except (OSError, SyntaxError, ValueError):
                continue
        return {"outputs": [str(p) for p in outputs], "size": size}

    def all_paths(self) -> list[Path]:
        return [p for kinds in self.paths.values() for p in kinds.values()]


def prepare_outputs(
    items: list[InputItem],
    out_dir: str | os.PathLike,
    *,
    fp: Fingerprint,
    overwrite: bool = False,
    mask_dir: str | os.PathLike | None = None,
    claim: bool = True,
    fmt: str = "png",
) -> OutputPlan:
    """Plan outputs, check OUTPUT's fingerprint, and split ``items`` into to-do and already done.

    Raises OutputExistsError (exit 2) when OUTPUT was made with other settings and
    ``overwrite`` is false. ``claim``: write the manifest (one process of a job, the
    writer); every process may plan and gets the same answer as long as no output of
    this job has been written yet. ``fmt``: the outputs' file format (`images.OUTPUT_FORMATS`).
    """
    paths = plan_outputs(items, out_dir, fmt=fmt)
    manifest = Manifest.load(out_dir, fp, overwrite=overwrite)
    manifest.check_unclaimed(p for kinds in paths.values() for p in kinds.values())
    todo, done, identities, foreign = [], [], {}, []
    for item in items:
        try:
            identities[item.key] = identity(item, mask_dir=mask_dir)
        except OSError:  # unreadable input or mask: the run reports why
            todo.append(item)
            continue
        other = manifest.made_from_elsewhere(identities[item.key], paths[item.key])
        if other is not None:
            foreign.append((item, other))
        (todo if manifest.needs_run(identities[item.key], paths[item.key]) else done).append(item)
    if foreign:
        item, other = foreign[0]
        more = f" (and {len(foreign) - 1} more inputs)" if len(foreign) > 1 else ""
        raise OutputExistsError(
            f"{item.path}: its outputs in {out_dir} were made from another file, {other}{more}; "
            "rerun with --overwrite to replace them, or choose another OUTPUT"
        )
    if claim:
        manifest.claim()
    return OutputPlan(manifest, paths, todo, done, identities)
