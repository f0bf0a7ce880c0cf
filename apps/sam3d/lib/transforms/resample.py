"""Bring a prediction made on the model's grid back onto the image's own grid."""

from typing import Any, Dict

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, SpatialResample


class ResampleToOriginalGridd(MapTransform):
    """Resample ``pred`` (1, D, H, W) from the model's grid to ``ref``'s original grid and affine.

    MONAI Label's ``Restored`` only resizes, which is wrong once the image was reoriented; resampling
    through the two affines handles any orientation and spacing. The result's ``{key}_meta_dict`` carries
    the original affine, which MONAI Label's writer uses.
    """

    def __init__(self, keys: KeysCollection = "pred", ref: str = "image", threshold: float = 0.5) -> None:
        super().__init__(keys)
        self.ref = ref
        self.threshold = threshold
        self.resample = SpatialResample(mode="bilinear", padding_mode="zeros", dtype=torch.float32)

    def __call__(self, data: Dict[str, Any]) -> Dict[str, Any]:
        d = dict(data)
        ref_meta = d[self.ref].meta
        original_affine = torch.as_tensor(np.asarray(ref_meta["original_affine"]), dtype=torch.float64)
        original_shape = [int(n) for n in ref_meta["spatial_shape"]]
        for key in self.key_iterator(d):
            pred = d[key]
            if not isinstance(pred, MetaTensor):
                pred = MetaTensor(pred, affine=d[self.ref].affine)
            restored = self.resample(pred, dst_affine=original_affine, spatial_size=original_shape)
            d[key] = (restored[0] > self.threshold).to(torch.uint8).numpy()
            d[f"{key}_meta_dict"] = {"affine": original_affine.numpy()}
        return d
