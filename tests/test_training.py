"""The active-learning loop through a real server: saved final labels -> POST /train -> the next click uses it."""

import os
import shutil
import time
import urllib.error
import urllib.request

import nibabel as nib
import numpy as np
import pytest
import torch
from monailabel.client import MONAILabelClient

from conftest import APP, start_server, stop_server
from lib.model import build_sam3d


@pytest.fixture(scope="module")
def training_server(tmp_path_factory, demo_studies):
    """A server on a copy of the app, so that what training publishes stays in a temporary model folder."""
    app = str(tmp_path_factory.mktemp("app") / "sam3d")
    shutil.copytree(APP, app, ignore=lambda folder, names: [n for n in names if n == "__pycache__" or (
        folder == APP and n in ("model", "logs"))])
    studies = str(tmp_path_factory.mktemp("studies"))
    shutil.copytree(demo_studies, studies, dirs_exist_ok=True)
    shutil.copy(os.path.join(studies, "demo_ct_03_oblique.nii.gz"), os.path.join(studies, "unlabelled_01.nii.gz"))
    conf = ["--conf", "backbone", "tiny", "--conf", "sam_checkpoint", "none", "--conf", "warmup", "false"]
    proc, url = start_server(app, studies, conf, str(tmp_path_factory.mktemp("logs") / "server.log"))
    yield url, app, studies
    stop_server(proc)


def click_mask(client, tmp_dir):
    path, _ = MONAILabelClient(client.get_server_url(), tmpdir=tmp_dir).infer(
        "sam3d", "demo_ct_01", {"foreground": [[83, 73, 47]]}
    )
    return np.asarray(nib.load(path).dataobj)


def test_training_publishes_a_model_that_the_next_click_uses(training_server, tmp_path):
    url, app, _ = training_server
    client = MONAILabelClient(url, tmpdir=str(tmp_path))
    assert client.info()["models"]["sam3d"]["weights"]["adapters"].startswith("untrained")
    before = click_mask(client, str(tmp_path))

    client.train_start("sam3d", {"steps": 20})
    deadline = time.time() + 600
    while (task := client.train_status())["status"] not in ("DONE", "ERROR"):  # SUBMITTED, then RUNNING
        assert time.time() < deadline, "training did not finish in 10 minutes"
        time.sleep(2)
    assert task["status"] == "DONE", task

    published = os.path.join(app, "model", "sam3d.pt")
    info = client.info()
    stats = info["train_stats"]["sam3d"]
    assert stats["steps"] == 20 and stats["train_images"] == 2 and stats["val_images"] == 1
    assert 0 <= stats["val_one_click_dice"] <= 1
    after = click_mask(client, str(tmp_path))  # the first click after publishing swaps the model in
    assert client.info()["models"]["sam3d"]["weights"]["adapters"] == f"{published} (sam3d format)"
    assert not np.array_equal(before, after)

    reloaded = build_sam3d(checkpoint=published)  # what was published loads on its own, with every trained tensor
    assert reloaded.weights_info["backbone"] == "tiny"
    assert torch.load(published, weights_only=True)["meta"]["steps"] == 20


def test_strategies_and_scoring_through_rest(training_server, tmp_path):
    url, _, _ = training_server
    client = MONAILabelClient(url, tmpdir=str(tmp_path))
    info = client.info()
    assert {"random", "first"} <= set(info["strategies"]) and "dice" in info["scoring"]
    assert client.next_sample("first", {})["id"] == "unlabelled_01"  # the only image without a final label
    assert client.next_sample("random", {})["id"] == "unlabelled_01"

    # The model's mask saved as `original` next to the radiologist's `final` one, then scored.
    client.infer("sam3d", "demo_ct_01", {"foreground": [[83, 73, 47]], "save_label": True})
    deadline = time.time() + 120
    while True:  # MONAI Label answers 429 while a scoring run it started itself (after a label save) is going
        request = urllib.request.Request(f"{url}/scoring/dice?run_sync=true", data=b"{}", method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            urllib.request.urlopen(request, timeout=120).read()
            break
        except urllib.error.HTTPError as e:
            assert e.code == 429 and time.time() < deadline, e
            time.sleep(1)
    datastore = client.datastore()
    image_info = datastore["objects"]["demo_ct_01"]["image"]["info"]
    assert 0 <= image_info["dice"] <= 1
