"""Labelled volumes for training and validation, pre-processed by inference's own transforms (presets.preprocessing)."""

from typing import Optional, Tuple, Union

import numpy as np
import torch
from monai.transforms import LoadImage

from lib.labels import tumour
from lib.transforms.grid import GridMap
from lib.transforms.presets import PRESETS, READER, Preset, preprocessing


def load_labelled(
    image_path: str, label_path: str, preset: Union[str, Preset], label_value: Optional[int] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """-> (1, D, H, W) float image and (1, D, H, W) bool label on the model's grid for ``preset`` (a name or the
    values themselves: a training process of a planned preset has only the values).

    The label is the voxels equal to ``label_value`` (e.g. 2 for the tumour in KiTS), or all non-zero ones."""
    data = {"image": image_path, "label": label_path}
    for t in preprocessing(PRESETS[preset] if isinstance(preset, str) else preset, label=True):
        data = t(data)
    return data["image"].as_tensor().float(), tumour(data["label"].as_tensor(), label_value)


def load_on_image_grid(
    image_path: str, label_path: str, preset: str, label_value: Optional[int] = None
) -> Tuple[torch.Tensor, np.ndarray, GridMap]:
    """-> the (D, H, W) image on the model's grid (as inference sees it), the bool label on the image's stored
    grid (as the annotator drew it, read by the same reader) and the map between the two grids."""
    data = {"image": image_path}
    for t in preprocessing(PRESETS[preset]):
        data = t(data)
    grid = GridMap.of(data["image"])
    label = LoadImage(reader=READER, image_only=True)(label_path)
    if tuple(label.shape) != grid.image_shape or not np.allclose(np.asarray(label.affine), grid.image_affine, atol=1e-3):
        raise ValueError(f"{label_path} is not on the grid of {image_path}")
    return data["image"].as_tensor()[0].float(), tumour(label.as_tensor(), label_value).numpy(), grid
