"""Clicks and boxes as a radiologist gives them, simulated for training and evaluation.

A first click in training goes where a user aims: well inside the lesion (the deeper, the likelier). Correction
clicks, in training and evaluation, follow the CVPR 2025 interactive 3D segmentation challenge
(``protocol_click``): on the largest error of the current mask, at the point farthest from its border, a
foreground click on missed tumour, a background click on a leak. A box is the challenge's too (``challenge_box``):
the lesion's tight 2D box on its middle slice and the range of slices it spans, in training with the error of a
hand-drawn box.
"""

from typing import Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from lib.model import Box
from lib.regions import deepest_voxel, depth_in_box, grown_box

# Voxels that share a face, an edge or a corner are connected (the challenge's 26-connectivity).
CONNECTIVITY = np.ones((3, 3, 3), bool)


def interior_click(region: np.ndarray, rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """A voxel of ``region`` (bool, 3D): its deepest voxel, or with ``rng`` one drawn in proportion to depth^2."""
    if rng is None:
        return deepest_voxel(region)
    start, depth = depth_in_box(region)
    weights = depth.ravel() ** 2
    return start + np.array(np.unravel_index(rng.choice(weights.size, p=weights / weights.sum()), depth.shape))


def background_click(lesion: np.ndarray, rng: np.random.Generator, near: float = 10.0) -> Optional[np.ndarray]:
    """A voxel outside ``lesion``: half the time within ``near`` voxels of it (on the tissue a mask would
    leak into), else farther away; uniform within the chosen zone. None if there is no voxel outside."""
    if not lesion.any():
        return None
    # Voxels farther than ``near`` from the lesion's box are farther than ``near`` from the lesion.
    box = grown_box(lesion, margin=int(np.ceil(near)) + 1)
    distance = ndimage.distance_transform_edt(~lesion[box])
    near_zone = np.zeros_like(lesion)
    near_zone[box] = (distance > 2) & (distance <= near)
    far_zone = np.ones_like(lesion)
    far_zone[box] = distance > near
    zones = [near_zone, far_zone]
    if rng.random() < 0.5:
        zones.reverse()
    for zone in zones:
        candidates = np.flatnonzero(zone)
        if len(candidates):
            return np.array(np.unravel_index(rng.choice(candidates), lesion.shape))
    return None


def protocol_click(
    prediction: np.ndarray,
    truth: np.ndarray,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    rng: Optional[np.random.Generator] = None,
) -> Optional[Tuple[np.ndarray, int]]:
    """The challenge's next click: (voxel index, 1 = foreground / 0 = background), or None when the mask is right.

    prediction, truth: bool, one (D, H, W) shape; spacing: mm per voxel along those axes. The click goes to the
    voxel deepest inside (largest distance in mm to its border, the array's faces count as border) the largest
    26-connected component of the error ``prediction XOR truth``, foreground where that voxel is tumour (a miss),
    background where it is not (a leak). With an empty prediction it is the first click: the lesion's deepest
    voxel. Ties go to the first voxel in C order (the challenge draws one at random). With ``rng`` the click is
    drawn inside that component in proportion to depth^2 instead, as a user's aim varies (for training)."""
    error = prediction != truth
    components, count = ndimage.label(error, structure=CONNECTIVITY)
    if count == 0:
        return None
    largest = int(np.argmax(np.bincount(components.ravel())[1:])) + 1
    region = components == largest
    box = grown_box(region, margin=0)
    # Padded with background: the array's faces count as border (the challenge's black border).
    depth = ndimage.distance_transform_edt(np.pad(region[box], 1), sampling=spacing)[1:-1, 1:-1, 1:-1]
    if rng is None:
        index = depth.argmax()
    else:
        weights = depth.ravel() ** 2
        index = rng.choice(weights.size, p=weights / weights.sum())
    click = np.array([s.start for s in box]) + np.array(np.unravel_index(index, depth.shape))
    return click, int(truth[tuple(click)])


# A hand-drawn box's sides, in training: each in-plane side off the tight one by up to this fraction of the box's
# extent, more often outward than inward (a box drawn around a lesion is loose rather than cutting it), and the
# slice range off by up to one slice at each end.
HAND_DRAWN_OUTWARD = 0.2
HAND_DRAWN_INWARD = 0.1


def challenge_box(lesion: np.ndarray, frame: str, slice_axis: int = 0, rng: Optional[np.random.Generator] = None) -> Box:
    """The CVPR 2025 challenge's box of ``lesion`` (bool, 3D, not empty): the tight box of its voxels on its middle
    slice along ``slice_axis`` (the median of the slices it occupies), spanning every slice it occupies; with
    ``rng``, each side moved as a hand-drawn box's are (kept inside the array and at least one voxel wide)."""
    slices = np.unique(np.nonzero(lesion)[slice_axis])
    middle = np.take(lesion, slices[len(slices) // 2], axis=slice_axis)
    in_plane = np.nonzero(middle)
    start, stop = [], []
    plane_axes = [a for a in range(3) if a != slice_axis]
    for axis in range(3):
        if axis == slice_axis:
            low, high = int(slices[0]), int(slices[-1]) + 1
            if rng is not None:
                low, high = low + int(rng.integers(-1, 2)), high + int(rng.integers(-1, 2))
        else:
            values = in_plane[plane_axes.index(axis)]
            low, high = int(values.min()), int(values.max()) + 1
            if rng is not None:
                extent = high - low
                low -= int(round(rng.uniform(-HAND_DRAWN_INWARD, HAND_DRAWN_OUTWARD) * extent))
                high += int(round(rng.uniform(-HAND_DRAWN_INWARD, HAND_DRAWN_OUTWARD) * extent))
        low = min(max(low, 0), lesion.shape[axis] - 1)
        start.append(low)
        stop.append(min(max(high, low + 1), lesion.shape[axis]))
    return Box(start, stop, frame)
