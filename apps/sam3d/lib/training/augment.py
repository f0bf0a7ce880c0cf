"""Training crops with the authors' augmentations per preset, on volumes already on the model's grid.

The authors augment whole volumes before cropping; here the crop comes first (a 1.2x larger region around a
lesion voxel, as their two-stage crop does), which keeps each step's cost independent of the volume's size.

sam3d adds a zoom-out: serving follows a lesion larger than the crop by predicting on boxes up to 4 crops wide
averaged down to the crop's size (``lib/engine/segment.py``), so some training crops are seen that way too.
"""

import math
from typing import Optional

import numpy as np
import torch
from scipy import ndimage

from monai.transforms import (
    Compose,
    Lambdad,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandRotate90d,
    RandRotated,
    RandShiftIntensityd,
    RandSpatialCropd,
    RandZoomd,
    RandomizableTransform,
    SpatialPadd,
)

from lib.transforms.crops import crop_start, zoomed_box
from lib.transforms.presets import Preset

from .simulated_user import CONNECTIVITY

KEYS = ("image", "label")
MODES = ("bilinear", "nearest")
# The authors shift intensities by up to 20 HU before normalising; in normalised units that is 20 / std.
# MR presets normalise per image and per crop, so the shift is a fraction of one standard deviation instead, made
# after the crop's own normalisation (which would undo it).
HU_SHIFT = 20.0
MR_SHIFT = 0.1
# How often a training crop is zoomed out, and how far (serving zooms out 1.5x per level up to 4x).
ZOOM_OUT_PROBABILITY = 0.25
ZOOM_OUT_RANGE = (1.5, 4.0)
# Serving zooms out only for a lesion whose mask reaches a crop's faces, so training zooms out only as far as the
# lesion still spans this share of the crop. Zoomed-out crops of small lesions (a few voxels each) were a view
# serving never makes, and they stalled the decoder: its own answer stayed near zero (docs/evaluation.md).
ZOOMED_LESION_SHARE = 1 / 3


def lesion_extent(mask: np.ndarray, voxel: np.ndarray, window: float) -> int:
    """The largest side, in voxels, of the bounding box of ``mask``'s 26-connected lesion at ``voxel``, looked for
    within a box of ``window`` voxels per side about it."""
    half = int(math.ceil(window / 2))
    box = tuple(slice(max(int(v) - half, 0), int(v) + half + 1) for v in voxel)
    components, _ = ndimage.label(mask[box], structure=CONNECTIVITY)
    inside = np.argwhere(components == components[tuple(int(v) - b.start for v, b in zip(voxel, box))])
    return int((inside.max(axis=0) - inside.min(axis=0) + 1).max())


class RandZoomOutd(RandomizableTransform):
    """With probability ``prob``: a box ``zoom`` (log-uniform in ``zoom_range``, but at most as far as the lesion
    still spans ZOOMED_LESION_SHARE of the crop) times ``size`` per side about a lesion voxel, averaged down to
    ``size`` as serving's zoomed-out crops are (``zoomed_box``); the label is the voxels more than half lesion.
    Otherwise (and for a lesion too small to be followed) the data pass unchanged. {"image", "label"}: (1, D, H, W)."""

    def __init__(self, size: int, prob: float = ZOOM_OUT_PROBABILITY, zoom_range=ZOOM_OUT_RANGE) -> None:
        RandomizableTransform.__init__(self, prob)
        self.size = size
        self.zoom_range = zoom_range
        self.zoom = 1.0
        self.centre: Optional[np.ndarray] = None

    def randomize(self, label: torch.Tensor) -> None:
        super().randomize(None)
        if not self._do_transform:
            return
        mask = (torch.as_tensor(label[0]) > 0.5).numpy()
        lesion = np.argwhere(mask)
        self.centre = lesion[self.R.randint(len(lesion))] if len(lesion) else None
        if self.centre is None:
            return
        farthest = min(self.zoom_range[1], lesion_extent(mask, self.centre, self.size * self.zoom_range[1]) / (ZOOMED_LESION_SHARE * self.size))
        if farthest < self.zoom_range[0]:  # too small a lesion to be followed: this crop stays as it is
            self.centre = None
            return
        self.zoom = float(np.exp(self.R.uniform(np.log(self.zoom_range[0]), np.log(farthest))))

    def __call__(self, data: dict) -> dict:
        self.randomize(data["label"])
        if not self._do_transform or self.centre is None:
            return data
        shape = data["image"].shape[1:]
        side = int(round(self.size * self.zoom))
        start = crop_start(self.centre, shape, side)
        image = zoomed_box(torch.as_tensor(data["image"][0]).float(), start, side, self.size)
        label = zoomed_box(torch.as_tensor(data["label"][0]).float(), start, side, self.size) > 0.5
        return {**data, "image": image[None], "label": label[None].float()}


def training_crops(preset: Preset, size: int, zoom_out_probability: float = ZOOM_OUT_PROBABILITY) -> Compose:
    """{"image", "label"} (1, D, H, W) -> one augmented (1, size, size, size) crop with some lesion near it.

    The first crop is centred on a lesion voxel (every step needs a lesion to click on); the final crop is
    drawn at random inside it, so the lesion lands anywhere in the crop, also at its border. ``zoom_out_probability``
    of the crops come from a box 1.5-4 times larger, zoomed out in 3D as serving does (``RandZoomOutd``; this
    mixes slices, also for the thick-slice presets, as serving's zoomed-out crops do)."""
    outer = round(size * 1.2)
    shift = RandShiftIntensityd("image", offsets=HU_SHIFT / preset.std if preset.std else MR_SHIFT, prob=0.5)
    transforms = [
        RandZoomOutd(outer, zoom_out_probability),
        # A volume thinner than the crop (a short scan; the paper configuration's 154 voxels) is zero-padded, as
        # serving pads a crop that leaves the volume (zero: the normalised mean).
        SpatialPadd(KEYS, spatial_size=(outer,) * 3),
        RandCropByPosNegLabeld(KEYS, label_key="label", spatial_size=(outer,) * 3, pos=1, neg=0),
    ]
    if not preset.crop_statistics:
        transforms.append(shift)
    if preset.in_plane_augmentation:  # axis 0 is the slice axis (D); rotate and zoom within slices
        transforms += [
            RandRotated(KEYS, range_x=math.pi / 6, prob=0.3, mode=MODES, padding_mode="border"),
            RandZoomd(KEYS, prob=0.3, min_zoom=(1.0, 0.9, 0.9), max_zoom=(1.0, 1.1, 1.1), mode=("trilinear", "nearest")),
        ]
    else:
        transforms.append(RandZoomd(KEYS, prob=0.8, min_zoom=0.85, max_zoom=1.25, mode=("trilinear", "nearest")))
    transforms += [
        RandSpatialCropd(KEYS, roi_size=(size,) * 3, random_size=False),
        *(RandFlipd(KEYS, prob=0.5, spatial_axis=axis) for axis in range(3)),
        RandRotate90d(KEYS, prob=0.5, max_k=3, spatial_axes=(1, 2)),
    ]
    if preset.crop_statistics:  # the final crop is what serving normalises (Segmenter.encode)
        transforms += [Lambdad("image", preset.crop_input), shift]
    return Compose(transforms)
