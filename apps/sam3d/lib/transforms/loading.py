"""Loading an image for the model: a file no reader can read, a truncated one, a grid that places no voxel, a 2D
or multi-channel image are the request's fault (4xx); non-finite voxels become 0."""

import os
from typing import Any, Dict

import torch
from monai.transforms import LoadImaged, MapTransform

from lib.errors import InvalidRequest
from lib.nifti import require_complete_nifti


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
