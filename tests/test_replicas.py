"""Two sam3d servers as replicas: one trains, the other refuses training and serves what the trainer publishes in
the model folder they share."""

import os
import shutil
import urllib.error
import urllib.request

import nibabel as nib
import numpy as np
import pytest
from monailabel.client import MONAILabelClient

from conftest import copy_app, start_server, stop_server, train_and_wait

CONF = ["--conf", "backbone", "tiny", "--conf", "sam_checkpoint", "none", "--conf", "warmup", "false"]


@pytest.fixture(scope="module")
def replicas(tmp_path_factory, demo_studies):
    """(trainer url, replica url, shared model folder): two app copies whose model folders are one folder."""
    trainer_app = copy_app(str(tmp_path_factory.mktemp("trainer")))
    replica_app = copy_app(str(tmp_path_factory.mktemp("replica")))
    shared = os.path.join(trainer_app, "model")
    os.makedirs(shared, exist_ok=True)
    os.symlink(shared, os.path.join(replica_app, "model"))
    servers = []
    try:
        urls = []
        for app, extra in ((trainer_app, []), (replica_app, None)):
            studies = str(tmp_path_factory.mktemp("studies"))
            shutil.copytree(demo_studies, studies, dirs_exist_ok=True)
            conf = CONF + (extra if extra is not None else ["--conf", "trainer", urls[0]])
            proc, url = start_server(app, studies, conf, str(tmp_path_factory.mktemp("logs") / "server.log"))
            servers.append(proc)
            urls.append(url)
        yield urls[0], urls[1], shared
    finally:
        for proc in servers:
            stop_server(proc)


def post(url):
    request = urllib.request.Request(url, data=b"{}", method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def click(url, tmp_path):
    path, _ = MONAILabelClient(url, tmpdir=str(tmp_path)).infer("sam3d", "demo_ct_01", {"foreground": [[83, 73, 47]]})
    return np.asarray(nib.load(path).dataobj)


def test_a_replica_refuses_training_naming_the_trainer_and_serves_what_the_trainer_publishes(replicas, tmp_path):
    trainer, replica, shared = replicas
    for path in ("/train/sam3d", "/train/"):
        status, body = post(f"{replica}{path}")
        assert status == 409 and trainer in body and "--conf trainer" in body, (path, status, body)
    before = click(replica, tmp_path)

    task = train_and_wait(MONAILabelClient(trainer, tmpdir=str(tmp_path)), {"steps": 20})
    assert task["status"] == "DONE", task

    after = click(replica, tmp_path)  # the replica's first click after publishing swaps the model in
    adapters = MONAILabelClient(replica).info()["models"]["sam3d"]["weights"]["adapters"]
    assert os.path.realpath(adapters.split(" ")[0]) == os.path.realpath(os.path.join(shared, "sam3d.pt")), adapters
    assert not np.array_equal(before, after)
    assert np.array_equal(after, click(trainer, tmp_path))  # both replicas now serve the same model
