"""Uploads over the size limit are refused before they reach the disk, and requests leave no temporary files
behind (the server's temporary folder is one made for the test, so that everything in it is the server's; what
it holds once started, MONAI Label's logging configuration and torch's compile cache folder, is the baseline)."""

import os
import shutil
import time

import nibabel as nib
import numpy as np
import pytest
import requests
from monailabel.client import MONAILabelClient

from conftest import copy_app, start_server, stop_server

LIMIT_MB = 1


@pytest.fixture(scope="module")
def limited_server(tmp_path_factory, demo_studies, tiny_checkpoint):
    studies = str(tmp_path_factory.mktemp("limited_studies"))
    shutil.copytree(demo_studies, studies, dirs_exist_ok=True)
    temp = str(tmp_path_factory.mktemp("server_tmp"))
    conf = ["--conf", "backbone", "tiny", "--conf", "sam_checkpoint", "none", "--conf", "checkpoint",
            tiny_checkpoint[0], "--conf", "warmup", "false", "--conf", "max_upload_mb", str(LIMIT_MB)]
    app = copy_app(str(tmp_path_factory.mktemp("app")))
    proc, url = start_server(app, studies, conf, str(tmp_path_factory.mktemp("logs") / "server.log"), {"TMPDIR": temp})
    yield url, studies, temp, files_under(temp)
    stop_server(proc)


def files_under(folder):
    return {os.path.join(root, name) for root, _, names in os.walk(folder) for name in names}


def nifti(path, shape, dtype=np.int16):
    data = np.random.default_rng(0).integers(0, 100, shape).astype(dtype)
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)  # .nii: uncompressed, its size is what is sent
    return os.path.getsize(path)


def test_an_upload_over_the_limit_is_a_413_and_stores_nothing(limited_server, tmp_path):
    url, studies, _, _ = limited_server
    big = str(tmp_path / "big.nii")
    assert nifti(big, (120, 120, 60)) > LIMIT_MB * 2**20
    with open(big, "rb") as f:
        answer = requests.post(f"{url}/infer/sam3d", params={"output": "image"},
                               files={"file": ("big.nii", f)}, data={"params": '{"foreground": [[1, 1, 1]]}'})
    assert answer.status_code == 413, answer.text[:300]

    labels = os.path.join(studies, "labels", "final")
    before = sorted(os.listdir(labels))
    with open(big, "rb") as f:
        answer = requests.put(f"{url}/datastore/label", params={"image": "demo_ct_01", "tag": "final"},
                              files={"label": ("demo_ct_01.nii", f)})
    assert answer.status_code == 413 and sorted(os.listdir(labels)) == before


def test_requests_under_the_limit_are_served_and_leave_no_temporary_files(limited_server, tmp_path):
    url, studies, temp, baseline = limited_server
    client = MONAILabelClient(url, tmpdir=str(tmp_path))
    small = str(tmp_path / "small.nii")
    assert nifti(small, (40, 40, 30)) < LIMIT_MB * 2**20
    mask, _ = client.infer("sam3d", "", {"foreground": [[20, 20, 15]]}, file=small)
    assert nib.load(mask).shape == (40, 40, 30)
    mask, _ = client.infer("sam3d", "demo_ct_01", {"foreground": [[83, 73, 47]]})
    client.save_label("demo_ct_01", mask, tag="final")
    deadline = time.time() + 30
    while files_under(temp) != baseline:  # uploads and results are removed after answering
        assert time.time() < deadline, f"left in the server's temporary folder: {files_under(temp) - baseline}"
        time.sleep(0.5)
