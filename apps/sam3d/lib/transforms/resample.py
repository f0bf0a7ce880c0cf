"""Resampling between the image's own grid and the model's: to the preset spacing, and the prediction back."""

import itertools
import math
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Spacing, SpatialResample

from .clicks import InvalidRequest
from .keys import CROP_BOXES, IMAGE, PRED


def original_support(
    boxes: Sequence[Tuple[Sequence[int], int]], model_to_original: np.ndarray, model_shape, original_shape
) -> Tuple[np.ndarray, np.ndarray]:
    """The voxel box [low, high) of the original grid whose samples can touch the crops' voxels.

    Outside the crops the prediction is zero, so only this box needs resampling. A trilinear sample reads
    the voxels around it: one voxel of margin on the model grid, and one on the original grid."""
    starts = np.array([start for start, _ in boxes])
    ends = np.array([np.asarray(start) + size for start, size in boxes])
    low = np.maximum(starts.min(0) - 1, 0)
    high = np.minimum(ends.max(0), np.asarray(model_shape))
    corners = np.array(list(itertools.product(*zip(low, high))), dtype=np.float64)
    mapped = (model_to_original @ np.c_[corners, np.ones(len(corners))].T)[:3].T
    o_low = np.clip(np.floor(mapped.min(0)) - 1, 0, original_shape).astype(int)
    o_high = np.clip(np.ceil(mapped.max(0)) + 2, 0, original_shape).astype(int)
    return o_low, o_high


class ResampleToOriginalGridd(MapTransform):
    """Resample ``pred`` (1, D, H, W) from the model's grid to ``ref``'s original grid and affine, as uint8.

    MONAI Label's ``Restored`` only resizes, which is wrong once the image was reoriented; resampling
    through the two affines handles any orientation and spacing. Only the box around ``boxes_key`` (the
    crops, as (start, size) on the model grid) is resampled: the rest of a large volume stays zero.
    ``{key}_meta_dict`` carries the original affine, which MONAI Label's writer uses.
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
        ref_meta = d[self.ref].meta
        original_affine = np.asarray(ref_meta["original_affine"], dtype=np.float64)
        original_shape = [int(n) for n in ref_meta["spatial_shape"]]
        for key in self.key_iterator(d):
            pred = d[key]
            if not isinstance(pred, MetaTensor):
                pred = MetaTensor(pred, affine=d[self.ref].affine)
            model_shape = pred.shape[1:]
            boxes = d.get(self.boxes_key) if self.boxes_key else None
            if boxes is None:  # no crop boxes given: the whole grid
                boxes = [((0, 0, 0), max(model_shape))]
            mask = np.zeros(original_shape, dtype=np.uint8)
            if boxes:
                model_to_original = np.linalg.inv(original_affine) @ pred.affine.double().numpy()
                low, high = original_support(boxes, model_to_original, model_shape, original_shape)
                if (high > low).all():
                    sub_affine = original_affine.copy()
                    sub_affine[:3, 3] = original_affine[:3, :3] @ low + original_affine[:3, 3]
                    restored = self.resample(
                        pred, dst_affine=torch.as_tensor(sub_affine), spatial_size=(high - low).tolist()
                    )
                    box = tuple(slice(lo, hi) for lo, hi in zip(low, high))
                    mask[box] = (restored[0] > self.threshold).numpy()
            d[key] = mask
            d[f"{key}_meta_dict"] = {"affine": original_affine}
        return d


class SeparableSpacingd(MapTransform):
    """MONAI's ``Spacingd`` (same output grid, same values), computed axis by axis.

    ``Spacingd`` samples through a dense grid of coordinates in float64: for a 512x512x300 CT going to 1 mm it
    peaks at 8.6 GiB for a 0.5 GiB result. Changing only the spacing maps each output axis onto the same input
    axis (a scale and an offset, also for oblique images), and trilinear interpolation is three linear ones in
    turn, which need about twice the result. The output grid comes from MONAI's own ``Spacing``, run lazily
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
