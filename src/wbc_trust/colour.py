"""A lab's colours brought to the training lab's: Reinhard et al.'s colour transfer (2001) for a whole lab.

Another lab's stain, lamp and camera move every image's colours together: BCCD's smears are paler than PBC's (the
lightness of the model's views spreads half as wide) and bluer. ``wbc adapt --unlabelled`` measures the mean and
standard deviation of each CIELAB channel over the lab's views, and the adapted model maps every view it reads from
the lab's statistics to those of the training lab's views (per channel: subtract the lab's mean, scale by the ratio of
standard deviations, add the training lab's mean) before the network. Per lab, not per image: one image's statistics
are partly its cell's (an eosinophil's granules make its view redder), and matching each image to an average would
remove that (``torchstain``'s Reinhard normaliser fits one image to one target image, which is the per-image
version; measured worse in docs/another-lab.md). RGB↔CIELAB by kornia, so the step is part of the network's
forward pass: attacks, Grad-CAM and ONNX see what predictions see. The lab statistic (``lab.py``) still reads the
views as they were photographed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from kornia.color import lab_to_rgb, rgb_to_lab
from torch import nn

from wbc_trust.data import to_unit

#: Batches in which the views' CIELAB statistics are summed (uint8 views of 160 px: a few MB each).
_BATCH = 64


@dataclass(frozen=True)
class LabStatistics:
    """Mean and standard deviation of L*, a*, b* over every pixel of a set of views."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def of(cls, images: torch.Tensor) -> LabStatistics:
        """Of uint8 (or [0, 1] float) views N×3×S×S."""
        total, squares, count = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64), 0
        for start in range(0, len(images), _BATCH):
            lab = rgb_to_lab(to_unit(images[start : start + _BATCH])).double()
            total += lab.sum((0, 2, 3))
            squares += (lab**2).sum((0, 2, 3))
            count += lab.numel() // 3
        mean = total / count
        std = (squares / count - mean**2).clamp(min=1e-6).sqrt()
        return cls(tuple(mean.tolist()), tuple(std.tolist()))

    def to_meta(self) -> dict:
        return {"mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_meta(cls, meta: dict) -> LabStatistics:
        return cls(tuple(meta["mean"]), tuple(meta["std"]))


class ColourTransfer(nn.Module):
    """Views in [0, 1] RGB from the ``lab``'s colour statistics to the ``home`` lab's (Reinhard's transfer in CIELAB)."""

    def __init__(self, lab: LabStatistics, home: LabStatistics) -> None:
        super().__init__()
        self.lab, self.home = lab, home
        shape = (1, 3, 1, 1)
        scale = torch.tensor(home.std) / torch.tensor(lab.std)
        self.register_buffer("scale", scale.float().view(shape), persistent=False)
        shift = torch.tensor(home.mean) - torch.tensor(lab.mean) * scale
        self.register_buffer("shift", shift.float().view(shape), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # in fp32 whatever the autocast around it: CIELAB in bf16 rounds L* by up to 0.5 and moves probabilities
        with torch.autocast(x.device.type, enabled=False):
            return lab_to_rgb(rgb_to_lab(x.float()) * self.scale + self.shift, clip=True).to(x.dtype)

    def to_meta(self) -> dict:
        """``meta["colour"]``: both labs' statistics (enough to rebuild the step, and to read what it does)."""
        return {
            "method": "Reinhard colour transfer in CIELAB (per lab)",
            "lab": self.lab.to_meta(),
            "home": self.home.to_meta(),
        }

    @classmethod
    def from_meta(cls, meta: dict) -> ColourTransfer:
        return cls(LabStatistics.from_meta(meta["lab"]), LabStatistics.from_meta(meta["home"]))
