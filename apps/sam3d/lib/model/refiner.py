"""sam3d's full-resolution refiner: the decoder's answer corrected where the user clicked, at the crop's grid.

The authors' decoder answers at half the crop's resolution (upsampled by two at the end) and hears clicks only
through 8-voxel-or-coarser tokens, so a correction click on a mask's boundary (where most errors of a first
click lie: a shell one to two voxels deep) has nothing it can move. As nnInteractive feeds its prompts as
full-resolution input channels, the refiner sees, voxel by voxel: the crop's intensities, the decoder's answer,
the previous prediction, and maps of the foreground and background clicks; a few convolutions turn them into a
correction of the decoder's logits. Its last convolution starts at zero: an authors' checkpoint answers exactly
as theirs until training has taught it. Axis convention: volumes ``(B, C, D, H, W)``, clicks ``(d, h, w)``.
"""

from typing import Optional

import torch
from torch import nn

# Inputs, in order: intensities, decoder's foreground probability, previous foreground probability (both mapped
# to [-1, 1]; 0 where there is none), foreground click map, background click map.
REFINER_INPUTS = 5
# A voxel belongs to a mask, or a click's neighbourhood, above a probability (map value) of 0.1: -0.8 in [-1, 1].
PRESENT = -0.8
# The working box's growth, in voxels: the convolutions' reach (a 3x3x3 and a dilated one, 1 + 2) and some more,
# so that a mask can grow past its bounding box.
MARGIN = 6


def click_maps(points: torch.Tensor, labels: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """points: (B, N, 3) (d, h, w) voxel indices; labels: (B, N) 1 = foreground, 0 = background ->
    (B, 2, S, S, S): per click type, the largest Gaussian (``sigma`` voxels) of its clicks, in [0, 1].

    A Gaussian is separable: each click costs three 1-D profiles and their outer product, kept as a running
    maximum so that memory does not grow with the clicks."""
    axis = torch.arange(size, device=points.device, dtype=torch.float32)
    profiles = torch.exp(-((axis - points.float()[..., None]) ** 2) / (2 * sigma**2))  # (B, N, 3, S)
    maps = torch.zeros(points.shape[0], 2, size, size, size, device=points.device)
    for click in range(points.shape[1]):
        d, h, w = profiles[:, click, 0], profiles[:, click, 1], profiles[:, click, 2]
        bump = d[:, :, None, None] * h[:, None, :, None] * w[:, None, None, :]  # (B, S, S, S)
        for channel, kind in enumerate((1, 0)):
            chosen = (labels[:, click] == kind)[:, None, None, None]
            maps[:, channel] = torch.where(chosen, torch.maximum(maps[:, channel], bump), maps[:, channel])
    return maps


class Refiner(nn.Module):
    """(B, 5, S, S, S) inputs -> (B, 2, S, S, S) corrections added to the decoder's class logits."""

    def __init__(self, chans: int = 8, sigma: float = 4.0) -> None:
        super().__init__()
        # Click maps' width in crop voxels: wide enough that one click on an error shell (one to two voxels deep)
        # reaches the neighbouring part of it, narrow enough to stay on its side of the lesion.
        self.sigma = sigma
        self.net = nn.Sequential(
            nn.Conv3d(REFINER_INPUTS, chans, 3, padding=1),
            nn.GELU(),
            nn.Conv3d(chans, chans, 3, padding=2, dilation=2),
            nn.GELU(),
            nn.Conv3d(chans, 2, 1),
        )
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(
        self,
        image: torch.Tensor,
        logits: torch.Tensor,
        points: torch.Tensor,
        labels: torch.Tensor,
        previous: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """image: (B, 1, S, S, S) intensities; logits: (B, 2, S, S, S) the decoder's; points: (B, N, 3);
        labels: (B, N); previous: (B, 1, S, S, S) log-odds or None -> refined logits (B, 2, S, S, S)."""
        answer = (logits[:, 1:] - logits[:, :1]).sigmoid() * 2 - 1
        previous = torch.zeros_like(answer) if previous is None else previous.float().sigmoid() * 2 - 1
        maps = click_maps(points, labels, image.shape[-1], self.sigma).to(answer)
        box = (slice(None), slice(None)) + self.working_box(answer, previous, maps)
        inputs = torch.cat([image.to(answer), answer, previous, maps], dim=1)[box]
        refined = logits.clone()
        refined[box] = logits[box] + self.net(inputs).to(logits.dtype)
        return refined

    def working_box(self, answer: torch.Tensor, previous: torch.Tensor, maps: torch.Tensor):
        """The part of the crop where the refiner works, the same in training and serving: the bounding box of
        the decoder's mask, the previous mask and the clicks' neighbourhoods, grown by the refiner's reach.
        A lesion covers a small part of a 128-voxel crop, and the refiner's convolutions at the crop's full
        resolution would otherwise cost more than the decoder."""
        with torch.no_grad():
            region = ((answer > PRESENT) | (previous > PRESENT) | (maps > PRESENT + 1)).any(dim=(0, 1))
        size = region.shape
        if not region.any():
            return tuple(slice(0, n) for n in size)
        bounds = [torch.nonzero(region.any(dim=tuple(a for a in range(3) if a != axis)))[:, 0] for axis in range(3)]
        return tuple(
            slice(max(int(b.min()) - MARGIN, 0), min(int(b.max()) + MARGIN + 1, n)) for b, n in zip(bounds, size)
        )
