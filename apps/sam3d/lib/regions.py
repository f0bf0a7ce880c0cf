"""Geometry of masks shared by serving and training: where a region lies and its deepest voxel."""

from typing import Tuple

import numpy as np
from scipy import ndimage


def grown_box(*regions: np.ndarray, margin: int) -> Tuple[slice, ...]:
    """The bounding box of the True voxels of ``regions`` (bool, one shape) grown by ``margin``, clipped to the array.

    Distance transforms and metrics run inside it only (a training step simulates several clicks on a 128^3
    crop, and the whole-crop transforms cost more than the GPU's step)."""
    nonzero = np.nonzero(np.logical_or.reduce(regions))
    return tuple(slice(max(int(i.min()) - margin, 0), int(i.max()) + margin + 1) for i in nonzero)


def depth_in_box(region: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """``region`` (bool, 3D, some True) -> (its box's corner, the distance of each box voxel to the region's
    background). The box has one voxel of background around the region, so the depths are those in the whole
    array; the array's faces are not background (a lesion may go on beyond a crop)."""
    box = grown_box(region, margin=1)
    return np.array([s.start for s in box]), ndimage.distance_transform_edt(region[box])


def deepest_voxel(region: np.ndarray) -> np.ndarray:
    """The voxel of ``region`` (bool, 3D, some True) farthest from its background, (d, h, w)."""
    start, depth = depth_in_box(region)
    return start + np.array(np.unravel_index(depth.argmax(), depth.shape))
