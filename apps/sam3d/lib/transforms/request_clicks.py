"""Prompts: validated as voxel indices of the original image, then carried through the image's spatial changes.

Clients (Slicer, OHIF, REST) send ``foreground`` and ``background`` as lists of ``[i, j, k]`` voxel indices of
the image as stored, which is how MONAI's ITK loader indexes the array. They become one ``Clicks`` value (the
``"image"`` frame), which ``GridMap`` moves onto the model's grid with the image.

A box comes in one of two forms, both in voxel indices of the image as stored, both ends included:
- ``roi``: ``[i0, i1, j0, j1, k0, k1]``, as MONAI Label's Slicer module sends a placed ROI (its two RAS corners
  through the volume's RASToIJK, rounded; on a flipped axis ``i0`` may exceed ``i1``; ``[]`` when none is placed);
- ``box``: the CVPR 2025 interactive segmentation challenge's ``{"z_min", "z_max", "z_mid_x_min", "z_mid_x_max",
  "z_mid_y_min", "z_mid_y_max"}`` (``z_mid`` may come too and is not needed): a 2D box drawn on one slice and the
  range of slices the lesion spans, x, y, z being i, j, k.
It becomes one ``Box`` (``"image"`` frame), clipped to the image.
"""

import math
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
from monai.config import KeysCollection
from monai.transforms import MapTransform

from lib.errors import InvalidRequest
from lib.model import Box, Clicks

from .grid import GridMap
from .keys import BOX, CLICKS, IMAGE

MAX_CLICKS = 1000  # per request, foreground and background together


def is_finite_number(value: Any) -> bool:
    """JSON numbers only; integers of any size are finite (math.isfinite overflows on those beyond a float)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return isinstance(value, int) or math.isfinite(value)


def parse_clicks(value: Any, name: str, shape: Sequence[int]) -> np.ndarray:
    """``value``: a list of [i, j, k] voxel indices inside ``shape`` -> (N, 3) int64 array."""
    if value is None or (isinstance(value, (list, tuple)) and len(value) == 0):
        return np.zeros((0, 3), dtype=np.int64)
    if not isinstance(value, (list, tuple)):
        raise InvalidRequest(f"'{name}' must be a list of [i, j, k] voxel indices, got {type(value).__name__}")
    clicks = []
    for click in value:
        if not isinstance(click, (list, tuple)) or len(click) != len(shape):
            raise InvalidRequest(f"each '{name}' click must be [i, j, k] ({len(shape)} voxel indices), got {click!r}")
        if not all(is_finite_number(c) for c in click):
            raise InvalidRequest(f"'{name}' click {click!r} must hold finite numbers")
        if any(c != round(c) for c in click):
            raise InvalidRequest(f"'{name}' click {click!r} must hold whole voxel indices")
        index = [int(round(c)) for c in click]
        if any(c < 0 or c >= n for c, n in zip(index, shape)):
            raise InvalidRequest(f"'{name}' click {index} lies outside the image, whose size is {list(shape)}")
        clicks.append(index)
    return np.asarray(clicks, dtype=np.int64).reshape(-1, 3)


CHALLENGE_BOX_KEYS = ("z_mid_x_min", "z_mid_x_max", "z_mid_y_min", "z_mid_y_max", "z_min", "z_max")


def whole_numbers(values: Any, name: str, count: int, form: str) -> List[int]:
    if not isinstance(values, (list, tuple)) or len(values) != count:
        raise InvalidRequest(f"'{name}' must be {form}, got {values!r}")
    if not all(is_finite_number(v) and v == round(v) for v in values):
        raise InvalidRequest(f"'{name}' must hold whole voxel indices, got {values!r}")
    return [int(round(v)) for v in values]


def parse_box(request: Dict[str, Any], shape: Sequence[int]) -> Optional[Box]:
    """The request's box (``roi`` or ``box``; at most one), checked against the stored image's ``shape`` and
    clipped to it, or None."""
    roi, challenge = request.get("roi"), request.get("box")
    roi = None if isinstance(roi, (list, tuple)) and len(roi) == 0 else roi  # Slicer: no ROI placed
    if roi is not None and challenge is not None:
        raise InvalidRequest("give one box per request, as 'roi' or as 'box', not both (a request segments one lesion)")
    if roi is not None:
        name, ends = "roi", whole_numbers(roi, "roi", 6, "[i0, i1, j0, j1, k0, k1] (Slicer's ROI in voxel indices)")
    elif challenge is not None:
        if not isinstance(challenge, dict) or not set(CHALLENGE_BOX_KEYS) <= challenge.keys():
            raise InvalidRequest(f"'box' must be an object with {list(CHALLENGE_BOX_KEYS)} (voxel indices, ends "
                                 f"included), got {challenge!r}")
        name = "box"
        ends = whole_numbers([challenge[k] for k in CHALLENGE_BOX_KEYS], "box", 6, "six voxel indices")
    else:
        return None
    low = np.array([min(ends[0], ends[1]), min(ends[2], ends[3]), min(ends[4], ends[5])])
    high = np.array([max(ends[0], ends[1]), max(ends[2], ends[3]), max(ends[4], ends[5])]) + 1
    if int((high - low == 1).sum()) > 1:
        raise InvalidRequest(f"'{name}' {ends} is empty: it is one voxel thin along more than one axis (a box may lie "
                             "on one slice, not on a line)")
    box = Box(low, high, "image").clipped(shape)
    if box is None:
        raise InvalidRequest(f"'{name}' {ends} lies outside the image, whose size is {list(shape)}")
    return box


def validate_clicks(request: Dict[str, Any], shape: Sequence[int], box: Optional[Box] = None) -> Clicks:
    """The request's ``foreground`` and ``background`` lists, checked against the stored image's ``shape``."""
    clicks = Clicks(*(parse_clicks(request.get(name), name, shape) for name in ("foreground", "background")), "image")
    # Background clicks only remove what a foreground click or a box claims (README, Background clicks): alone
    # they could only give an empty mask.
    if len(clicks.foreground) == 0 and box is None:
        raise InvalidRequest("no foreground click and no box: give at least one 'foreground' click as [i, j, k] "
                             "voxel indices, or a box ('roi' or 'box')")
    if len(clicks) > MAX_CLICKS:
        raise InvalidRequest(f"{len(clicks)} clicks in one request; at most {MAX_CLICKS} are accepted")
    return clicks


class ValidateClicksd(MapTransform):
    """Check the request's prompts against the image's size as stored; store them as ``data['clicks']``
    (``Clicks`` in the ``"image"`` frame) and ``data['prompt_box']`` (a ``Box`` there, or None)."""

    def __call__(self, data: Dict[str, Any]) -> Dict[str, Any]:
        d = dict(data)
        shape = [int(n) for n in d[self.keys[0]].meta["spatial_shape"]]
        d[BOX] = parse_box(d, shape)
        d[CLICKS] = validate_clicks(d, shape, d[BOX])
        return d


class MapClicksToImaged(MapTransform):
    """After reorienting and resampling ``image``, move ``data['clicks']`` and ``data['prompt_box']`` onto its grid
    (the ``"model"`` frame)."""

    def __init__(self, keys: KeysCollection = IMAGE) -> None:
        super().__init__(keys)

    def __call__(self, data: Dict[str, Any]) -> Dict[str, Any]:
        d = dict(data)
        grid = GridMap.of(d[self.keys[0]])
        d[CLICKS] = grid.clicks_to_model(d[CLICKS])
        d[BOX] = None if d.get(BOX) is None else grid.box_to_model(d[BOX])
        return d
