"""scripts/simulate_session.py: a short annotation session through a real server, with training in it."""

import csv
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from scipy import ndimage

from conftest import ROOT

pytestmark = pytest.mark.slow

CASES = 3


@pytest.fixture(scope="module")
def msd_folder(tmp_path_factory):
    """Three generated studies (1-2 lesions each) in the MSD layout: imagesTr/ and labelsTr/."""
    from lib.phantoms import random_studies, write_studies

    folder = tmp_path_factory.mktemp("msd")
    studies = random_studies(CASES, seed=4242)
    write_studies(str(folder / "raw"), studies=studies)
    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir()
    for s in studies:
        shutil.move(folder / "raw" / f"{s.name}.nii.gz", folder / "imagesTr")
        shutil.move(folder / "raw" / "labels" / "final" / f"{s.name}.nii.gz", folder / "labelsTr")
    return folder


def lesions(label_path):
    """The 26-connected components of a label, as the script counts them."""
    import nibabel as nib

    label = np.asarray(nib.load(label_path).dataobj) > 0
    return ndimage.label(label, structure=np.ones((3, 3, 3)))[1]


def test_a_short_session_trains_and_serves_what_it_trained(msd_folder, tmp_path):
    out = tmp_path / "session"
    command = [
        sys.executable, os.path.join(ROOT, "scripts", "simulate_session.py"), str(msd_folder), "--out", str(out),
        "--strategy", "first", "--train-every", "2", "--train-steps", "2", "--train-wait", "--max-clicks", "2",
        "--backbone", "tiny", "--conf", "sam_checkpoint", "none", "--conf", "warmup", "false", "--label-value", "1",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-5000:]

    with open(out / "session.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    # A row per lesion, cases in the order the `first` strategy offers them (sorted ids).
    cases = sorted(name[: -len(".nii.gz")] for name in os.listdir(msd_folder / "imagesTr"))
    expected = [(case, str(i)) for case in cases for i in range(1, lesions(msd_folder / "labelsTr" / f"{case}.nii.gz") + 1)]
    assert [(r["case"], r["lesion"]) for r in rows] == expected and len(expected) > CASES  # some case has two
    assert {r["session"] for r in rows} == {"first_every2"}
    for r in rows:
        assert 1 <= int(r["clicks"]) <= 2 and 0 <= float(r["dice"]) <= 1
        assert r["reached"] == str(int(float(r["dice"]) >= 0.9))
    # Two labels saved, one run trained on them, and its published model served the third case.
    by_order = {o: [r for r in rows if r["order"] == o] for o in ("1", "2", "3")}
    assert all(r["weights"] == "initial (untrained)" and r["runs_finished"] == "0" for r in by_order["1"] + by_order["2"])
    assert all(r["weights"].startswith("trained on 2 labels") and r["weights_labels"] == "2" for r in by_order["3"])
    assert all(r["runs_finished"] == "1" for r in by_order["3"])
    # The server's studies folder began with the images only; the session saved every case's final label.
    final = out / "sessions" / "first_every2" / "studies" / "labels" / "final"
    assert sorted(name[: -len(".nii.gz")] for name in os.listdir(final)) == cases

    # The summary's figures are those of the csv: the session's row of each table.
    summary = (out / "summary.md").read_text()
    overall, by_third = ([c.strip() for c in line.strip("|").split("|")]
                         for line in summary.splitlines() if line.startswith("| first_every2 |"))
    clicks = [int(r["clicks"]) for r in rows]
    assert overall[1:4] == [str(CASES), str(len(rows)), f"{np.mean(clicks):.2f}"]
    assert overall[5] == f"{np.mean([float(r['dice']) for r in rows]):.3f}"
    assert overall[7:] == [str(len(by_order["3"])), "1"]
    assert by_third[3] == f"{np.mean([int(r['clicks']) for r in by_order['3']]):.2f}"
    assert by_third[6] == f"{np.mean([float(r['dice_per_click'].split()[0]) for r in by_order['3']]):.3f}"
    for r in rows:  # the Dice after each click, the last being the Dice reached
        curve = [float(d) for d in r["dice_per_click"].split()]
        assert len(curve) == int(r["clicks"]) and curve[-1] == pytest.approx(float(r["dice"]), abs=1e-4)
    assert (out / "session.png").stat().st_size > 0


def test_a_line_cut_short_by_a_kill_is_left_out_of_the_record(tmp_path):
    from simulate_session import COLUMNS, read_rows

    row = {"session": "first_every2", "strategy": "first", "train_every": "2", "order": "1", "case": "a", "lesion": "1",
           "kind": "", "clicks": "2", "reached": "0", "dice": "0.5", "dice_per_click": "0.4 0.5", "model_seconds": "0.2",
           "seconds": "1.0", "weights": "initial (untrained)", "weights_labels": "0", "runs_finished": "0"}
    path = tmp_path / "session.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerow(row)
        f.write("first_every2,first,2,2,b,1,,3,0,0.")  # the kill came mid-row
    rows = read_rows(str(path))
    assert len(rows) == 1 and rows[0]["case"] == "a" and rows[0]["clicks"] == 2 and rows[0]["dice"] == 0.5
