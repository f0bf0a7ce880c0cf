"""A stored NIfTI file checked against its own header before any reader trusts it (used by storage and loading)."""

import gzip
import os

import nibabel as nib
import numpy as np


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
