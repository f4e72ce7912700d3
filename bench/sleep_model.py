"""A model that holds the "device" for as long as a card of RATE pixels a second would, and
computes next to nothing: the scale-out benchmark's stand-in for a GPU, as seen from the host.

``forward`` sleeps (which lets go of the GIL and uses no CPU) for its batch's pixels / RATE
seconds and returns views of its input: 2-channel logits (the class map) and the image
itself (the inpainting). Pointwise, so its halo is 0. RATE: ``TILERUN_SLEEP_RATE``
(pixels a second, default 8e6, the issue's 8 MP/s card):

    PYTHONPATH=bench tilerun run FOLDER OUT --model sleep_model:make --tile 512
"""

from __future__ import annotations

import os
import time

import torch
from torch import Tensor, nn

RATE = float(os.environ.get("TILERUN_SLEEP_RATE", 8e6))


class Sleep(nn.Module):
    def forward(self, image: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        b, _, h, w = image.shape
        time.sleep(b * h * w / RATE)
        return image[:, :2], image


def make() -> nn.Module:
    torch.manual_seed(0)
    return Sleep()
