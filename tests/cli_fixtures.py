"""Fixtures for CLI tests of inputs and reliability: `tilerun run` in-process (click's CliRunner) with the
small sensitive test model saved as a file, as a user would pass it with --model.

The probe (measuring the receptive field, ~15 s on 2 cores) is the slow part of every `tilerun run`;
it is measured once per session (conftest's ``sensitive_probe``) and handed to every Engine built
for a model of the same architecture. Probing itself is tested in test_receptive.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
from click.testing import CliRunner, Result


@pytest.fixture(scope="session")
def model_file(tmp_path_factory, sensitive_model) -> Path:
    from tilerun.model import save_tilenet

    path = tmp_path_factory.mktemp("model") / "sensitive.safetensors"
    save_tilenet(sensitive_model, path)
    return path


@pytest.fixture(scope="session")
def other_model_file(tmp_path_factory, sensitive_model) -> Path:
    """The same architecture with one weight changed: other outputs, another fingerprint."""
    import copy

    import torch

    from tilerun.model import save_tilenet

    other = copy.deepcopy(sensitive_model)
    with torch.no_grad():
        next(p for p in other.parameters() if p.ndim > 1).add_(0.5)
    path = tmp_path_factory.mktemp("model") / "other.safetensors"
    save_tilenet(other, path)
    return path


@pytest.fixture
def run_cli(monkeypatch, sensitive_model, sensitive_probe, model_file) -> Callable[..., Result]:
    """``run_cli(INPUT, OUTPUT, *options, model=model_file)`` -> click Result of ``tilerun run`` with ``--tile 64``."""
    import tilerun.receptive as receptive
    from tilerun.cli import main

    real = receptive.probe_model

    def probe(model, **kw):
        same = getattr(model, "cfg", None) == sensitive_model.cfg
        return sensitive_probe if same else real(model, **kw)

    monkeypatch.setattr(receptive, "probe_model", probe)  # what the CLI's probe_cached calls

    def invoke(input_path, output, *options: str, model: Path | None = model_file, tile: int = 64) -> Result:
        args = ["run", str(input_path), str(output), "--tile", str(tile), "--device", "cpu", *map(str, options)]
        if model is not None:
            args += ["--model", str(model)]
        return CliRunner().invoke(main, args)

    return invoke
