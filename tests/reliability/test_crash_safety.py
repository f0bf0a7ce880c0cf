"""The server SIGKILLed while it saves a label: after a restart the label is the old one or the new one, whole,
and the datastore file parses. (A model publish killed midway is in tests/test_training.py.)"""

import hashlib
import json
import os
import shutil
import signal
import threading
import time
import urllib.request

import nibabel as nib
import numpy as np
import pytest
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException

from conftest import APP, start_server, stop_server

pytestmark = pytest.mark.slow

IMAGE = "large_ct"  # 256^3, so that its label is large
SHAPE = (256, 256, 256)
DEMO_LABELS = {"demo_ct_01.nii.gz", "demo_ct_02_aniso.nii.gz", "demo_ct_03_oblique.nii.gz"}
CONF = ["--conf", "backbone", "tiny", "--conf", "sam_checkpoint", "none", "--conf", "warmup", "false"]


def write_label(path, value):
    """A 16 MiB uncompressed label, large enough that copying it is not instantaneous."""
    data = np.zeros(SHAPE, np.uint8)
    data[value::7] = value
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def folder_state(folder):
    return {e.name: (e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(folder)}


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture(scope="module")
def studies(tmp_path_factory, demo_studies):
    folder = str(tmp_path_factory.mktemp("crash_studies"))
    shutil.copytree(demo_studies, folder, dirs_exist_ok=True)
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.int16), np.eye(4)), os.path.join(folder, f"{IMAGE}.nii.gz"))
    return folder


@pytest.mark.parametrize("delay_ms", [0, 3, 15, 60])
def test_a_kill_during_a_label_save_leaves_the_old_or_the_new_label_whole(studies, tmp_path, delay_ms):
    labels = os.path.join(studies, "labels", "final")
    log = str(tmp_path / "server.log")
    proc, url = start_server(APP, studies, CONF, log)
    try:
        client = MONAILabelClient(url, tmpdir=str(tmp_path))
        stored = os.path.join(labels, f"{IMAGE}.nii")
        if not os.path.exists(stored):  # the first round saves the label that later rounds replace
            write_label(tmp_path / "first.nii", 1)
            client.save_label(IMAGE, str(tmp_path / "first.nii"), tag="final")
        old = sha256(stored)
        new = write_label(tmp_path / "second.nii", 2 + delay_ms % 5)

        before = folder_state(labels)
        saving = threading.Thread(target=save_ignoring_the_kill, args=(client, str(tmp_path / "second.nii")))
        saving.start()
        deadline = time.time() + 60
        while folder_state(labels) == before:  # the server has started writing the label
            assert time.time() < deadline, "the save never reached the labels folder"
        time.sleep(delay_ms / 1000)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        saving.join()
    finally:
        stop_server(proc)

    assert sha256(stored) in (old, new)
    with open(os.path.join(studies, "datastore_v2.json")) as f:
        json.load(f)

    proc, url = start_server(APP, studies, CONF, str(tmp_path / "restarted.log"))
    try:
        client = MONAILabelClient(url, tmpdir=str(tmp_path))
        assert IMAGE in client.datastore()["objects"]  # MONAI Label read the datastore back
        assert set(os.listdir(labels)) == DEMO_LABELS | {f"{IMAGE}.nii"}, "a partial file was left behind"
        with urllib.request.urlopen(f"{url}/datastore/label?label={IMAGE}&tag=final") as served:
            assert hashlib.sha256(served.read()).hexdigest() in (old, new)
        mask, _ = client.infer("sam3d", IMAGE, {"foreground": [[83, 73, 47]]})
        assert nib.load(mask).shape == nib.load(os.path.join(studies, f"{IMAGE}.nii.gz")).shape
    finally:
        stop_server(proc)


def save_ignoring_the_kill(client, path):
    try:
        client.save_label(IMAGE, path, tag="final")
    except (MONAILabelClientException, OSError):
        pass  # the server died under the request, as intended


def test_a_datastore_file_that_does_not_parse_is_kept_aside_and_the_server_starts(demo_studies, tmp_path):
    folder = str(tmp_path / "studies")
    shutil.copytree(demo_studies, folder)
    config = os.path.join(folder, "datastore_v2.json")
    with open(config, "w") as f:
        f.write('{"name": "new-dataset", "objects": {"demo_ct_01": {"ima')  # cut short by a crash
    proc, url = start_server(APP, folder, CONF, str(tmp_path / "server.log"))
    try:
        objects = MONAILabelClient(url, tmpdir=str(tmp_path)).datastore()["objects"]
        assert objects["demo_ct_01"]["labels"], "images and labels are found again from the files"
    finally:
        stop_server(proc)
    kept = [n for n in os.listdir(folder) if n.startswith("datastore_v2.json.unreadable-")]
    assert len(kept) == 1
    with open(os.path.join(folder, kept[0])) as f:
        assert f.read().endswith('"ima')


def test_the_start_up_clean_up_waits_for_a_save_in_progress(demo_studies, tmp_path):
    """MONAI Label opens the datastore in a new process for scoring and training, e.g. right after a label is
    saved; its start-up clean-up once removed the temporary file of a save still in progress (a 500)."""
    import threading

    from filelock import FileLock

    from lib.datastore import SafeLocalDatastore

    folder = str(tmp_path / "studies")
    shutil.copytree(demo_studies, folder)
    datastore = SafeLocalDatastore(folder)
    partial = os.path.join(folder, "labels", "final", ".partial-inprogress.tmp")
    with FileLock(datastore._lock_file):  # a save at work (another process's lock), as save_label holds it
        with open(partial, "wb") as f:
            f.write(b"the label being written")
        cleaning = threading.Thread(target=datastore.remove_partial_files)
        cleaning.start()
        cleaning.join(timeout=2)
        assert cleaning.is_alive() and os.path.exists(partial), "the clean-up did not wait for the save"
        os.replace(partial, os.path.join(folder, "labels", "final", "demo_ct_01.nii.gz"))  # the save completes
    cleaning.join(timeout=30)
    assert not cleaning.is_alive()


def test_a_claimed_download_folder_is_left_alone_until_its_writer_is_gone(tmp_path):
    from lib.files import claimed, remove_partial_files

    partial = tmp_path / ".partial-download.tmp"
    partial.mkdir()
    with claimed(str(partial)):
        assert remove_partial_files(str(tmp_path)) == 0 and partial.exists()
    assert remove_partial_files(str(tmp_path)) == 1 and not partial.exists()
