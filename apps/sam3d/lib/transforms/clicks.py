"""Clicks: validated as voxel indices of the original image, then carried through the image's spatial changes.

Clients (Slicer, OHIF, REST) send ``foreground`` and ``background`` as lists of ``[i, j, k]`` voxel indices of
the image as stored, which is how MONAI's ITK loader indexes the array. After the image is reoriented and
resampled, a click follows the same affine change, so image and clicks cannot drift apart.
"""

import gzip
import math
import os
from typing import Any, Dict, Sequence

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import LoadImaged, MapTransform

from .keys import CLICKS, IMAGE

MAX_CLICKS = 1000  # per request, foreground and background together


class InvalidRequest(ValueError):
    """A request that can never succeed as sent; the server answers it with a 4xx and this message."""


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


def validate_clicks(request: Dict[str, Any], shape: Sequence[int]) -> Dict[str, np.ndarray]:
    clicks = {name: parse_clicks(request.get(name), name, shape) for name in ("foreground", "background")}
    total = sum(len(c) for c in clicks.values())
    # Background clicks only remove what a foreground click claims (README, Background clicks): alone they
    # could only give an empty mask.
    if len(clicks["foreground"]) == 0:
        raise InvalidRequest("no foreground click: give at least one 'foreground' click as [i, j, k] voxel indices")
    if total > MAX_CLICKS:
        raise InvalidRequest(f"{total} clicks in one request; at most {MAX_CLICKS} are accepted")
    return clicks


class LoadImageOrRejectd(LoadImaged):
    """MONAI's loader, but a file that no reader can read is the request's fault (4xx), not the server's."""

    def __call__(self, data, reader=None):
        path = str(data.get(self.keys[0]))
        name = os.path.basename(path)
        try:
            require_complete_nifti(path)
            loaded = super().__call__(data, reader)
        except (RuntimeError, OSError, ValueError, EOFError) as e:  # what ITK, nibabel and MONAI raise for bad files
            # The readers' first line says why; later lines list every reader with the server's path.
            reason = (str(e).strip().splitlines() or [""])[0].replace(os.path.dirname(path) + os.sep, "")
            raise InvalidRequest(f"the image {name} cannot be read as a 3D volume ({type(e).__name__}: {reason})") from e
        require_usable_grid(loaded[self.keys[0]].affine, name)
        return loaded


def require_usable_grid(affine: torch.Tensor, name: str) -> None:
    """A voxel-to-world matrix that is not finite or maps the volume onto a plane (a header with a zero or NaN
    affine) places no voxel anywhere: reorienting and resampling would fail on it."""
    rotation_scale = affine[:3, :3].double()
    if not torch.isfinite(rotation_scale).all() or abs(float(torch.linalg.det(rotation_scale))) < 1e-12:
        raise InvalidRequest(f"the image {name} has no usable voxel grid: its affine is {rotation_scale.tolist()}")


def gzip_trailer_size(path: str) -> int:
    """The uncompressed size modulo 2^32 that a gzip file's last member records in its last 4 bytes."""
    with open(path, "rb") as f:
        f.seek(-4, os.SEEK_END)
        return int.from_bytes(f.read(4), "little")


def require_complete_nifti(path: str) -> None:
    """ITK reads a NIfTI file whose voxel data stops short without complaint and leaves the rest zero: a
    truncated upload would be segmented as if it were whole. Check the data size against the header first."""
    if not path.endswith((".nii", ".nii.gz")) or not os.path.isfile(path):
        return
    try:
        header = nib.load(path).header
    except Exception:  # no readable NIfTI header: the loader that follows says why, as for any bad file
        return
    expected = int(header.get_data_offset()) + int(np.prod(header.get_data_shape())) * header.get_data_dtype().itemsize
    if path.endswith(".gz"):
        if gzip_trailer_size(path) == expected % 2**32:
            return  # the usual single-member file, whole: no second decompression before ITK's
        size = 0
        with gzip.open(path, "rb") as f:  # multi-member, over 4 GiB, or short: count for certain
            while chunk := f.read(1 << 24):
                size += len(chunk)
    else:
        size = os.path.getsize(path)
    if size < expected:
        raise OSError(f"its voxel data stop short: {size} of {expected} bytes")


class RequireSingleChannel3Dd(MapTransform):
    """The model needs one 3D volume: a 2D slice or a multi-channel image is the request's fault."""

    def __call__(self, data: Dict[str, Any]) -> Dict[str, Any]:
        image = data[self.keys[0]]
        if image.ndim != 4 or image.shape[0] != 1:
            raise InvalidRequest(f"a single-channel 3D image is needed; this one has shape {list(image.shape)}")
        return data


class ReplaceNonFinited(MapTransform):
    """NaN or infinite voxels (a broken export, a failed reconstruction) become 0, so that windowing and the
    normalisation statistics stay finite; the rest of the image is untouched."""

    def __call__(self, data: Dict[str, Any]) -> Dict[str, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            if not torch.isfinite(d[key]).all():
                d[key] = torch.nan_to_num(d[key], nan=0.0, posinf=0.0, neginf=0.0)
        return d


class ValidateClicksd(MapTransform):
    """Check the request's clicks against the image's size as stored; store them as ``data['clicks']``."""

    def __call__(self, data: Dict[str, Any]) -> Dict[str, Any]:
        d = dict(data)
        d[CLICKS] = validate_clicks(d, [int(n) for n in d[self.keys[0]].meta["spatial_shape"]])
        return d


def map_indices(points: np.ndarray, from_affine: np.ndarray, to_affine: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Voxel indices under ``from_affine`` -> the nearest voxel indices under ``to_affine`` (clipped into ``shape``)."""
    if len(points) == 0:
        return points.reshape(0, 3)
    homogeneous = np.concatenate([points, np.ones((len(points), 1))], axis=1).T
    mapped = (np.linalg.inv(to_affine) @ from_affine @ homogeneous)[:3].T
    return np.clip(np.rint(mapped), 0, np.asarray(shape) - 1).astype(np.int64)


class MapClicksToImaged(MapTransform):
    """After reorienting and resampling ``image``, move ``data['clicks']`` onto its new grid."""

    def __init__(self, keys: KeysCollection = IMAGE) -> None:
        super().__init__(keys)

    def __call__(self, data: Dict[str, Any]) -> Dict[str, Any]:
        d = dict(data)
        image = d[self.keys[0]]
        original = np.asarray(image.meta["original_affine"], dtype=np.float64)
        current = torch.as_tensor(image.affine).double().numpy()
        d[CLICKS] = {
            name: map_indices(points, original, current, image.shape[1:]) for name, points in d[CLICKS].items()
        }
        return d
