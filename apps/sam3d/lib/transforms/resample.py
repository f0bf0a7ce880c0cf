"""Bring a prediction made on the model's grid back onto the image's own grid."""

import itertools
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, SpatialResample


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
        self, keys: KeysCollection = "pred", ref: str = "image", boxes_key: Optional[str] = "crop_boxes",
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
