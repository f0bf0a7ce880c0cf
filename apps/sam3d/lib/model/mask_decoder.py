"""The lightweight 3D multi-layer-aggregation (MLA) decoder of the 3DSAM-adapter.

Axis convention: feature maps and volumes ``(B, C, D, H, W)``.
"""

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .conv import Conv3d, conv3d


def conv_norm_relu(in_chans: int, out_chans: int) -> nn.Sequential:
    return nn.Sequential(
        Conv3d(in_chans, out_chans, 3, padding=1, bias=False), nn.InstanceNorm3d(out_chans), nn.ReLU()
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
            Conv3d(head_chans, num_classes, 3, padding=1, bias=False),
        )

    def prepare(self, features: Sequence[torch.Tensor], low_res_image: torch.Tensor) -> torch.Tensor:
        """The click-independent part of the decoder, computed once per crop.

        features: the three shallower (B, in_chans, g, g, g) maps; low_res_image: (B, 1, 2g, 2g, 2g).
        The classifier's first convolution is linear in its concatenated input, so its share from these
        inputs is summed here: (B, head_chans, 2g, 2g, 2g). A refinement click then convolves only the
        deepest head's channels."""
        shallow = upsample2(torch.cat([head(f) for head, f in zip(self.heads[:3], features)], dim=1))
        weight = self.classifier[0].weight
        return conv3d(shallow, weight[:, : shallow.shape[1]], padding=1) + conv3d(
            low_res_image, weight[:, -1:], padding=1
        )

    def forward(self, prepared: torch.Tensor, deep: torch.Tensor) -> torch.Tensor:
        """prepared: (B, head_chans, 2g, 2g, 2g) from :meth:`prepare`; deep: (B, in_chans, g, g, g), the deepest
        map conditioned on the clicks -> logits (B, num_classes, 4g, 4g, 4g)."""
        deep_head = upsample2(self.heads[3](deep))
        start = 3 * deep_head.shape[1]
        weight = self.classifier[0].weight[:, start : start + deep_head.shape[1]]
        x = prepared + conv3d(deep_head, weight, padding=1)
        return upsample2(self.classifier[1:](x))
