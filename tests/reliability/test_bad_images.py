"""Odd images uploaded to a real server: each gets a mask or a clear 4xx, never a 5xx."""

import gzip

import nibabel as nib
import numpy as np
import pytest
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException


@pytest.fixture(scope="module")
def client(server, tmp_path_factory):
    return MONAILabelClient(server[0], tmpdir=str(tmp_path_factory.mktemp("bad_images_client")))


def upload(client, tmp_path, data, click, preset="kits"):
    path = tmp_path / "upload.nii.gz"
    nib.save(nib.Nifti1Image(data, np.diag([0.8, 0.8, 2.5, 1.0])), path)
    mask_path, _ = client.infer("sam3d", "", {"foreground": [click], "preset": preset}, file=str(path))
    return np.asarray(nib.load(mask_path).dataobj)


@pytest.mark.parametrize("preset", ["kits", "mr"])
@pytest.mark.parametrize("value", [0, 40, -1024])
def test_a_constant_image_gets_a_mask_of_its_shape(client, tmp_path, preset, value):
    mask = upload(client, tmp_path, np.full((40, 50, 30), value, np.int16), [20, 25, 15], preset)
    assert mask.shape == (40, 50, 30) and set(np.unique(mask)) <= {0, 1}


def test_an_image_smaller_than_a_crop_gets_a_mask_of_its_shape(client, tmp_path):
    data = np.random.default_rng(0).normal(40, 10, (6, 7, 3)).astype(np.int16)
    assert upload(client, tmp_path, data, [3, 3, 1]).shape == (6, 7, 3)


def test_a_4d_image_is_a_422(client, tmp_path):
    with pytest.raises(MONAILabelClientException, match="422"):
        upload(client, tmp_path, np.zeros((20, 20, 20, 2), np.int16), [5, 5, 5])


def test_a_truncated_nifti_is_a_422(client, tmp_path):
    path = tmp_path / "cut.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((40, 40, 40), np.int16), np.eye(4)), path)
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[: len(raw) // 2]))  # a valid gzip of half a volume
    with pytest.raises(MONAILabelClientException, match="422.*stop short"):
        client.infer("sam3d", "", {"foreground": [[1, 1, 1]]}, file=str(path))


@pytest.mark.parametrize("compressed", [False, True])
def test_a_truncated_nrrd_is_a_422(client, tmp_path, compressed):
    import SimpleITK as sitk

    path = str(tmp_path / "cut.nrrd")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((40, 40, 40), np.int16)), path, compressed)
    with open(path, "rb") as f:
        raw = f.read()
    with open(path, "wb") as f:
        f.write(raw[: len(raw) * 2 // 3])
    with pytest.raises(MONAILabelClientException, match="422"):
        client.infer("sam3d", "", {"foreground": [[1, 1, 1]]}, file=path)
