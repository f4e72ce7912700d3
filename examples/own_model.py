"""Bring your own model to tilerun: the contract, a TorchScript file, a .pt2 and a factory.

The contract (README "Your own model"): ``forward(image, mask)`` with ``image`` float
[N,3,H,W] in [0,1] and ``mask`` float [N,1,H,W], 1 = missing, returns
``(logits [N,K,H,W], rgb [N,3,H,W])`` -- or only one of them. Any H and W must work
(tiles at image borders are smaller). tilerun measures the receptive field and stride
itself, so nothing about them is declared here.

    python examples/own_model.py /tmp/own          # writes /tmp/own/own.pt and /tmp/own/own.pt2
    tilerun run sample_images out --model /tmp/own/own.pt
    tilerun run sample_images out --model /tmp/own/own.pt2
    cd examples && tilerun run ../sample_images ../out --model own_model:make_model
    tilerun inspect /tmp/own/own.pt2
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class OwnModel(nn.Module):
    """Fully convolutional: dilated 3x3 convolutions, receptive-field radius 1 + 2 + 4 + 1 = 8."""

    def __init__(self, classes: int = 6, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(4, width, 3, padding=1)
        self.context = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=2, dilation=2), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=4, dilation=4), nn.ReLU(),
        )
        self.fuse = nn.Conv2d(2 * width, width, 3, padding=1)
        self.logits = nn.Conv2d(width, classes, 1)
        self.rgb = nn.Conv2d(width, 3, 1)

    def forward(self, image: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        x = torch.cat([image * (1 - mask), mask], 1)  # missing pixels carry no colour
        f = F.relu(self.stem(x))
        f = F.relu(self.fuse(torch.cat([f, self.context(f)], 1)))
        rgb = torch.sigmoid(self.rgb(f))
        return self.logits(f), image * (1 - mask) + rgb * mask  # known pixels pass through


def make_model() -> nn.Module:
    """The factory form: ``--model own_model:make_model`` (load your weights here, safely:
    ``model.load_state_dict(torch.load(path, weights_only=True))``)."""
    torch.manual_seed(0)
    return OwnModel().eval()


def export(out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``own.pt`` (TorchScript) and ``own.pt2`` (torch.export) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = make_model()
    ts_path, ep_path = out / "own.pt", out / "own.pt2"
    torch.jit.save(torch.jit.script(model), str(ts_path))
    # Batch, height and width must stay dynamic: tilerun batches tiles of varying size.
    # An example with batch 2 and odd sizes keeps export from specialising them.
    example = (torch.rand(2, 3, 67, 61), torch.zeros(2, 1, 67, 61))
    auto = {0: torch.export.Dim.AUTO, 2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO}
    program = torch.export.export(model, example, dynamic_shapes={"image": auto, "mask": auto})
    torch.export.save(program, str(ep_path))
    return ts_path, ep_path


if __name__ == "__main__":
    for p in export(sys.argv[1] if len(sys.argv) > 1 else "."):
        print(p)
