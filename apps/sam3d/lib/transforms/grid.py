"""The one map between the image's grid as stored and the model's grid (the image reoriented and resampled), both
ways: clicks go to the model's grid, the prediction comes back to the stored grid."""

import itertools
from dataclasses import dataclass
from typing import Sequence, Tuple

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import SpatialResample

from lib.model import Box, Clicks


def map_indices(points: np.ndarray, from_affine: np.ndarray, to_affine: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Voxel indices under ``from_affine`` -> the nearest voxel indices under ``to_affine`` (clipped into ``shape``)."""
    if len(points) == 0:
        return points.reshape(0, 3)
    homogeneous = np.concatenate([points, np.ones((len(points), 1))], axis=1).T
    mapped = (np.linalg.inv(to_affine) @ from_affine @ homogeneous)[:3].T
    return np.clip(np.rint(mapped), 0, np.asarray(shape) - 1).astype(np.int64)


@dataclass(frozen=True)
class GridMap:
    """Both grids as (voxel -> world affine, shape). Affines are float64 4x4."""

    image_affine: np.ndarray  # the stored image's voxel (i, j, k) -> world
    image_shape: Tuple[int, int, int]
    model_affine: np.ndarray  # the model grid's voxel (d, h, w) -> world
    model_shape: Tuple[int, int, int]

    @classmethod
    def of(cls, image: MetaTensor) -> "GridMap":
        """From the pre-processed (C, D, H, W) image: its affine is the model grid's, and MONAI's meta keeps the
        stored grid's (``original_affine``, ``spatial_shape``)."""
        return cls(
            image_affine=np.asarray(image.meta["original_affine"], dtype=np.float64),
            image_shape=tuple(int(n) for n in image.meta["spatial_shape"]),
            model_affine=torch.as_tensor(image.affine).double().numpy(),
            model_shape=tuple(int(n) for n in image.shape[1:]),
        )

    @property
    def image_spacing(self) -> np.ndarray:
        """The stored image's voxel size in mm along its axes (i, j, k)."""
        return np.linalg.norm(self.image_affine[:3, :3], axis=0)

    def clicks_to_model(self, clicks: Clicks) -> Clicks:
        """``"image"`` clicks -> the nearest voxels of the model's grid (``"model"`` frame): a click follows the
        same affine change as the image, so image and clicks cannot drift apart."""
        if clicks.frame != "image":
            raise ValueError(f"clicks_to_model maps clicks of the stored image, not of the {clicks.frame!r} frame")
        return clicks.mapped("model", lambda p: map_indices(p, self.image_affine, self.model_affine, self.model_shape))

    def box_to_model(self, box: Box) -> Box:
        """An ``"image"`` box -> the box of the model's grid that holds all of it (``"model"`` frame), clipped."""
        if box.frame != "image":
            raise ValueError(f"box_to_model maps a box of the stored image, not of the {box.frame!r} frame")
        image_to_model = np.linalg.inv(self.model_affine) @ self.image_affine
        mapped = box.mapped("model", lambda p: (image_to_model @ np.c_[p, np.ones(len(p))].T)[:3].T)
        inside = mapped.clipped(self.model_shape)
        if inside is None:  # rounding at the volume's edge: the nearest voxel
            nearest = np.clip(mapped.start, 0, np.asarray(self.model_shape) - 1)
            return Box(nearest, nearest + 1, "model")
        return inside

    def image_support(self, boxes: Sequence[Tuple[Sequence[int], int]]) -> Tuple[np.ndarray, np.ndarray]:
        """The voxel box [low, high) of the stored grid whose samples can touch the voxels of ``boxes`` ((start,
        size) on the model's grid).

        Outside the crops the prediction is zero, so only this box needs resampling. A trilinear sample reads
        the voxels around it: one voxel of margin on the model grid, and one on the stored grid."""
        model_to_image = np.linalg.inv(self.image_affine) @ self.model_affine
        starts = np.array([start for start, _ in boxes])
        ends = np.array([np.asarray(start) + size for start, size in boxes])
        low = np.maximum(starts.min(0) - 1, 0)
        high = np.minimum(ends.max(0), np.asarray(self.model_shape))
        corners = np.array(list(itertools.product(*zip(low, high))), dtype=np.float64)
        mapped = (model_to_image @ np.c_[corners, np.ones(len(corners))].T)[:3].T
        i_low = np.clip(np.floor(mapped.min(0)) - 1, 0, self.image_shape).astype(int)
        i_high = np.clip(np.ceil(mapped.max(0)) + 2, 0, self.image_shape).astype(int)
        return i_low, i_high

    def mask_to_image(
        self, pred: torch.Tensor, boxes: Sequence[Tuple[Sequence[int], int]], threshold: float, resample: SpatialResample
    ) -> np.ndarray:
        """pred: (1, D, H, W) on the model's grid, zero outside ``boxes`` -> the uint8 mask (pred > threshold) on the
        stored grid, resampled through the two affines around the boxes only."""
        mask = np.zeros(self.image_shape, dtype=np.uint8)
        if not boxes:
            return mask
        low, high = self.image_support(boxes)
        if (high > low).all():
            sub_affine = self.image_affine.copy()
            sub_affine[:3, 3] = self.image_affine[:3, :3] @ low + self.image_affine[:3, 3]
            pred = pred if isinstance(pred, MetaTensor) else MetaTensor(pred, affine=torch.as_tensor(self.model_affine))
            restored = resample(pred, dst_affine=torch.as_tensor(sub_affine), spatial_size=(high - low).tolist())
            mask[tuple(slice(lo, hi) for lo, hi in zip(low, high))] = (restored[0] > threshold).numpy()
        return mask
