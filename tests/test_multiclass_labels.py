"""Final labels that hold several classes (KiTS: kidney 1, tumour 2): training and scoring read the tumour only,
through a real server started with ``--conf label_value``."""

import json
import os
import shutil
import time
import urllib.error
import urllib.request

import nibabel as nib
import numpy as np
import pytest
from monailabel.client import MONAILabelClient
from scipy import ndimage

from conftest import copy_app, start_server, stop_server, train_and_wait
from lib.settings import Settings

KIDNEY, TUMOUR = 1, 2


def test_the_tumour_value_is_a_number_a_label_name_or_any():
    def value(**conf):
        return Settings.from_conf(conf, cuda_available=False).label_value

    assert value() is None
    assert value(label_value="2") == 2
    assert value(labels="kidney,tumor", label_value="tumor") == 2  # MONAI Label numbers labels from 1
    assert value(label_value="ANY") is None
    for wrong in ("cyst", "0", "2.5", "-1"):
        with pytest.raises(ValueError, match="label_value"):
            value(labels="kidney,tumor", label_value=wrong)


def write_like(reference: str, path: str, array: np.ndarray) -> None:
    image = nib.load(reference)
    nib.save(nib.Nifti1Image(array.astype(np.uint8), image.affine, image.header), path)


@pytest.fixture(scope="module")
def multiclass_server(tmp_path_factory, demo_studies):
    """Demo studies whose final labels hold a kidney (1) about the tumour (2); one holds a kidney only."""
    app = copy_app(str(tmp_path_factory.mktemp("app")))
    studies = str(tmp_path_factory.mktemp("studies"))
    shutil.copytree(demo_studies, studies, dirs_exist_ok=True)
    final = os.path.join(studies, "labels", "final")
    for name in sorted(os.listdir(final)):
        path = os.path.join(final, name)
        lesion = np.asarray(nib.load(path).dataobj) > 0
        kidney = ndimage.binary_dilation(lesion, iterations=3) & ~lesion
        classes = KIDNEY * kidney + TUMOUR * lesion
        write_like(path, path, KIDNEY * (classes > 0) if name.startswith("demo_ct_03") else classes)
    conf = ["--conf", "backbone", "tiny", "--conf", "sam_checkpoint", "none", "--conf", "warmup", "false",
            "--conf", "labels", "kidney,tumor", "--conf", "label_value", "tumor"]
    proc, url = start_server(app, studies, conf, str(tmp_path_factory.mktemp("logs") / "server.log"))
    yield url, studies
    stop_server(proc)


def test_training_reads_the_tumour_value_and_skips_a_label_without_it(multiclass_server, tmp_path):
    url, _ = multiclass_server
    client = MONAILabelClient(url, tmpdir=str(tmp_path))
    task = train_and_wait(client, {"steps": 2, "val_split": 0.0})
    assert task["status"] == "DONE", task
    stats = client.info()["train_stats"]["sam3d"]
    assert stats["train_images"] == 2
    assert list(stats["skipped"]) == ["demo_ct_03_oblique.nii.gz"]
    assert "tumour's value 2" in stats["skipped"]["demo_ct_03_oblique.nii.gz"]


def test_scoring_compares_the_models_mask_with_the_tumour_only(multiclass_server, tmp_path):
    url, studies = multiclass_server
    client = MONAILabelClient(url, tmpdir=str(tmp_path))
    final = os.path.join(studies, "labels", "final", "demo_ct_01.nii.gz")
    original = str(tmp_path / "demo_ct_01.nii.gz")
    write_like(final, original, np.asarray(nib.load(final).dataobj) == TUMOUR)  # the model got the tumour right
    client.save_label("demo_ct_01", original, tag="original")
    deadline = time.time() + 120
    while True:  # 429 while a scoring run that the label save started is going
        request = urllib.request.Request(f"{url}/scoring/dice?run_sync=true", data=b"{}", method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            scores = json.loads(urllib.request.urlopen(request, timeout=120).read())
            break
        except urllib.error.HTTPError as e:
            assert e.code == 429 and time.time() < deadline, e
            time.sleep(1)
    # MONAI Label's own Dice multiplies the values: 2 * sum(2 * 1) / (sum(final) + sum(original)), far from 1.
    assert scores == {"demo_ct_01": 1.0}
    assert client.datastore()["objects"]["demo_ct_01"]["image"]["info"]["dice"] == 1.0
