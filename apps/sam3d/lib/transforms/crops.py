"""Crop planning and stitching: clicks on one lesion share a crop; clicks far apart get crops of their own; a box
gets the crop about its centre (and the clicks in it).

Boxes are cubes given by their corner (``start``, voxel indices of the model's grid, never negative) and side; a box
may run past the volume, whose outside reads as zero (the normalised mean) and is dropped when pasting back."""

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from lib.model import Box, Clicks


@dataclass
class Crop:
    start: Tuple[int, int, int]  # corner in volume voxels; may extend past the volume, which is zero-padded
    size: int
    clicks: Clicks  # in the crop's frame: its group's foreground clicks, the background clicks inside it
    box: Optional[Box] = None  # the request's box (``"model"`` frame) for the crop planned about it


def box_slices(start: Sequence[int], size: int) -> Tuple[slice, ...]:
    return tuple(slice(int(s), int(s) + size) for s in start)


def crop_start(center: np.ndarray, shape: Sequence[int], size: int) -> Tuple[int, int, int]:
    """Centre the crop on ``center`` but keep it inside the volume where the volume is large enough."""
    start = np.asarray(center) - size // 2
    upper = np.maximum(np.asarray(shape) - size, 0)
    return tuple(int(s) for s in np.clip(start, 0, upper))


def plan_crops(clicks: Clicks, shape: Sequence[int], size: int, box: Optional[Box] = None) -> List[Crop]:
    """``clicks`` on the model's grid (``"model"`` frame) -> crops of ``shape``'s volume. Group foreground clicks whose bounding box spans at most half a crop, so each keeps context around it.

    A pure function of the request (users on one image never move each other's crops). A group's crop is
    centred on its first click while every click of the group lies at least an eighth of a crop from its faces:
    clients send earlier clicks first, so a refinement click keeps the crop, and with it the cached encoding.
    Otherwise the crop is centred on the group. Background clicks go to every crop that contains them; one outside
    all crops cannot remove anything. A ``box`` (``"model"`` frame) gets the first crop, centred on it, with the
    foreground clicks that lie in the box or inside that crop away from its faces (corrections of the boxed
    lesion); a box larger than the crop is the segmenter's to zoom out to.
    """
    if clicks.frame != "model" or (box is not None and box.frame != "model"):
        raise ValueError(f"crops are planned from prompts on the model's grid, not in the {clicks.frame!r} frame")
    margin = size // 8
    crops, foreground = [], clicks.foreground
    if box is not None:
        start = np.asarray(crop_start(box.centre, shape, size))
        inside = np.all((foreground >= start + margin) & (foreground < start + size - margin), axis=1)
        inside |= np.all((foreground >= box.start) & (foreground < box.stop), axis=1)
        crops.append(Crop(tuple(int(s) for s in start), size,
                          Clicks(foreground[inside], clicks.background, "model").in_crop(start, size), box))
        foreground = foreground[~inside]
    groups: List[List[np.ndarray]] = []
    for point in foreground:
        for group in groups:
            members = np.stack(group + [point])
            if (members.max(0) - members.min(0)).max() <= size // 2:
                group.append(point)
                break
        else:
            groups.append([point])

    for group in groups:
        members = np.stack(group)
        start = np.asarray(crop_start(members[0], shape, size))
        if not ((members >= start + margin) & (members < start + size - margin)).all():
            start = np.asarray(crop_start((members.max(0) + members.min(0)) // 2, shape, size))
        group_clicks = Clicks(members, clicks.background, "model").in_crop(start, size)
        crops.append(Crop(tuple(int(s) for s in start), size, group_clicks))
    return crops


def extract_crop(volume: torch.Tensor, crop: Crop) -> torch.Tensor:
    """volume: (D, H, W) -> (size, size, size), zero-padded (the normalised mean) where it leaves the volume."""
    return extract_box(volume, crop.start, crop.size)


def extract_box(volume: torch.Tensor, start: Sequence[int], size: int) -> torch.Tensor:
    """volume: (D, H, W) -> the (size, size, size) box at ``start``, zero-padded where it leaves the volume."""
    region = volume[box_slices(start, size)]
    pad = [p for axis in reversed(range(3)) for p in (0, size - region.shape[axis])]
    return F.pad(region, pad) if any(pad) else region


def zoomed_box(volume: torch.Tensor, start: Sequence[int], size: int, out_size: int) -> torch.Tensor:
    """The (size,)*3 box at ``start`` seen at a coarser spacing: averaged down to (out_size,)*3 (each output
    voxel the mean of the input voxels it covers). Serving and training's zoom augmentation both use it, so the
    model sees a zoomed-out crop at serving as it was trained to."""
    region = extract_box(volume, start, size)
    return F.interpolate(region[None, None].float(), size=(out_size,) * 3, mode="area")[0, 0]


def paste_max(target: torch.Tensor, prob: torch.Tensor, start: Sequence[int]) -> None:
    """Stitch a box's probabilities (a cube at ``start``) into the (D, H, W) volume, keeping the larger where boxes
    overlap; what runs past the volume is dropped."""
    region = target[box_slices(start, prob.shape[0])]
    inside = prob[tuple(slice(0, n) for n in region.shape)]
    torch.maximum(region, inside, out=region)
