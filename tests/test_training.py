"""The active-learning loop through a real server: saved final labels -> POST /train -> the next click uses it."""

import os
import shutil
import signal
import time
import urllib.error
import urllib.request

import nibabel as nib
import numpy as np
import psutil
import pytest
import torch
from monailabel.client import MONAILabelClient

from conftest import copy_app, start_server, stop_server, train_and_wait
from lib.model import build_sam3d


@pytest.fixture(scope="module")
def training_server(tmp_path_factory, demo_studies):
    """A server on a copy of the app, so that what training publishes stays in a temporary model folder."""
    app = copy_app(str(tmp_path_factory.mktemp("app")))
    studies = str(tmp_path_factory.mktemp("studies"))
    shutil.copytree(demo_studies, studies, dirs_exist_ok=True)
    for name in ("unlabelled_01", "unlabelled_02"):
        shutil.copy(os.path.join(studies, "demo_ct_03_oblique.nii.gz"), os.path.join(studies, f"{name}.nii.gz"))
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

    task = train_and_wait(client, {"steps": 20})
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
    assert {"uncertain", "random", "first"} <= set(info["strategies"])
    assert client.next_sample("first", {})["id"] == "unlabelled_01"  # images without a final label, sorted
    assert client.next_sample("random", {})["id"] in ("unlabelled_01", "unlabelled_02")

    # The model-based strategy offers the unlabelled image whose last mask was the least decisive.
    recorded = {}
    for image, click in (("unlabelled_01", [83, 73, 47]), ("unlabelled_02", [5, 5, 5])):
        _, result = client.infer("sam3d", image, {"foreground": [click]})
        recorded[image] = result["uncertainty"]
        assert client.datastore()["objects"][image]["image"]["info"]["sam3d_uncertainty"] == recorded[image]
    assert recorded["unlabelled_01"] != recorded["unlabelled_02"]
    chosen = client.next_sample("uncertain", {})
    assert chosen["id"] == max(recorded, key=recorded.get) and chosen["uncertainty"] == max(recorded.values())

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


def ensure_published(client, published):
    """A published model to start from, also when a test runs alone: two training steps if there is none."""
    if not os.path.exists(published):
        client.train_start("sam3d", {"steps": 2})
        while client.train_status()["status"] not in ("DONE", "ERROR"):
            time.sleep(1)


def training_process(server_url):
    """MONAI Label's training subprocess (python -m monailabel.interfaces.utils.app -m train ...)."""
    port = server_url.rsplit(":", 1)[1]
    server = next(p for p in psutil.process_iter(["cmdline"]) if port in (p.info["cmdline"] or []))
    for child in server.children(recursive=True):
        if "monailabel.interfaces.utils.app" in child.cmdline() and "train" in child.cmdline():
            return child
    return None


def test_a_killed_training_run_leaves_the_published_model_serving_and_the_next_run_resumes(training_server, tmp_path):
    url, app, _ = training_server
    client = MONAILabelClient(url, tmpdir=str(tmp_path))
    published, state = os.path.join(app, "model", "sam3d.pt"), os.path.join(app, "model", "train_state.pt")
    ensure_published(client, published)
    with open(published, "rb") as f:
        before = f.read()
    mask_before = click_mask(client, str(tmp_path))

    steps = 80  # killed once the state is saved (step 25), resumed with enough left to serve clicks meanwhile
    client.train_start("sam3d", {"steps": steps})
    deadline = time.time() + 300
    while not os.path.exists(state):  # the run saves its state every 25 steps
        assert time.time() < deadline and client.train_status()["status"] in ("SUBMITTED", "RUNNING")
        time.sleep(0.2)
    training_process(url).send_signal(signal.SIGKILL)
    while (task := client.train_status())["status"] in ("SUBMITTED", "RUNNING"):
        time.sleep(0.5)
    assert task["status"] == "ERROR"  # /train/ reports the failure

    with open(published, "rb") as f:
        assert f.read() == before  # the published model is untouched ...
    build_sam3d(checkpoint=published)  # ... loads ...
    assert np.array_equal(click_mask(client, str(tmp_path)), mask_before)  # ... and is still what is served

    client.train_start("sam3d", {"steps": steps})
    served_while_training = 0
    while (task := client.train_status())["status"] not in ("DONE", "ERROR"):
        if task["status"] == "RUNNING" and served_while_training < 3:  # clicks share the machine with training
            mask = click_mask(client, str(tmp_path))
            if client.train_status()["status"] == "RUNNING":  # nothing published yet: the same model answered
                assert np.array_equal(mask, mask_before)
                served_while_training += 1
        time.sleep(1)
    assert task["status"] == "DONE", task
    assert served_while_training > 0
    stats = client.info()["train_stats"]["sam3d"]
    assert 25 <= stats["resumed_at_step"] < steps and stats["steps"] == steps
    assert not os.path.exists(state)  # published, so the next run starts from the published model


def test_a_published_file_that_does_not_load_leaves_the_model_serving(training_server, tmp_path):
    url, app, _ = training_server
    client = MONAILabelClient(url, tmpdir=str(tmp_path))
    published = os.path.join(app, "model", "sam3d.pt")
    ensure_published(client, published)
    mask_before = click_mask(client, str(tmp_path))
    weights_before = client.info()["models"]["sam3d"]["weights"]
    with open(published, "rb") as f:
        good = f.read()
    try:
        with open(published, "wb") as f:  # a truncated copy put in place by hand
            f.write(good[: len(good) // 3])
        assert np.array_equal(click_mask(client, str(tmp_path)), mask_before)  # served by the model it had
        assert client.info()["models"]["sam3d"]["weights"] == weights_before
    finally:
        with open(published, "wb") as f:
            f.write(good)
