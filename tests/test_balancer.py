"""Two sam3d replicas behind nginx (scripts/balancer.py), sharing one PACS (Orthanc): each image's clicks stick to
one replica and find its cached encodings, masks equal a single server's, a label saved through one replica is seen
by the other, training goes to the trainer, and a replica killed during a stream of clicks loses no request and no
label."""

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import SimpleITK as sitk
from monailabel.client import MONAILabelClient

from conftest import ROOT, copy_app, free_port, start_server, stop_server
from pacs import LPS, read_series

pytestmark = [pytest.mark.pacs, pytest.mark.slow]

CONF = ["--conf", "backbone", "tiny", "--conf", "sam_checkpoint", "none", "--conf", "warmup", "false"]
# Each replica lists the PACS's labels again after this many seconds (MONAI Label's DICOMweb cache; 7200 by default).
LABEL_LIST_SECONDS = 5
ACCESS = re.compile(r'"(?P<method>\w+) (?P<path>\S+) HTTP/[\d.]+" (?P<status>\d+) upstream=(?P<upstream>\S+(?:, \S+)*)')


@pytest.fixture(scope="module")
def balanced(orthanc, dicom_series, trained_tiny, tmp_path_factory):
    """{"balancer": url, "trainer": url, "replica": url, "procs": {url: process}, "log": the balancer's access log}."""
    servers = {}
    balancer = None
    try:
        urls = []
        for role in ("trainer", "replica"):
            folder = tmp_path_factory.mktemp(role)
            conf = CONF + ["--conf", "checkpoint", trained_tiny] + (["--conf", "trainer", urls[0]] if urls else [])
            env = {"MONAI_LABEL_DICOMWEB_CACHE_PATH": str(folder / "dicomweb_cache"),
                   "MONAI_LABEL_DICOMWEB_CACHE_EXPIRY": str(LABEL_LIST_SECONDS)}
            proc, url = start_server(copy_app(str(folder)), f"{orthanc}/dicom-web", conf, str(folder / "server.log"), env)
            servers[url] = proc
            urls.append(url)
        workdir = tmp_path_factory.mktemp("balancer")
        port = free_port()
        balancer = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "scripts", "balancer.py"), "--listen", f"127.0.0.1:{port}",
             "--trainer", urls[0], "--replica", urls[1], "--workdir", str(workdir)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(f"{url}/info/", timeout=10).read()
                break
            except OSError:
                assert balancer.poll() is None and time.time() < deadline, balancer.stdout.read()
                time.sleep(0.2)
        yield {"balancer": url, "trainer": urls[0], "replica": urls[1], "procs": servers,
               "log": str(workdir / "access.log")}
    finally:
        if balancer is not None:
            balancer.terminate()
            balancer.wait(timeout=30)
        for proc in servers.values():
            stop_server(proc)


def series_id(name):
    from make_dicom_studies import series_uids

    return series_uids(name)["series"]


def click_sessions(dicom_series):
    """{series id: [clicks of request 1, of request 2, of request 3]}: a click on each demo lesion's centre, then a
    second foreground click beside it, then a background click a few voxels off, as one user refines."""
    from make_demo_studies import STUDIES

    sessions = {}
    for study in STUDIES:
        series = read_series(dicom_series[study.name])
        size = np.array(series.GetSize()) - 1
        centre = np.array(series.TransformPhysicalPointToIndex((np.asarray(study.lesions[0][0]) * LPS).tolist()))
        beside, off = np.clip(centre + [2, 2, 0], 0, size), np.clip(centre + [9, 0, 0], 0, size)
        first = {"foreground": [centre.tolist()], "background": []}
        second = {"foreground": [centre.tolist(), beside.tolist()], "background": []}
        third = {"foreground": second["foreground"], "background": [off.tolist()]}
        sessions[series_id(study.name)] = [first, second, third]
    return sessions


def infer(url, image, clicks, tmp_path):
    """(mask as a (k, j, i) array, the result's JSON) of one click request."""
    path, result = MONAILabelClient(url, tmpdir=str(tmp_path)).infer(
        "sam3d", image, {**clicks, "result_extension": ".nrrd"}
    )
    try:
        return sitk.GetArrayFromImage(sitk.ReadImage(path)), result
    finally:
        os.remove(path)


def upstreams(log, image):
    """The servers (host:port, in order) that answered each logged request about ``image`` through the balancer."""
    with open(log) as f:
        return [m["upstream"] for m in map(ACCESS.search, f) if m and f"image={image}" in m["path"]]


def test_each_images_clicks_stick_to_one_replica_hit_its_cache_and_equal_a_single_servers_masks(
    balanced, dicom_series, tmp_path
):
    sessions = click_sessions(dicom_series)
    answers = {image: [] for image in sessions}
    for round_index in range(3):  # round-robin across images, as several users clicking at once
        for image, clicks in sessions.items():
            answers[image].append(infer(balanced["balancer"], image, clicks[round_index], tmp_path))

    refinements = hits = 0
    for image, clicks in sessions.items():
        served = upstreams(balanced["log"], image)
        assert len(served) == 3 and len(set(served)) == 1, served  # every request of the image on one replica
        other = next(url for url in (balanced["trainer"], balanced["replica"]) if not url.endswith(served[0]))
        for round_index, (mask, result) in enumerate(answers[image]):
            if round_index:
                refinements += 1
                hits += result["encoder_runs"] == 0 and result["cache_hits"] > 0
            # The other replica, asked directly with the same clicks (nothing of this image in its caches at the
            # first), answers the same mask: a request carries all its state.
            direct, direct_result = infer(other, image, clicks[round_index], tmp_path)
            assert direct_result["encoder_runs"] > 0 or round_index
            assert np.array_equal(mask, direct), (image, round_index)
    assert hits >= 0.95 * refinements, (hits, refinements)


def labelled_images(url):
    """How many images ``url``'s datastore counts with a final label: the PACS's DICOM-SEG series that reference one
    (MONAI Label's DICOMweb datastore lists them again after LABEL_LIST_SECONDS)."""
    answer = requests.get(f"{url}/datastore/", params={"output": "stats"}, timeout=60)
    answer.raise_for_status()
    return answer.json()["completed"]


def test_a_label_saved_through_one_replica_is_seen_by_the_other(balanced, dicom_series, tmp_path):
    image, clicks = next(iter(click_sessions(dicom_series).items()))
    mask, _ = infer(balanced["balancer"], image, clicks[0], tmp_path)
    path = tmp_path / "label.nrrd"
    series = read_series(next(iter(dicom_series.values())))
    label = sitk.GetImageFromArray(mask.astype(np.uint8))
    label.CopyInformation(series)
    sitk.WriteImage(label, str(path))
    MONAILabelClient(balanced["balancer"], tmpdir=str(tmp_path)).save_label(image, str(path), tag="final")
    saver = upstreams(balanced["log"], image)[-1]
    other = next(url for url in (balanced["trainer"], balanced["replica"]) if not url.endswith(saver))
    started, deadline = time.time(), time.time() + 4 * LABEL_LIST_SECONDS + 30
    while labelled_images(other) != 1:  # the PACS held no label before
        assert time.time() < deadline, f"{other} does not list the label saved through {saver}"
        time.sleep(1)
    assert time.time() - started <= 2 * LABEL_LIST_SECONDS + 10


def test_train_requests_go_to_the_trainer_whichever_replica_serves_the_rest(balanced):
    for _ in range(4):  # whatever the balancer would pick for a request without an image
        answer = requests.post(f"{balanced['balancer']}/train/sam3d", json={"no_such_option": 1}, timeout=60)
        assert answer.status_code == 422 and "no_such_option" in answer.text, answer.text  # the trainer's check
    assert requests.post(f"{balanced['replica']}/train/sam3d", json={}, timeout=60).status_code == 409


def test_a_replica_killed_during_a_stream_of_clicks_loses_no_request_and_no_label(balanced, dicom_series, tmp_path):
    sessions = click_sessions(dicom_series)
    expected = {image: infer(balanced["trainer"], image, clicks[0], tmp_path)[0] for image, clicks in sessions.items()}
    # The victim: the replica that serves the first image (found by the previous tests' traffic).
    image = next(iter(sessions))
    victim_address = upstreams(balanced["log"], image)[-1]
    victim = next(url for url in balanced["procs"] if url.endswith(victim_address))
    stream = [image for _ in range(3) for image in sessions]
    with ThreadPoolExecutor(max_workers=2) as pool:
        answers = []
        for index, image in enumerate(stream):
            answers.append(pool.submit(infer, balanced["balancer"], image, sessions[image][0], tmp_path))
            if index == 1:  # a request in flight to the victim (its image's first) when it dies
                time.sleep(0.3)
                balanced["procs"][victim].send_signal(signal.SIGKILL)
        for image, answer in zip(stream, answers):
            mask, _ = answer.result(timeout=600)  # no request lost: each answered, and answered right
            assert np.array_equal(mask, expected[image]), image
    assert balanced["procs"][victim].wait(timeout=30) == -signal.SIGKILL
    # The label saved before the kill (the previous test) is kept: the PACS holds it, and the survivor counts it.
    assert labelled_images(balanced["balancer"]) == 1
