"""Clicks: validated as voxel indices of the original image, then carried through the image's spatial changes.

Clients (Slicer, OHIF, REST) send ``foreground`` and ``background`` as lists of ``[i, j, k]`` voxel indices of
the image as stored, which is how MONAI's ITK loader indexes the array. They become one ``Clicks`` value (the
``"image"`` frame), which ``GridMap`` moves onto the model's grid with the image.
"""

import math
from typing import Any, Dict, Sequence

import numpy as np
from monai.config import KeysCollection
from monai.transforms import MapTransform

from lib.errors import InvalidRequest
from lib.model import Clicks

from .grid import GridMap
from .keys import CLICKS, IMAGE

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


def validate_clicks(request: Dict[str, Any], shape: Sequence[int]) -> Clicks:
    """The request's ``foreground`` and ``background`` lists, checked against the stored image's ``shape``."""
    clicks = Clicks(*(parse_clicks(request.get(name), name, shape) for name in ("foreground", "background")), "image")
    # Background clicks only remove what a foreground click claims (README, Background clicks): alone they
    # could only give an empty mask.
    if len(clicks.foreground) == 0:
        raise InvalidRequest("no foreground click: give at least one 'foreground' click as [i, j, k] voxel indices")
    if len(clicks) > MAX_CLICKS:
        raise InvalidRequest(f"{len(clicks)} clicks in one request; at most {MAX_CLICKS} are accepted")
    return clicks


class ValidateClicksd(MapTransform):
    """Check the request's clicks against the image's size as stored; store them as ``data['clicks']``
    (``Clicks`` in the ``"image"`` frame)."""

    def __call__(self, data: Dict[str, Any]) -> Dict[str, Any]:
        d = dict(data)
        d[CLICKS] = validate_clicks(d, [int(n) for n in d[self.keys[0]].meta["spatial_shape"]])
        return d


class MapClicksToImaged(MapTransform):
    """After reorienting and resampling ``image``, move ``data['clicks']`` onto its grid (the ``"model"`` frame)."""

    def __init__(self, keys: KeysCollection = IMAGE) -> None:
        super().__init__(keys)

    def __call__(self, data: Dict[str, Any]) -> Dict[str, Any]:
        d = dict(data)
        d[CLICKS] = GridMap.of(d[self.keys[0]]).clicks_to_model(d[CLICKS])
        return d
