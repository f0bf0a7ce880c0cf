"""Correction clicks through a real server: the answer is a function of the request alone (whoever clicked before,
restart or not), and a refinement replays one decoder round, not the encoder."""

import os

import nibabel as nib
import numpy as np
from monailabel.client import MONAILabelClient

from conftest import start_server, stop_server

FIRST = {"foreground": [[83, 73, 47]], "background": []}
CORRECTED = {"foreground": [[83, 73, 47], [86, 70, 52]], "background": [[70, 60, 47]]}
OTHER_USER = {"foreground": [[80, 76, 44], [85, 72, 50]], "background": [[95, 80, 47]]}


def mask(client, params):
    path, result = client.infer("sam3d", "demo_ct_01", params)
    return np.asarray(nib.load(path).dataobj), result


def test_a_correction_gets_the_same_mask_whoever_clicked_before_and_after_a_restart(demo_server, tmp_path):
    url, studies, _ = demo_server
    client = MONAILabelClient(url, tmpdir=str(tmp_path))
    assert client.info()["models"]["sam3d"]["weights"]["correction_trained"]
    mask(client, FIRST)
    corrected, result = mask(client, CORRECTED)
    assert result["encoder_runs"] == 0  # the refinement kept the crop of the first click

    other_user, _ = mask(client, OTHER_USER)  # another user on the same image, with other clicks
    assert not np.array_equal(other_user, corrected)
    again, _ = mask(client, CORRECTED)  # nothing of the other user's clicks leaks into this answer
    assert np.array_equal(again, corrected)

    # A second server on the same app (no state: fresh caches) answers the request alone the same way.
    app = os.path.join(os.path.dirname(studies), "sam3d")
    proc, second_url = start_server(app, studies, [], os.path.join(tmp_path, "second.log"))
    (tmp_path / "second").mkdir()
    try:
        fresh, _ = mask(MONAILabelClient(second_url, tmpdir=str(tmp_path / "second")), CORRECTED)
    finally:
        stop_server(proc)
    assert np.array_equal(fresh, corrected)
