"""Resampling between the image's own grid and the model's: to the preset spacing, and the prediction back."""

import math
from typing import Any, Dict, Optional, Sequence

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Spacing, SpatialResample

from lib.errors import InvalidRequest

from .grid import GridMap
from .keys import CROP_BOXES, IMAGE, PRED


class ResampleToOriginalGridd(MapTransform):
    """Resample ``pred`` (1, D, H, W) from the model's grid to ``ref``'s stored grid and affine, as uint8.

    MONAI Label's ``Restored`` only resizes, which is wrong once the image was reoriented; resampling
    through the two affines (``GridMap``) handles any orientation and spacing. Only the box around
    ``boxes_key`` (the crops, as (start, size) on the model grid) is resampled: the rest of a large volume stays
    zero. ``{key}_meta_dict`` carries the original affine, which MONAI Label's writer uses.
    """

    def __init__(
        self, keys: KeysCollection = PRED, ref: str = IMAGE, boxes_key: Optional[str] = CROP_BOXES,
        threshold: float = 0.5,
    ) -> None:
        super().__init__(keys)
        self.ref = ref
        self.boxes_key = boxes_key
        self.threshold = threshold
        self.resample = SpatialResample(mode="bilinear", padding_mode="zeros", dtype=torch.float32)

    def __call__(self, data: Dict[str, Any]) -> Dict[str, Any]:
        d = dict(data)
        grid = GridMap.of(d[self.ref])
        boxes = d.get(self.boxes_key) if self.boxes_key else None
        if boxes is None:  # no crop boxes given: the whole grid
            boxes = [((0, 0, 0), max(grid.model_shape))]
        for key in self.key_iterator(d):
            d[key] = grid.mask_to_image(d[key], boxes, self.threshold, self.resample)
            d[f"{key}_meta_dict"] = {"affine": grid.image_affine}
        return d


class SeparableSpacingd(MapTransform):
    """MONAI's ``Spacingd`` (same output grid, same values), computed axis by axis.

    ``Spacingd`` samples through a dense grid of coordinates in float64, many times the result's memory
    (docs/benchmarks.md, pre-processing a large CT). Changing only the spacing maps each output axis onto the same
    input axis (a scale and an offset, also for oblique images), and trilinear interpolation is three linear ones
    in turn, which need about twice the result. The output grid comes from MONAI's own ``Spacing``, run lazily
    (geometry only); a grid that would not map axis to axis is left to ``Spacing`` itself.
    """

    def __init__(
        self, keys: KeysCollection, pixdim: Sequence[float], mode: Sequence[str] = ("bilinear",), max_voxels: int = 0
    ) -> None:
        """max_voxels: refuse (InvalidRequest) an output grid larger than this before allocating it; 0: no bound.
        A small file at a coarse spacing can ask for gigabytes at the model's spacing (cost grows as spacing³)."""
        super().__init__(keys)
        self.spacing = {m: Spacing(pixdim=pixdim, mode=m, dtype=torch.float32) for m in set(mode)}
        self.modes = dict(zip(self.keys, mode))
        self.max_voxels = max_voxels

    def __call__(self, data: Dict[str, Any]) -> Dict[str, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.resample(d[key], self.modes[key])
        return d

    def resample(self, image: MetaTensor, mode: str) -> MetaTensor:
        spacing = self.spacing[mode]
        planned = spacing(image, lazy=True)  # the output affine and shape, nothing resampled
        out_affine = planned.peek_pending_affine().double()
        out_shape = [int(n) for n in planned.peek_pending_shape()]
        if self.max_voxels and math.prod(out_shape) > self.max_voxels:
            raise InvalidRequest(
                f"the image resampled to the model's spacing would be {'x'.join(map(str, out_shape))} voxels, "
                f"beyond the bound of {self.max_voxels / 1e6:g} million (--conf max_megavoxels)"
            )
        in_to_out = torch.linalg.solve(image.peek_pending_affine().double(), out_affine)  # output index -> input
        scale, offset = in_to_out.diagonal()[:3], in_to_out[:3, 3]
        if (in_to_out[:3, :3] - torch.diag(scale)).abs().max() > 1e-6:
            return spacing(image)
        values = image.as_tensor().float()
        # Axes that shrink first, so that the intermediate volumes stay small; channel first.
        for axis in sorted((1, 2, 3), key=lambda a: out_shape[a - 1] / values.shape[a]):
            points = torch.arange(out_shape[axis - 1], dtype=torch.float64) * scale[axis - 1] + offset[axis - 1]
            values = sample_axis(values, axis, points, mode)
        meta = {k: v for k, v in image.meta.items() if k != "affine"}  # spatial_shape stays the original's
        return MetaTensor(values, affine=out_affine, meta=meta)


def sample_axis(values: torch.Tensor, axis: int, points: torch.Tensor, mode: str) -> torch.Tensor:
    """``values`` at fractional ``points`` along ``axis``, clamped to its ends (grid_sample's "border")."""
    points = points.clamp(0, values.shape[axis] - 1)
    if mode == "nearest":
        return values.index_select(axis, points.round().long())  # round half to even, as grid_sample does
    low = points.floor()
    weight = (points - low).to(values.dtype)
    low = low.long()
    high = (low + 1).clamp(max=values.shape[axis] - 1)
    shape = [1] * values.ndim
    shape[axis] = -1
    weight = weight.reshape(shape)
    below, above = values.index_select(axis, low), values.index_select(axis, high)
    return below.mul_(1 - weight).add_(above.mul_(weight))  # in place: two volumes of the result's size at most
