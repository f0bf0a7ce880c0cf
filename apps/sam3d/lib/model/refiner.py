"""sam3d's full-resolution refiner: the decoder's answer corrected where the user clicked, at the crop's grid.

The authors' decoder answers at half the crop's resolution (upsampled by two at the end) and hears clicks only
through 8-voxel-or-coarser tokens, so a correction click on a mask's boundary (where most errors of a first
click lie: a shell one to two voxels deep) has nothing it can move. As nnInteractive feeds its prompts as
full-resolution input channels, the refiner sees, voxel by voxel: the crop's intensities, the decoder's answer,
the previous prediction, and maps of the foreground and background clicks; a few convolutions turn them into a
correction of the decoder's logits. Its last convolution starts at zero: an authors' checkpoint answers exactly
as theirs until training has taught it. Axis convention: volumes ``(B, C, D, H, W)``, clicks ``(d, h, w)``.
"""

import math
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

# Inputs, in order: intensities, decoder's foreground probability, previous foreground probability (both mapped
# to [-1, 1]; 0 where there is none), foreground click map, background click map.
REFINER_INPUTS = 5
# A voxel belongs to a mask above a probability of 0.1 (these log-odds), to a click's neighbourhood where the
# click's map exceeds 0.2.
PRESENT_LOGIT = math.log(0.1 / 0.9)
NEIGHBOURHOOD = 0.2
# The working box's growth, in voxels: the convolutions' reach (a 3x3x3 and a dilated one, 1 + 2) and some more,
# so that a mask can grow past its bounding box.
MARGIN = 6


def click_maps(points: torch.Tensor, labels: torch.Tensor, shape: Sequence[int], sigma: float) -> torch.Tensor:
    """points: (B, N, 3) (d, h, w) voxel indices of a (D, H, W) ``shape`` grid; labels: (B, N) 1 = foreground,
    0 = background -> (B, 2, D, H, W): per click type, the largest Gaussian (``sigma`` voxels) of its clicks.

    A Gaussian is separable: each click costs three 1-D profiles and their outer product, kept as a running
    maximum so that memory does not grow with the clicks."""
    maps = torch.zeros(points.shape[0], 2, *shape, device=points.device)
    profiles = [
        torch.exp(-((torch.arange(n, device=points.device) - points[..., axis, None].float()) ** 2) / (2 * sigma**2))
        for axis, n in enumerate(shape)
    ]  # per axis (B, N, n)
    for click in range(points.shape[1]):
        d, h, w = (p[:, click] for p in profiles)
        bump = d[:, :, None, None] * h[:, None, :, None] * w[:, None, None, :]  # (B, D, H, W)
        for channel, kind in enumerate((1, 0)):
            chosen = (labels[:, click] == kind)[:, None, None, None]
            maps[:, channel] = torch.where(chosen, torch.maximum(maps[:, channel], bump), maps[:, channel])
    return maps


class Refiner(nn.Module):
    """(B, 5, D, H, W) inputs -> (B, 2, D, H, W) corrections added to the decoder's class logits."""

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
        answer = logits[:, 1:] - logits[:, :1]
        box = self.working_box(answer, previous, points)
        part = (slice(None), slice(None)) + box
        # Everything at the crop's resolution is computed inside the box only.
        start = torch.tensor([b.start for b in box], device=points.device)
        shape = [b.stop - b.start for b in box]
        answer = answer[part].sigmoid() * 2 - 1
        before = torch.zeros_like(answer) if previous is None else previous[part].float().sigmoid() * 2 - 1
        maps = click_maps(points - start, labels, shape, self.sigma).to(answer)
        inputs = torch.cat([image[part].to(answer), answer, before, maps], dim=1)
        refined = logits.clone()
        refined[part] = logits[part] + self.net(inputs).to(logits.dtype)
        return refined

    def working_box(
        self, answer: torch.Tensor, previous: Optional[torch.Tensor], points: torch.Tensor
    ) -> Tuple[slice, slice, slice]:
        """The part of the crop where the refiner works, the same in training and serving.

        A correction round (with a ``previous`` mask): the bounding box of the decoder's mask (``answer``: its
        log-odds), the previous mask and the clicks' neighbourhoods, grown by the refiner's reach. A lesion
        covers a small part of a 128-voxel crop, and the refiner's convolutions over the whole crop would cost
        more than the decoder's round. A first round: the whole crop (once per crop, beside the encoder's far
        larger cost)."""
        size = answer.shape[2:]
        if previous is None:
            return tuple(slice(0, n) for n in size)
        with torch.no_grad():
            region = ((answer > PRESENT_LOGIT) | (previous > PRESENT_LOGIT)).any(dim=(0, 1))
            indices = torch.nonzero(region, as_tuple=True)
            lower = [int(i.min()) if len(i) else n for i, n in zip(indices, size)]
            upper = [int(i.max()) if len(i) else -1 for i in indices]
            if points.numel():
                reach = int(self.sigma * math.sqrt(2 * math.log(1 / NEIGHBOURHOOD)))  # where a click's map > 0.2
                flat = points.reshape(-1, 3)
                lower = [min(lo, int(flat[:, a].min()) - reach) for a, lo in enumerate(lower)]
                upper = [max(up, int(flat[:, a].max()) + reach) for a, up in enumerate(upper)]
        if any(up < lo for lo, up in zip(lower, upper)):  # no mask and no click: nothing bounds it
            return tuple(slice(0, n) for n in size)
        return tuple(slice(max(lo - MARGIN, 0), min(up + MARGIN + 1, n)) for lo, up, n in zip(lower, upper, size))
