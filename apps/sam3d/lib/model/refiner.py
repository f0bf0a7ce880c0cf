"""sam3d's full-resolution refiner: the decoder's answer corrected where the user clicked, at the crop's grid.

The authors' decoder answers at half the crop's resolution (upsampled by two at the end) and hears clicks only
through 8-voxel-or-coarser tokens, so a correction click on a mask's boundary (where most errors of a first
click lie: a shell one to two voxels deep) has nothing it can move. As nnInteractive feeds its prompts as
full-resolution input channels, the refiner sees, voxel by voxel: the crop's intensities, the decoder's answer,
the previous prediction, maps of the foreground and background clicks, and how alike each voxel looks to the
foreground clicks after the first; a few convolutions turn them into a correction of the decoder's logits. Its
last convolution starts at zero: an authors' checkpoint answers exactly as theirs until training has taught it
(and serving skips it until then). Axis convention: volumes ``(B, C, D, H, W)``, clicks ``(d, h, w)``.
"""

import math
from typing import Iterator, Optional, Sequence, Tuple

import torch
from torch import nn

from .clicks import BOX_TOKEN
from .conv import Conv3d

# Inputs, in order: intensities, decoder's foreground probability, previous foreground probability (both mapped
# to [-1, 1]; 0 where there is none), foreground click map, background click map, and the likeness map of the
# foreground clicks after the first.
# A checkpoint written before the likeness map loads with zero weights for it (checkpoints.py), unchanged.
REFINER_INPUTS = 6
# How alike in intensity a voxel must be to a foreground click to count as its kind: a Gaussian of this width in
# normalised intensity (about 28 HU under the CT presets), within LIKENESS_REACH click-map widths of the click.
LIKENESS_WIDTH = 0.5
LIKENESS_REACH = 3
# A voxel belongs to a mask above a probability of 0.1 (these log-odds), to a click's neighbourhood where the
# click's map exceeds 0.2.
PRESENT_LOGIT = math.log(0.1 / 0.9)
NEIGHBOURHOOD = 0.2
# The working box's growth, in voxels: the convolutions' reach (a 3x3x3 and a dilated one, 1 + 2) and some more,
# so that a mask can grow past its bounding box.
MARGIN = 6


def gaussian_bumps(points: torch.Tensor, shape: Sequence[int], sigma: float) -> Iterator[torch.Tensor]:
    """points: (B, N, 3) (d, h, w) voxel indices of a (D, H, W) ``shape`` grid -> per click, (B, D, H, W): a
    Gaussian of ``sigma`` voxels about it. Separable: each costs three 1-D profiles and their outer product."""
    profiles = [
        torch.exp(-((torch.arange(n, device=points.device) - points[..., axis, None].float()) ** 2) / (2 * sigma**2))
        for axis, n in enumerate(shape)
    ]  # per axis (B, N, n)
    for click in range(points.shape[1]):
        d, h, w = (p[:, click] for p in profiles)
        yield d[:, :, None, None] * h[:, None, :, None] * w[:, None, None, :]


def click_maps(points: torch.Tensor, labels: torch.Tensor, shape: Sequence[int], sigma: float) -> torch.Tensor:
    """points: (B, N, 3) (d, h, w) voxel indices of a (D, H, W) ``shape`` grid; labels: (B, N) 1 = foreground,
    0 = background -> (B, 2, D, H, W): per click type, the largest Gaussian (``sigma`` voxels) of its clicks.

    Kept as a running maximum, so that memory does not grow with the clicks."""
    maps = torch.zeros(points.shape[0], 2, *shape, device=points.device)
    for click, bump in enumerate(gaussian_bumps(points, shape, sigma)):
        for channel, kind in enumerate((1, 0)):
            chosen = (labels[:, click] == kind)[:, None, None, None]
            maps[:, channel] = torch.where(chosen, torch.maximum(maps[:, channel], bump), maps[:, channel])
    return maps


def likeness_map(
    image: torch.Tensor, values: torch.Tensor, points: torch.Tensor, labels: torch.Tensor, sigma: float
) -> torch.Tensor:
    """image: (B, 1, D, H, W) intensities; values: (B, N) each click's intensity (:func:`click_values`); points:
    (B, N, 3) (d, h, w) indices of that grid; labels: (B, N) -> (B, 1, D, H, W): the largest over the foreground
    clicks of how alike a voxel's intensity is to the click's (a Gaussian of LIKENESS_WIDTH), within a Gaussian of
    ``sigma`` voxels about the click.

    A foreground correction click on a missed part says what the lesion looks like there (a ring's enhancing rim, a
    low-contrast lesion's few HU above its host); this map lets the refiner extend the mask to the voxels that look
    alike along its whole border, where a click map reaches only the click's neighbourhood. Background clicks get
    none: a leak often looks like the lesion it touches."""
    likeness = torch.zeros(image.shape[0], 1, *image.shape[2:], device=image.device)
    for click, near in enumerate(gaussian_bumps(points, image.shape[2:], sigma)):
        alike = torch.exp(-((image[:, 0].float() - values[:, click, None, None, None]) ** 2) / (2 * LIKENESS_WIDTH**2))
        chosen = (labels[:, click] == 1)[:, None, None, None]
        likeness[:, 0] = torch.where(chosen, torch.maximum(likeness[:, 0], near * alike), likeness[:, 0])
    return likeness


def click_values(image: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """image: (B, 1, D, H, W); points: (B, N, 3) -> (B, N): the mean intensity of the 3x3x3 voxels about each
    click (less noisy than its one voxel; those inside the grid), at the nearest voxel for a click outside it."""
    upper = torch.tensor(image.shape[2:], device=points.device) - 1
    centre = torch.minimum(points.long().clamp(min=0), upper)
    offsets = torch.cartesian_prod(*[torch.arange(-1, 2, device=points.device)] * 3)  # (27, 3)
    near = centre[:, :, None] + offsets  # (B, N, 27, 3)
    inside = ((near >= 0) & (near <= upper)).all(-1)
    near = torch.minimum(near.clamp(min=0), upper)
    batch = torch.arange(points.shape[0], device=points.device)[:, None, None].expand_as(inside)
    values = image[:, 0].float()[batch, near[..., 0], near[..., 1], near[..., 2]]
    return (values * inside).sum(-1) / inside.sum(-1)


class Refiner(nn.Module):
    """(B, 6, D, H, W) inputs -> (B, 2, D, H, W) corrections added to the decoder's class logits."""

    def __init__(self, chans: int = 8, sigma: float = 4.0) -> None:
        super().__init__()
        # Click maps' width in crop voxels: wide enough that one click on an error shell (one to two voxels deep)
        # reaches the neighbouring part of it, narrow enough to stay on its side of the lesion.
        self.sigma = sigma
        self.net = nn.Sequential(
            Conv3d(REFINER_INPUTS, chans, 3, padding=1),
            nn.GELU(),
            Conv3d(chans, chans, 3, padding=2, dilation=2),
            nn.GELU(),
            Conv3d(chans, 2, 1),
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
        if not torch.is_grad_enabled() and not self.corrects():
            return logits  # an untrained refiner adds zeros (an authors' checkpoint): half a second saved per click
        answer = logits[:, 1:] - logits[:, :1]
        box = self.working_box(answer, previous, points)
        part = (slice(None), slice(None)) + box
        # Everything at the crop's resolution is computed inside the box only.
        start = torch.tensor([b.start for b in box], device=points.device)
        shape = [b.stop - b.start for b in box]
        intensities = image[part]
        answer = answer[part].sigmoid() * 2 - 1
        before = torch.zeros_like(answer) if previous is None else previous[part].float().sigmoid() * 2 - 1
        # A box's centre token is mapped as a foreground click (clicks.py, BOX_TOKEN).
        maps = click_maps(points - start, torch.where(labels == BOX_TOKEN, 1, labels), shape, self.sigma).to(answer)
        # Corrections only (every click after the first): the first click, at a lesion's centre, may show its
        # necrotic core, not what the rest of it looks like.
        corrections = points[:, 1:]
        values = click_values(image, corrections)
        likeness = likeness_map(intensities, values, corrections - start, labels[:, 1:], LIKENESS_REACH * self.sigma)
        inputs = torch.cat([intensities.to(answer), answer, before, maps, likeness.to(answer)], dim=1)
        refined = logits.clone()
        refined[part] = logits[part] + self.net(inputs).to(logits.dtype)
        return refined

    def corrects(self) -> bool:
        """Whether the refiner can change anything: its last convolution, where its output starts at zero."""
        last = self.net[-1]
        return bool(last.weight.any() or last.bias.any())

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
