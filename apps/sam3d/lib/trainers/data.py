"""Labelled volumes for training and validation, pre-processed exactly as inference does it."""

from typing import Optional, Tuple

import torch
from monai.transforms import EnsureChannelFirstd, LoadImaged

from lib.transforms.loading import ReplaceNonFinited
from lib.transforms.presets import PRESETS, intensity_transforms, spatial_transforms


def load_labelled(
    image_path: str, label_path: str, preset: str, label_value: Optional[int] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """-> (1, D, H, W) float image and (1, D, H, W) bool label on the model's grid for ``preset``.

    The label is the voxels equal to ``label_value`` (e.g. 2 for the tumour in KiTS), or all non-zero ones."""
    data = {"image": image_path, "label": label_path}
    keys = ("image", "label")
    for t in [
        LoadImaged(keys=keys, reader="ITKReader"),
        EnsureChannelFirstd(keys=keys),
        ReplaceNonFinited(keys="image"),
        *spatial_transforms(PRESETS[preset], keys, ("bilinear", "nearest")),
        *intensity_transforms(PRESETS[preset]),
    ]:
        data = t(data)
    label = data["label"].as_tensor()
    return data["image"].as_tensor().float(), (label.round() == label_value) if label_value else label > 0.5
