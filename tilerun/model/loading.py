"""Loading a model for tilerun: this project's checkpoints, TorchScript, exported programs, import paths.

**Never unpickle.** Unpickling runs whatever code the file names, so a model file
from elsewhere is recognised by its *content* (never its extension) and only
formats that cannot run Python code on load are accepted:

* ``.safetensors`` with tilerun metadata: plain tensors and a JSON header;
* TorchScript archives (``torch.jit.save``): TorchScript's own unpickler resolves
  only tensors and TorchScript classes, and refuses a foreign global such as
  ``os.system`` ("Unknown type name");
* exported programs (``torch.export.save``, ``.pt2``): ``torch.export.load``
  *does* call ``torch.load(weights_only=False)`` and ``pickle.loads`` on some
  archive members (pickled weights and constants, opaque objects, the pre-2.8
  layout, and as a fallback for the sample inputs), and loads native code for
  AOTInductor packages. So the archive is vetted first: every member that would be
  unpickled must be absent or load under ``torch.load(weights_only=True)``;
* ``package.module:factory`` -- Python code the user names on purpose, imported
  like uvicorn's ``module:app`` (the current directory is searched first).

A plain pickle or a ``torch.save`` file (itself a zip holding ``data.pkl``) is
refused with `ModelLoadError`, whatever its extension. tilerun does not load a
``torch.save`` state dict even with ``weights_only=True``: a state dict carries no
architecture, so it would need the user's class anyway -- the factory form is
where that belongs (build the model, ``load_state_dict(torch.load(p,
weights_only=True))``).

Every loaded model is checked against the contract on a small input before any
image is read: ``forward(image [N,3,H,W] in [0,1], mask [N,1,H,W], 1 = missing)``
returns ``(logits [N,K,H,W], rgb [N,3,H,W])``, or one of them alone.
"""

from __future__ import annotations

import importlib
import io
import json
import os
import pickle
import re
import struct
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import ModelLoadError
from .net import TileNet, default_palette
from .weights import DEFAULT_WEIGHTS, init_tilenet, load_tilenet, read_metadata

__all__ = [
    "load_model",
    "model_format",
    "is_import_path",
    "ModelOutputs",
    "check_contract",
    "ExportedModel",
    "tile_exact_warning",
    "model_identity",
    "model_source_identity",
]

# `package.module:factory` (or `module:attr.attr`): dotted identifiers, one colon.
_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")

_PICKLE_ADVICE = (
    "tilerun refuses pickles in model files (unpickling can run arbitrary code). "
    "Export the model with torch.jit.save (TorchScript) or torch.export.save (.pt2), "
    "or pass a factory 'package.module:make_model' that builds it and loads the weights "
    "with torch.load(path, weights_only=True)"
)


def is_import_path(spec: str) -> bool:
    """True for ``package.module:factory`` (and not for an existing file such as ``C:model.pt``)."""
    return bool(_IMPORT_PATH.match(spec)) and not os.path.exists(spec)


# -- recognising a file by its content ----------------------------------------------


def _zip_members(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as z:
            return z.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise ModelLoadError(f"{path}: a damaged zip archive ({e})") from e


def _archive_root(names: list[str]) -> str:
    """torch archives keep everything under one top folder (its name is free)."""
    tops = {n.split("/", 1)[0] for n in names if "/" in n}
    return tops.pop() + "/" if len(tops) == 1 else ""


def model_format(path: str | os.PathLike) -> str:
    """``"safetensors"``, ``"torchscript"`` or ``"exported"``, judged from the bytes.

    Raises `ModelLoadError` for a pickle, a ``torch.save`` archive and anything unknown.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(16)
        size = path.stat().st_size
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read the model file ({e.strerror})") from e
    if head[:4] == b"PK\x03\x04":
        names = _zip_members(path)
        root = _archive_root(names)
        rel = {n[len(root):] for n in names if n.startswith(root)}
        if any(n.startswith("code/") for n in rel) and "constants.pkl" in rel:
            return "torchscript"
        if "archive_format" in rel or ("version" in rel and "serialized_exported_program.json" in rel):
            return "exported"
        if "data.pkl" in rel:
            raise ModelLoadError(f"{path}: a torch.save pickle (zip with data.pkl), refused. {_PICKLE_ADVICE}")
        raise ModelLoadError(f"{path}: a zip archive that is neither TorchScript nor a torch.export .pt2")
    # safetensors: u64 little-endian header length, then a JSON object.
    if len(head) >= 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] <= size - 8:
        return "safetensors"
    # Pickle protocols 2-5 open with PROTO; a legacy (non-zip) torch.save is a pickle too.
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        raise ModelLoadError(f"{path}: a Python pickle, refused. {_PICKLE_ADVICE}")
    raise ModelLoadError(
        f"{path}: not a model format tilerun loads (.safetensors from tilerun, TorchScript, "
        "torch.export .pt2, or package.module:factory)"
    )


# -- exported programs ---------------------------------------------------------------


def _vet_pt2(path: Path) -> None:
    """Refuse a .pt2 archive in which torch.export.load would unpickle or load native code."""
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        root = _archive_root(names)
        rel = {n[len(root):]: n for n in names if n.startswith(root)}

        def refuse(why: str) -> ModelLoadError:
            return ModelLoadError(f"{path}: refused: {why}. {_PICKLE_ADVICE}")

        if "archive_format" not in rel or z.read(rel["archive_format"]).strip() != b"pt2":
            raise refuse("the pre-2.8 torch.export layout, which stores pickles (re-export with a current torch)")
        for name in rel:
            if name.startswith("data/aotinductor/"):
                raise refuse("an AOTInductor package (compiled native code)")
            if re.fullmatch(r"data/(weights|constants)/[^/]+\.pt", name):
                raise refuse(f"legacy pickled {name}")
            if re.fullmatch(r"data/(weights|constants)/[^/]+_config\.json", name):
                try:
                    config = json.loads(z.read(rel[name])).get("config", {})
                except (ValueError, AttributeError) as e:
                    raise ModelLoadError(f"{path}: malformed {name} ({e})") from e
                for fqn, meta in config.items():
                    if meta.get("use_pickle"):
                        raise refuse(f"{fqn} is stored as a pickle")
                    if name.startswith("data/constants/") and not str(meta.get("path_name", "")).startswith("tensor_"):
                        raise refuse(f"constant {fqn} is a pickled object")
        # The sample inputs are read with weights_only=True and, on failure, weights_only=False:
        # make sure the safe reader accepts them, so the unsafe fallback can never run.
        for name in rel:
            if name.startswith("data/sample_inputs/"):
                try:
                    torch.load(io.BytesIO(z.read(rel[name])), weights_only=True)
                except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError) as e:
                    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
                    why = f"it calls {found.group(1)}" if found else str(e).strip().splitlines()[0][:120]
                    raise refuse(f"{name} is a pickle that is not plain tensors ({why})") from e


class ExportedModel(nn.Module):
    """An exported program's module under the plain nn.Module interface the engine uses.

    Exported graphs refuse ``.train()``/``.eval()`` (their mode is fixed at export),
    so this wrapper keeps the flag without recursing; and a graph exported with a
    static batch size of 1 is run one window at a time.
    """

    def __init__(self, graph: nn.Module, *, static_batch: int | None) -> None:
        super().__init__()
        self.graph = graph
        self.static_batch = static_batch

    def train(self, mode: bool = True) -> "ExportedModel":
        self.training = mode
        return self

    def __deepcopy__(self, memo) -> "ExportedModel":
        # The probe works on a deep copy; copying an exported graph's tree specs makes torch
        # warn about its own deprecated LeafSpec on every run. Nothing for the user to act on.
        import copy
        import warnings

        new = ExportedModel.__new__(ExportedModel)
        memo[id(self)] = new
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new

    def forward(self, image: Tensor, mask: Tensor):
        if self.static_batch is None or image.shape[0] == self.static_batch:
            return self.graph(image, mask)
        if self.static_batch != 1:
            raise ModelLoadError(f"exported with a fixed batch of {self.static_batch}; export with a dynamic batch dim")
        outs = [self.graph(image[i : i + 1], mask[i : i + 1]) for i in range(image.shape[0])]
        if isinstance(outs[0], (tuple, list)):
            return tuple(torch.cat(parts) for parts in zip(*outs))
        return torch.cat(outs)


def _load_exported(path: Path) -> nn.Module:
    _vet_pt2(path)
    try:
        program = torch.export.load(str(path))
    except (RuntimeError, ValueError, KeyError, AssertionError) as e:
        raise ModelLoadError(f"{path}: torch.export.load failed ({e})") from e
    batch = None
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder" and n.name in program.graph_signature.user_inputs]
    if placeholders:
        dim0 = placeholders[0].meta.get("val").shape[0] if "val" in placeholders[0].meta else None
        batch = dim0 if isinstance(dim0, int) else None
    return ExportedModel(program.module(), static_batch=batch)


# -- import paths ----------------------------------------------------------------------


def _load_factory(spec: str) -> nn.Module:
    module_name, _, attr = spec.partition(":")
    # Like uvicorn's `module:app`: a module in the current directory is found without installing it.
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise ModelLoadError(
            f"--model {spec}: cannot import {e.name!r} (install the package, or run from the folder that holds it)"
        ) from e
    finally:
        if added:
            sys.path.remove(cwd)
    obj = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as e:
            raise ModelLoadError(f"--model {spec}: {module_name} has no attribute {attr!r}") from e
    if not isinstance(obj, nn.Module):
        if not callable(obj):
            raise ModelLoadError(f"--model {spec}: {attr} is neither an nn.Module nor a factory function")
        obj = obj()
    if not isinstance(obj, nn.Module):
        raise ModelLoadError(f"--model {spec}: the factory returned {type(obj).__name__}, not a torch.nn.Module")
    return obj


# -- the contract ----------------------------------------------------------------------


@dataclass(frozen=True)
class ModelOutputs:
    """What one forward of a model gives: K classes (None: no logits) and whether it gives RGB."""

    classes: int | None
    rgb: bool

    @property
    def names(self) -> list[str]:
        return (["pred"] if self.classes is not None else []) + (["inpainted"] if self.rgb else [])


def check_contract(model: nn.Module, *, size: tuple[int, int] = (40, 44)) -> ModelOutputs:
    """Run ``model`` once on a small random input and check the outputs' shapes.

    Raises `ModelLoadError` naming what is wrong. The size is a multiple of 4 but not
    of 8 on purpose: a model whose stride does not divide it must pad, not crash.
    """
    from ..engine import _split_outputs

    h, w = size
    g = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, h, w, generator=g)
    mask = (torch.rand(2, 1, h, w, generator=g) > 0.7).float()
    model.eval()
    try:
        with torch.inference_mode():
            out = model(image, mask)
        logits, rgb = _split_outputs(out)
    except (RuntimeError, TypeError, ValueError, AssertionError) as e:
        raise ModelLoadError(
            "the model does not satisfy tilerun's contract forward(image [N,3,H,W], mask [N,1,H,W]) -> "
            f"(logits [N,K,H,W], rgb [N,3,H,W]) or one of them, on a 2x3x{h}x{w} input: {e}"
        ) from e
    for name, t, channels in (("logits", logits, None), ("rgb", rgb, 3)):
        if t is None:
            continue
        if not isinstance(t, Tensor) or t.ndim != 4 or t.shape[0] != 2 or tuple(t.shape[2:]) != (h, w):
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ModelLoadError(f"the model's {name} must be [N,C,H,W] = [2,C,{h},{w}] for a 2x3x{h}x{w} input, got {shape}")
        if channels is not None and t.shape[1] != channels:
            raise ModelLoadError(f"the model's rgb must have 3 channels, got {t.shape[1]}")
        if name == "logits" and not 1 <= t.shape[1] <= 256:
            raise ModelLoadError(f"the class map is 8-bit: K must be 1..256, got {t.shape[1]}")
    if logits is None and rgb is None:
        raise ModelLoadError("the model returned neither logits nor rgb")
    from ..engine import takes_out_box

    if takes_out_box(model):  # the engine will ask for tiles' cores only: the outputs must be the box's
        box = (0, h // 2, 0, w // 2)
        with torch.inference_mode():
            part = _split_outputs(model(image, mask, out_box=box))
        for name, t in zip(("logits", "rgb"), part):
            if t is not None and tuple(t.shape[2:]) != (h // 2, w // 2):
                raise ModelLoadError(f"forward(..., out_box={box}) must return the box's {name} "
                                     f"[N,C,{h // 2},{w // 2}], got {tuple(t.shape)}; or drop the out_box parameter")
    return ModelOutputs(classes=None if logits is None else int(logits.shape[1]), rgb=rgb is not None)


# -- entry point -----------------------------------------------------------------------


def load_model(spec: str | os.PathLike | None = None, *, check: bool = True) -> nn.Module:
    """The model named by ``spec``, in eval mode, ready for `tilerun.Engine`.

    ``spec``: None (tilerun's default: the shipped trained weights when present, else a
    fixed-seed init), a ``.safetensors``/TorchScript/``.pt2`` file (recognised by content),
    or ``package.module:factory``. With ``check`` (default), a foreign model is run once
    to check the contract; it gets ``palette`` (K colours) and ``outputs`` attributes.
    """
    if spec is None:
        return (load_tilenet(DEFAULT_WEIGHTS) if DEFAULT_WEIGHTS.exists() else init_tilenet()).eval()
    text = os.fspath(spec)
    if is_import_path(text):
        model = _load_factory(text)
        source = text
    else:
        path = Path(text)
        if not path.is_file():
            raise ModelLoadError(f"--model {text}: no such file (or give an import path package.module:factory)")
        kind = model_format(path)
        source = f"{kind} {path.name}"
        if kind == "safetensors":
            if read_metadata(path).get("format") != "tilerun.tilenet/1":
                raise ModelLoadError(
                    f"{path}: safetensors weights without tilerun's metadata, so without an architecture: "
                    "pass a factory package.module:make_model that builds your model and loads them with "
                    "safetensors.torch.load_file"
                )
            return load_tilenet(path)
        if kind == "torchscript":
            try:
                model = torch.jit.load(str(path), map_location="cpu")
            except RuntimeError as e:
                raise ModelLoadError(f"{path}: TorchScript refused to load it ({str(e).strip()[:300]})") from e
        else:
            model = _load_exported(path)
    model.eval()
    if isinstance(model, TileNet) or not check:
        return model
    outputs = check_contract(model)
    if outputs.classes is not None and getattr(model, "palette", None) is None:
        model.palette = default_palette(outputs.classes)
    model.outputs = outputs
    model.tilerun_source = source
    model.tilerun_identity = model_source_identity(text)  # what made it, for resume's fingerprint
    return model


def model_identity(spec: str | os.PathLike | None) -> str | None:
    """A hash of what `load_model` builds from ``spec``, for remembering its probe
    (`tilerun.receptive.probe_cached`): the model file's bytes; None for an import path,
    whose factory may build another model at every call."""
    import hashlib

    if spec is None:
        if not DEFAULT_WEIGHTS.exists():
            return "tilenet-init"  # init_tilenet's fixed seed: the code alone decides it
        spec = DEFAULT_WEIGHTS
    if is_import_path(os.fspath(spec)):
        return None
    h = hashlib.sha256()
    with open(spec, "rb") as f:
        while chunk := f.read(2**20):
            h.update(chunk)
    return h.hexdigest()


def model_source_identity(spec: str | os.PathLike) -> str:
    """A hash of what made the model ``spec`` names, for resume's fingerprint
    (`tilerun.resume.fingerprint`; the state dict is hashed there too).

    A file: its bytes (`model_identity`), which hold a TorchScript or exported program's
    code with its weights. An import path: the spec and the source of the factory's module,
    as imported now (`load_model` calls this right after the import). Code the factory
    reaches in other modules counts through the classes of the model it built
    (`resume.model_digest`); a factory reading weights from a file it names itself is
    covered by the state dict.
    """
    import hashlib
    import inspect

    text = os.fspath(spec)
    if not is_import_path(text):
        return f"file {model_identity(text)}"
    module = sys.modules.get(text.partition(":")[0])
    try:
        source = inspect.getsource(module) if module is not None else ""
    except (OSError, TypeError):  # no source (a compiled module): its name alone
        source = ""
    digest = hashlib.sha256(f"{text}\n{source}".encode()).hexdigest()
    return f"import {digest}"


def tile_exact_warning(probe, *, tile: int | None, halo: int | None) -> str | None:
    """A warning for a model that tiles are not exact for, naming the options that help; else None.

    ``tile``/``halo`` are what the user asked for (``halo`` None = measured).
    """
    if probe.tile_exact:
        return None
    what = (
        "the probe found no bounded receptive field or no translation stride: global pooling, attention, "
        "positional inputs or another whole-image operation"
    )
    if halo is None:
        # The engine falls back to one whole-image forward: exact, but unbounded memory.
        return (
            f"this model is not tile-exact ({what}). tilerun runs each whole image in one forward "
            "(as with --tile 0), so memory grows with the image. To tile anyway, pass --halo N with a big "
            "--tile (results then differ from a whole-image forward near tile seams)."
        )
    return (
        f"this model is not tile-exact ({what}): with --tile {tile} results differ from a whole-image "
        "forward near tile seams. Use a bigger --tile, or --tile 0 for the whole image per process."
    )
