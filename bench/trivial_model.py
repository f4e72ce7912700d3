"""A model that computes next to nothing (1x1 convolutions), so that a CLI job over it is
the host side alone: decoding, windows, results through the scheduler, stitching, PNGs.
It is how a CPU stands in for a GPU host, whose CLI job is mostly this host side
(python bench/end_to_end.py --device cuda --timeline shows it there):

    PYTHONPATH=bench tilerun run FOLDER OUT --model trivial_model:make --tile 1024 --overwrite
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Trivial(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cls = nn.Conv2d(4, 16, 1)
        self.rgb = nn.Conv2d(4, 3, 1)

    def forward(self, image: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        x = torch.cat([image * (1 - mask), mask], 1)
        return self.cls(x), torch.sigmoid(self.rgb(x))


def make() -> nn.Module:
    torch.manual_seed(0)
    return Trivial()
