"""Fixtures shared by the tests, and the fast loop's rule: ``bash scripts/test.sh --fast`` runs what starts no
server, trains no model, and needs no browser, PACS or container (``pyproject.toml`` puts ``apps/sam3d``,
``scripts`` and ``tests`` on the path)."""

import os
import shutil
from typing import List, Tuple

import local_server
import pacs
import numpy as np
import pytest
import torch
from local_server import copy_app, free_port, stop_server  # noqa: F401  (the test files import these from here)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APP = os.path.join(ROOT, "apps", "sam3d")
# Fixtures that start a server or train a model: every test that uses one (directly or through another fixture)
# is marked slow. A server started outside them fails the fast loop (start_server below), so a test that starts
# one in its own body must be marked slow by hand.
SLOW_FIXTURES = {
    "server", "demo_server", "slicer_server", "configured_server", "auth_server", "pacs_server",
    "pacs_server_corrections", "large_server", "multiclass_server", "training_server", "untrained_server",
    "limited_server", "load_server", "hostile", "store", "fuzzed_server", "upload_server", "trained_tiny", "trained_tiny_mixed", "trained_tiny_large",
    "training_studies", "replicas",
}
FAST = "SAM3D_TEST_FAST"  # set by scripts/test.sh --fast


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)


def start_server(*args, **kwargs):
    """``local_server.start_server``, refused in the fast loop (a slow test that is not marked as such)."""
    if os.environ.get(FAST):
        raise RuntimeError("this test starts a server: use a fixture of SLOW_FIXTURES or mark it slow")
    return local_server.start_server(*args, **kwargs)


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    folder = tmp_path_factory.mktemp("orthanc")
    url = pacs.write_orthanc_config(folder, free_port())
    proc = pacs.start_orthanc(folder)
    yield url
    pacs.stop_orthanc(proc)


@pytest.fixture(scope="module")
def dicom_series(orthanc, demo_studies, tmp_path_factory):
    """{study name: local series folder}, all uploaded to Orthanc."""
    from make_demo_studies import STUDIES
    from make_dicom_studies import upload, write_series

    out = str(tmp_path_factory.mktemp("dicom"))
    folders = {}
    for study in STUDIES:
        files = write_series(os.path.join(demo_studies, f"{study.name}.nii.gz"), study.name, out)
        upload(files, f"{orthanc}/dicom-web")
        folders[study.name] = os.path.dirname(files[0])
    return folders


@pytest.fixture(scope="session")
def demo_studies(tmp_path_factory):
    from make_demo_studies import write_studies

    out = str(tmp_path_factory.mktemp("studies"))
    write_studies(out)
    return out


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A seeded tiny model saved in our format, so that server outputs are reproducible."""
    from lib.model import CONFIGS, create_model, save_sam3d, trainable_names

    torch.manual_seed(0)
    model = create_model(CONFIGS["tiny"])
    path = str(tmp_path_factory.mktemp("ckpt") / "tiny.pt")
    save_sam3d(model, path, "tiny", trainable_names(model))
    return path, model


@pytest.fixture(scope="session")
def server(tmp_path_factory, demo_studies, tiny_checkpoint):
    """A real `monailabel start_server` on loopback with the tiny configuration; yields (url, studies, log path)."""
    studies = str(tmp_path_factory.mktemp("served"))
    shutil.copytree(demo_studies, studies, dirs_exist_ok=True)
    log_path = str(tmp_path_factory.mktemp("logs") / "server.log")
    conf = ["--conf", "backbone", "tiny", "--conf", "sam_checkpoint", "none", "--conf", "checkpoint", tiny_checkpoint[0]]
    # A random model's masks reach the crop's faces anywhere: following them would only cost crops here (a trained
    # model follows lesions in tests/test_large_lesions.py).
    conf += ["--conf", "follow_max_extent", "1"]
    proc, url = start_server(APP, studies, conf, log_path)
    yield url, studies, log_path
    stop_server(proc)


@pytest.fixture(scope="session")
def demo_server(tmp_path_factory, demo_studies):
    """What a new user starts: the app with no conf at all, on the demo studies. Its first start trains the demo
    weights (a few minutes on 2 cores). Yields (url, studies, log path)."""
    folder = tmp_path_factory.mktemp("demo_app")
    studies = str(folder / "studies")
    shutil.copytree(demo_studies, studies)
    log_path = str(folder / "server.log")
    proc, url = start_server(copy_app(str(folder)), studies, [], log_path, start_seconds=900)
    yield url, studies, log_path
    stop_server(proc)


def inside_ellipsoid(ras_points, centre, radii):
    """(N, 3) RAS millimetres -> (N,) bool: inside a demo lesion (an axis-aligned ellipsoid in RAS)."""
    return (((np.atleast_2d(ras_points) - np.asarray(centre)) / np.asarray(radii)) ** 2).sum(axis=1) <= 1


def mask_points_ras(mask):
    """The RAS millimetres of a SimpleITK mask's foreground voxels: (N, 3)."""
    import SimpleITK as sitk

    ijk = np.argwhere(sitk.GetArrayFromImage(mask) > 0)[:, ::-1]  # the array is (k, j, i)
    to_lps = np.array(mask.GetDirection()).reshape(3, 3) @ np.diag(mask.GetSpacing())
    return (np.asarray(mask.GetOrigin()) + ijk @ to_lps.T) * [-1.0, -1.0, 1.0]


def load_kits(folder, name):
    """A study of a datastore folder, pre-processed with the kits preset: (1, D, H, W) image and bool label."""
    from lib.training.data import load_labelled

    return load_labelled(
        os.path.join(folder, f"{name}.nii.gz"), os.path.join(folder, "labels", "final", f"{name}.nii.gz"), "kits"
    )


@pytest.fixture(scope="session")
def training_studies(tmp_path_factory):
    """12 generated studies (never the demo ones), pre-processed: training data."""
    from make_demo_studies import random_studies, write_studies

    folder = str(tmp_path_factory.mktemp("training"))
    studies = random_studies(12)
    write_studies(folder, studies=studies)
    return [load_kits(folder, s.name) for s in studies]


@pytest.fixture(scope="session")
def trained_tiny(demo_server):
    """The demo weights that the demo server made at its first start (lib/training/demo.py: the tiny configuration,
    400 steps on 12 generated studies, never the demo ones): a checkpoint path, as the server's /info/ names it.
    One training serves both."""
    import requests

    weights = requests.get(f"{demo_server[0]}/info/", timeout=60).json()["models"]["sam3d"]["weights"]
    assert weights["state"] == "demo", weights  # a model published on the demo server would not be these weights
    return weights["checkpoint"]


def train_tiny(tmp_path_factory, name: str, studies) -> Tuple[str, List[float]]:
    """The tiny configuration trained as users correct (400 steps, seed 0) on generated ``studies``, written to a
    folder and loaded as the kits preset does: (checkpoint path, losses)."""
    from lib.model import build_sam3d, save_sam3d
    from lib.phantoms import write_studies
    from lib.training.fit import fit
    from lib.transforms.presets import PRESETS

    folder = str(tmp_path_factory.mktemp(f"training_{name}"))
    write_studies(folder, studies=studies)
    volumes = [load_kits(folder, s.name) for s in studies]
    torch.manual_seed(0)
    model = build_sam3d(backbone="tiny")
    losses, _ = fit(model, volumes, 400, PRESETS["kits"], lr=1e-3)
    path = str(tmp_path_factory.mktemp(f"trained_{name}") / f"tiny_{name}.pt")
    save_sam3d(model, path, "tiny", model.trained_names)
    return path, losses


@pytest.fixture(scope="session")
def trained_tiny_mixed(tmp_path_factory):
    """The tiny configuration trained on 12 easy and 12 hard generated studies (hard_studies' default seed;
    evaluations hold out other seeds): (checkpoint path, losses)."""
    from lib.phantoms import hard_studies, random_studies

    return train_tiny(tmp_path_factory, "mixed", random_studies(12) + hard_studies(12))


def train_and_wait(client, params, seconds=600):
    """Start a training run through ``client`` (MONAILabelClient) and wait for its end: the final status."""
    client.train_start("sam3d", params)
    return wait_for_training(client, seconds)


def wait_for_training(client, seconds=600):
    """Wait for the end of the training run the server behind ``client`` (MONAILabelClient) holds: its final status."""
    import time

    deadline = time.time() + seconds
    while (task := client.train_status())["status"] not in ("DONE", "ERROR"):  # SUBMITTED, then RUNNING
        assert time.time() < deadline, f"training did not finish in {seconds} s"
        time.sleep(2)
    return task


class CrashingVolumes(list):
    """Training data whose reads fail after ``limit`` of them: a run that dies in the middle."""

    def __init__(self, volumes, limit):
        super().__init__(volumes)
        self.reads, self.limit = 0, limit

    def __getitem__(self, index):
        self.reads += 1
        if self.reads > self.limit:
            raise OSError("the disk went away")
        return super().__getitem__(index)


def tiny_trainable(seed=0):
    """The tiny configuration with every parameter trained, from ``seed``'s initialisation."""
    from lib.model import build_sam3d

    torch.manual_seed(seed)
    model = build_sam3d(backbone="tiny")
    for p in model.parameters():
        p.requires_grad = True
    return model
