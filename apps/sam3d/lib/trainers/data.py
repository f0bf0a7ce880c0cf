"""Labelled volumes for training and validation, pre-processed by inference's own transforms (presets.preprocessing)."""

from typing import Optional, Tuple

import torch

from lib.transforms.presets import PRESETS, preprocessing


def load_labelled(
    image_path: str, label_path: str, preset: str, label_value: Optional[int] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """-> (1, D, H, W) float image and (1, D, H, W) bool label on the model's grid for ``preset``.

    The label is the voxels equal to ``label_value`` (e.g. 2 for the tumour in KiTS), or all non-zero ones."""
    data = {"image": image_path, "label": label_path}
    for t in preprocessing(PRESETS[preset], label=True):
        data = t(data)
    label = data["label"].as_tensor()
    return data["image"].as_tensor().float(), (label.round() == label_value) if label_value else label > 0.5
