"""Requests that a careless or hostile client sends to a real server: each gets a 4xx with a reason (never a
5xx), leaves no file behind, and neither hides another client's result nor holds up the light endpoints."""

import json
import os
import shutil
import threading
import time

import nibabel as nib
import numpy as np
import pytest
import requests
from monailabel.client import MONAILabelClient

from conftest import copy_app, start_server, stop_server
from test_limits import files_under


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, demo_studies, tiny_checkpoint):
    """A server of its own with a temporary folder of its own (everything in it is the server's). Yields (url,
    studies, temporary folder, what that folder held once the server was up)."""
    studies = str(tmp_path_factory.mktemp("hostile_studies"))
    shutil.copytree(demo_studies, studies, dirs_exist_ok=True)
    temp = str(tmp_path_factory.mktemp("hostile_tmp"))
    conf = ["--conf", "backbone", "tiny", "--conf", "sam_checkpoint", "none", "--conf", "checkpoint",
            tiny_checkpoint[0], "--conf", "warmup", "false", "--conf", "max_crops", "1000"]
    app = copy_app(str(tmp_path_factory.mktemp("app")))
    proc, url = start_server(app, studies, conf, str(tmp_path_factory.mktemp("logs") / "server.log"), {"TMPDIR": temp})
    yield url, studies, temp, files_under(temp)
    stop_server(proc)


def nifti(path, shape=(40, 40, 30)):
    data = np.random.default_rng(0).integers(0, 100, shape).astype(np.int16)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    return str(path)


def post(url, path, params=None, files=None, data=None):
    return requests.post(f"{url}{path}", params=params, files=files, data=data, timeout=600)


def put(url, path, params=None, files=None, data=None):
    return requests.put(f"{url}{path}", params=params, files=files, data=data, timeout=120)


def test_refused_uploads_leave_no_file_and_no_server_path(hostile, tmp_path):
    url, studies, temp, baseline = hostile
    image = nifti(tmp_path / "image.nii.gz")
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"\x1f\x8b\x08 not really gzip" * 1000)
    wrong_shape = nifti(tmp_path / "label.nii.gz", (10, 10, 10))
    refused = [
        post(url, "/infer/sam3d", {"output": "image"}, {"file": open(image, "rb")}, {"params": '{"foreground": [[99, 0, 0]]}'}),
        post(url, "/infer/sam3d", {"output": "image"}, {"file": open(garbage, "rb")}, {"params": '{"foreground": [[1, 1, 1]]}'}),
        put(url, "/datastore/label", {"image": "demo_ct_01", "tag": "final"}, {"label": open(wrong_shape, "rb")}),
        put(url, "/datastore/label", {"image": "no_such_image", "tag": "final"}, {"label": open(wrong_shape, "rb")}),
        put(url, "/datastore/image", {"image": "broken"}, {"file": open(garbage, "rb")}, {"params": "{}"}),
        put(url, "/datastore/image", {"image": "x"}, {"file": open(image, "rb")}, {"params": "[1, 2]"}),
    ]
    for answer in refused:
        assert 400 <= answer.status_code < 500, answer.text
        assert temp not in answer.text and "/tmp" not in answer.text, answer.text
    assert files_under(temp) == baseline


def test_a_client_on_the_servers_machine_keeps_its_results(hostile):
    """MONAI Label's client saves a result as ``tmpdir/<the server's file name>``: with the server's temporary
    folder as its own, as on a workstation that runs both, the server's clean-up removed the client's copy."""
    url, _, temp, _ = hostile
    client = MONAILabelClient(url, tmpdir=temp)
    paths = [client.infer("sam3d", "demo_ct_01", {"foreground": [[83, 73, 47]]})[0] for _ in range(10)]
    time.sleep(0.5)
    for path in paths:
        assert nib.load(path).shape == (128, 128, 96)
        os.remove(path)


def test_info_answers_while_the_model_runs(hostile):
    url, _, _, _ = hostile
    clicks = [[i, j, k] for i in range(5, 128, 30) for j in range(5, 128, 30) for k in range(5, 96, 30)]
    answer = {}
    worker = threading.Thread(target=lambda: answer.update(r=post(
        url, "/infer/sam3d", {"image": "demo_ct_01", "output": "json"}, data={"params": json.dumps(
            {"foreground": clicks, "preset": "lits"})})))
    start = time.time()
    worker.start()
    time.sleep(0.5)
    waits = []
    while worker.is_alive():
        before = time.time()
        requests.get(f"{url}/info/", timeout=60).raise_for_status()
        waits.append(time.time() - before)
        time.sleep(0.2)
    worker.join()
    assert answer["r"].status_code == 200, answer["r"].text
    took = time.time() - start
    assert took > 2 and len(waits) >= 3, "the click was too quick to tell"
    assert max(waits) < min(took / 2, 5.0), (took, waits)  # behind the click, /info/ waited for all of it


def test_a_request_that_needs_more_crops_than_the_bound_is_a_422(server):
    """The default bound (16): 729 far-apart clicks, under the cap on clicks, would run 729 encoder passes."""
    from test_server import post_infer

    clicks = [[i, j, k] for i in range(2, 40, 5) for j in range(2, 140, 16) for k in range(2, 150, 16)][:729]
    status, body = post_infer(server[0], "demo_ct_02_aniso", {"foreground": clicks})
    assert status == 422 and "max_crops" in str(body), body


IMAGE_PARAMS = [
    ({"foreground": [[1, 1, 1]], "logging": "nope"}, "logging"),
    ({"foreground": [[1, 1, 1]], "logging": 5}, "logging"),
    ({"foreground": [[1, 1, 1]], "device": ["cpu"]}, "device"),
    ({"foreground": [[1, 1, 1]], "skip_writer": True}, "skip_writer"),
    ({"foreground": [[1, 1, 1]], "skip_writer": "yes"}, "skip_writer"),
    ({"foreground": [[1, 1, 1]], "result_write_to_file": False}, "result_write_to_file"),
    ({"foreground": [[1, 1, 1]], "result_extension": ".exe"}, "result_extension"),
    ({"foreground": [[1, 1, 1]], "result_extension": "../x"}, "result_extension"),
    ({"foreground": [[1, 1, 1]], "result_extension": 5}, "result_extension"),
    ({"foreground": [[1, 1, 1]], "result_dtype": "nope"}, "result_dtype"),
    ({"foreground": [[1, 1, 1]], "result_dtype": "complex64"}, "result_dtype"),
    ({"foreground": [[1, 1, 1]], "result_dtype": "bool"}, "result_dtype"),
    ({"foreground": [[1, 1, 1]], "image": 5}, "image"),
    ({"foreground": [[1, 1, 1]], "image": None}, "image"),
    ({"foreground": [[1, 1, 1]], "image": ["demo_ct_01"]}, "image"),
]


@pytest.mark.parametrize("params, named", IMAGE_PARAMS)
def test_odd_values_of_monai_labels_request_keys_are_a_422(hostile, params, named):
    answer = post(hostile[0], "/infer/sam3d", {"image": "demo_ct_01", "output": "image"}, data={"params": json.dumps(params)})
    assert answer.status_code == 422 and named in answer.json()["detail"], answer.text


@pytest.mark.parametrize("text", ["[1,2]", "null", "7", '"abc"', "true", "{"])
def test_a_params_or_info_field_that_is_not_a_json_object_is_a_422(hostile, tmp_path, text):
    url = hostile[0]
    label = nifti(tmp_path / "l.nii.gz", (128, 128, 96))
    answers = [
        post(url, "/infer/sam3d", {"image": "demo_ct_01"}, data={"params": text}),
        put(url, "/datastore/label", {"image": "demo_ct_01", "tag": "scratch"}, {"label": open(label, "rb")}, {"params": text}),
        put(url, "/datastore/image", {"image": "scratch"}, {"file": open(label, "rb")}, {"params": text}),
        put(url, "/datastore/image/info", {"image": "demo_ct_01"}, data={"info": text}),
        put(url, "/datastore/label/info", {"label": "demo_ct_01", "tag": "final"}, data={"info": text}),
    ]
    for answer in answers:
        assert answer.status_code == 422 and "JSON object" in answer.json()["detail"], answer.text


def test_requests_without_an_image_or_with_an_unsupported_output_are_a_422(hostile, tmp_path):
    url = hostile[0]
    answer = post(url, "/infer/sam3d", {"output": "image"}, data={"params": '{"foreground": [[1, 1, 1]]}'})
    assert answer.status_code == 422 and "image" in answer.json()["detail"], answer.text
    answer = post(url, "/infer/sam3d", {"image": "demo_ct_01", "output": "dicom_seg"},
                  data={"params": '{"foreground": [[1, 1, 1]]}'})
    assert answer.status_code == 422 and "dicom_seg" in answer.json()["detail"], answer.text
    label = tmp_path / "x.bin"
    label.write_bytes(b"\x00" * 100)
    answer = post(url, "/infer/sam3d", {"image": "demo_ct_01", "output": "image"}, {"label": open(label, "rb")},
                  {"params": '{"foreground": [[1, 1, 1]]}'})
    assert answer.status_code == 422 and "label" in answer.json()["detail"], answer.text


@pytest.mark.parametrize("name, status", [
    ("SCAN.NII.GZ", 200),
    ("scan" + ".x" * 200 + ".nii.gz", 200),
    ("scan" + ".x" * 200, 422),
    ("sc\x00an.nii.gz", 200),
    ("scan.bin", 422),
])
def test_upload_file_names_are_matched_on_their_format_only(hostile, tmp_path, name, status):
    data = open(nifti(tmp_path / "image.nii.gz"), "rb").read()
    answer = post(hostile[0], "/infer/sam3d", {"output": "json"}, {"file": (name, data)},
                  {"params": '{"foreground": [[20, 20, 15]]}'})
    assert answer.status_code == status, answer.text


@pytest.mark.parametrize("value", [0.0, np.nan], ids=["zero", "nan"])
def test_an_upload_with_a_degenerate_affine_gets_an_answer_not_a_500(hostile, tmp_path, value):
    path = nifti(tmp_path / "image.nii")
    header = bytearray(open(path, "rb").read())
    header[252:256] = np.array([0, 1], "<i2").tobytes()  # qform_code 0, sform_code 1: the affine is the sform's
    header[280:328] = np.full(12, value, "<f4").tobytes()  # srow_x, srow_y, srow_z
    open(path, "wb").write(header)
    answer = post(hostile[0], "/infer/sam3d", {"output": "json"}, {"file": open(path, "rb")},
                  {"params": '{"foreground": [[20, 20, 15]]}'})
    assert answer.status_code in (200, 422), answer.text


@pytest.mark.parametrize("field", ["image", "tag"])
def test_an_image_id_or_label_tag_of_300_characters_is_a_422(hostile, tmp_path, field):
    url = hostile[0]
    path = nifti(tmp_path / "image.nii.gz", (128, 128, 96))
    if field == "image":
        answer = put(url, "/datastore/image", {"image": "a" * 300}, {"file": open(path, "rb")}, {"params": "{}"})
    else:
        answer = put(url, "/datastore/label", {"image": "demo_ct_01", "tag": "t" * 300}, {"label": open(path, "rb")})
    assert answer.status_code == 422 and "bytes at most" in answer.json()["detail"], answer.text


def test_next_sample_survives_odd_info_and_quick_repeats(hostile, tmp_path):
    url, studies, _, _ = hostile
    assert put(url, "/datastore/image", {"image": "unlabelled"}, {"file": open(nifti(tmp_path / "u.nii.gz"), "rb")},
               {"params": "{}"}).status_code == 200
    for info in ({"sam3d_uncertainty": "high"}, {"sam3d_uncertainty": 1e400}, {"strategy": "text"},
                 {"strategy": {"random": 5}}):
        answer = put(url, "/datastore/image/info", {"image": "unlabelled"}, data={"info": json.dumps(info)})
        assert answer.status_code == 422 and list(info)[0] in answer.json()["detail"], answer.text
    for strategy in ("uncertain", "random", "random", "first"):
        answer = post(url, f"/activelearning/{strategy}", data=None)
        assert answer.status_code == 200 and answer.json()["id"] == "unlabelled", answer.text
    answer = post(url, "/activelearning/nope")
    assert answer.status_code == 404 and "unknown strategy" in answer.json()["detail"], answer.text


def test_a_click_on_an_image_deleted_meanwhile_is_a_404(hostile, tmp_path):
    url, studies, _, _ = hostile
    path = nifti(tmp_path / "gone.nii.gz", (120, 120, 90))
    statuses = []
    for attempt in range(8):
        assert put(url, "/datastore/image", {"image": "gone"}, {"file": open(path, "rb")}, {"params": "{}"}).status_code == 200
        click = threading.Thread(target=lambda: statuses.append(post(
            url, "/infer/sam3d", {"image": "gone", "output": "json"}, data={"params": '{"foreground": [[60, 60, 45]]}'})))
        click.start()
        time.sleep(0.05 * attempt)
        requests.delete(f"{url}/datastore/image", params={"id": "gone"}).raise_for_status()
        click.join()
    for answer in statuses:
        assert answer.status_code in (200, 404), answer.text


def test_training_requests_are_checked_before_they_are_accepted(hostile):
    url, studies, _, _ = hostile
    for params, named in (({"steps": "abc"}, "steps"), ({"max_epochs": 5}, "max_epochs"), ({"gpus": 5}, "gpus"),
                          ({"gpus": "7"}, "gpus"), ({"seed": "1" * 140000}, "seed")):
        answer = requests.post(f"{url}/train/sam3d", json=params)
        assert answer.status_code == 422 and named in answer.json()["detail"], answer.text
    assert requests.get(f"{url}/train/").status_code == 404  # nothing was started

    answers = []
    starts = [threading.Thread(target=lambda: answers.append(requests.post(f"{url}/train/sam3d", json={"steps": 500})))
              for _ in range(3)]
    for start in starts:
        start.start()
    for start in starts:
        start.join()
    assert sorted(a.status_code for a in answers) == [200, 429, 429], [a.text for a in answers]
    assert requests.post(f"{url}/train/sam3d", params={"enqueue": "true"}, json={"steps": 5}).status_code == 429
    requests.delete(f"{url}/train/").raise_for_status()
    time.sleep(1)
    assert requests.get(f"{url}/train/").json()["status"] == "STOPPED"

    for name in os.listdir(os.path.join(studies, "labels", "final")):
        requests.delete(f"{url}/datastore/label", params={"id": name.split(".")[0], "tag": "final"}).raise_for_status()
    answer = requests.post(f"{url}/train/sam3d", json={"steps": 5})
    assert answer.status_code == 422 and "no images with a final label" in answer.json()["detail"], answer.text
