"""Labelled volumes for training and validation, pre-processed exactly as inference does it."""

from typing import Tuple

import torch
from monai.transforms import EnsureChannelFirstd, LoadImaged

from lib.transforms.clicks import ReplaceNonFinited
from lib.transforms.presets import PRESETS, intensity_transforms, spatial_transforms


def load_labelled(image_path: str, label_path: str, preset: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """-> (1, D, H, W) float image and (1, D, H, W) bool label on the model's grid for ``preset``."""
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
    return data["image"].as_tensor().float(), data["label"].as_tensor() > 0.5
