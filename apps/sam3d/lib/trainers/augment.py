"""Training crops with the authors' augmentations per preset, on volumes already on the model's grid.

The authors augment whole volumes before cropping; here the crop comes first (a 1.2x larger region around a
lesion voxel, as their two-stage crop does), which keeps each step's cost independent of the volume's size.
"""

import math

from monai.transforms import (
    Compose,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandRotate90d,
    RandRotated,
    RandShiftIntensityd,
    RandSpatialCropd,
    RandZoomd,
)

from lib.transforms.presets import Preset

KEYS = ("image", "label")
MODES = ("bilinear", "nearest")
# The authors shift intensities by up to 20 HU before normalising; in normalised units that is 20 / std.
# MR presets normalise per image, so the shift is a fraction of one standard deviation instead.
HU_SHIFT = 20.0
MR_SHIFT = 0.1


def training_crops(preset: Preset, size: int) -> Compose:
    """{"image", "label"} (1, D, H, W) -> one augmented (1, size, size, size) crop with some lesion near it.

    The first crop is centred on a lesion voxel (every step needs a lesion to click on); the final crop is
    drawn at random inside it, so the lesion lands anywhere in the crop, also at its border."""
    outer = round(size * 1.2)
    transforms = [
        RandCropByPosNegLabeld(KEYS, label_key="label", spatial_size=(outer,) * 3, pos=1, neg=0),
        RandShiftIntensityd("image", offsets=HU_SHIFT / preset.std if preset.std else MR_SHIFT, prob=0.5),
    ]
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
    return Compose(transforms)
