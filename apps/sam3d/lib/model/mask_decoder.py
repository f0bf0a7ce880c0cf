"""The lightweight 3D multi-layer-aggregation (MLA) decoder of the 3DSAM-adapter.

Axis convention: feature maps and volumes ``(B, C, D, H, W)``.
"""

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def conv_norm_relu(in_chans: int, out_chans: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(in_chans, out_chans, 3, padding=1, bias=False), nn.InstanceNorm3d(out_chans), nn.ReLU()
    )


def upsample2(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=True)


class MaskDecoder3d(nn.Module):
    """Four feature maps at grid ``g`` + the crop at ``2g`` -> class logits at ``4g`` (the crop's grid)."""

    def __init__(self, in_chans: int = 256, head_chans: int = 128, num_classes: int = 2) -> None:
        super().__init__()
        self.heads = nn.ModuleList(
            nn.Sequential(*conv_norm_relu(in_chans, head_chans), *conv_norm_relu(head_chans, head_chans))
            for _ in range(4)
        )
        self.classifier = nn.Sequential(
            *conv_norm_relu(4 * head_chans + 1, head_chans),
            nn.Conv3d(head_chans, num_classes, 3, padding=1, bias=False),
        )

    def shallow(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """The three shallower (B, in_chans, g, g, g) maps through their heads: (B, 3 * head_chans, g, g, g).

        They do not depend on the clicks, so a crop's refinement clicks reuse them."""
        return torch.cat([head(f) for head, f in zip(self.heads[:3], features)], dim=1)

    def forward(self, shallow: torch.Tensor, deep: torch.Tensor, low_res_image: torch.Tensor) -> torch.Tensor:
        """shallow: (B, 3 * head_chans, g, g, g) from :meth:`shallow`; deep: (B, in_chans, g, g, g), the deepest
        map conditioned on the clicks; low_res_image: (B, 1, 2g, 2g, 2g) -> logits (B, num_classes, 4g, 4g, 4g)."""
        x = upsample2(torch.cat([shallow, self.heads[3](deep)], dim=1))
        return upsample2(self.classifier(torch.cat([x, low_res_image], dim=1)))
