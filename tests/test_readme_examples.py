"""The README's REST examples and its own-scans commands run, as written, against a real server (only addresses,
paths and sizes are swapped in)."""

import os
import re
import shlex
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import torch
from monailabel.client import MONAILabelClient

from conftest import ROOT, copy_app, start_server, stop_server, wait_for_training

README_URL = "http://127.0.0.1:8000"


def readme_blocks(language, section="### REST"):
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    rest = text[text.index(section):]
    return re.findall(rf"```{language}\n(.*?)```", rest[: rest.index("\n## ", 1)], re.S)


def run_curl_example(marker, url, tmp_path):
    (block,) = [b for b in readme_blocks("bash") if "curl" in b and marker in b]
    subprocess.run(["bash", "-euc", block.replace(README_URL, url)], cwd=tmp_path, check=True, timeout=300)


def demo_lesion_dice(mask_path, studies):
    """The Dice of a returned mask against demo_ct_01's expert label, after checking it lies on the image's grid."""
    mask, image = nib.load(mask_path), nib.load(os.path.join(studies, "demo_ct_01.nii.gz"))
    assert mask.shape == image.shape and np.allclose(mask.affine, image.affine, atol=1e-4)
    truth = nib.load(os.path.join(studies, "labels", "final", "demo_ct_01.nii.gz")).get_fdata() > 0
    predicted = mask.get_fdata() > 0
    return 2 * (predicted & truth).sum() / (predicted.sum() + truth.sum())


def test_the_curl_example_segments_the_demo_lesion_on_a_fresh_start(demo_server, tmp_path):
    """A new user's first minutes: the server as started with no options, the README's click on demo_ct_01."""
    url, studies, _ = demo_server
    run_curl_example('"foreground"', url, tmp_path)
    dice = demo_lesion_dice(tmp_path / "mask.nii.gz", studies)
    assert dice >= 0.7, dice


def test_the_box_example_segments_the_demo_lesion_with_the_learned_box_prompt(demo_server, tmp_path):
    """The README's box around the same lesion, alone: the demo weights learned the box prompt."""
    url, studies, _ = demo_server
    run_curl_example('"roi"', url, tmp_path)
    dice = demo_lesion_dice(tmp_path / "box_mask.nii.gz", studies)
    assert dice >= 0.7, dice


def test_the_python_example_runs_and_reuses_the_encoding(demo_server, tmp_path):
    url, _, _ = demo_server
    (block,) = readme_blocks("python")
    out = subprocess.run([sys.executable, "-c", block.replace(README_URL, url)], cwd=tmp_path, check=True,
                         capture_output=True, text=True, timeout=300).stdout
    first, refined, boxed = out.splitlines()
    assert "encoder runs:" in first and "cache hits: 1" in refined, out
    assert "box prompt: learned" in boxed, out  # the demo weights learned the box prompt
    for line in (first, refined, boxed):  # the client's own copies, in the default temporary folder: still there
        path = line.split()[0]
        assert nib.load(path).shape == (128, 128, 96), line


def test_the_own_scans_example_imports_a_collection_and_trains_it_through_the_server(trained_tiny, tmp_path):
    """A newcomer's two steps as the README writes them: per-case folders imported into a studies folder, then
    served with the README's conf and trained through REST until a model is published. Swapped in: the paths, the
    port, the steps, and the serve.sh line's server (the tests' own start, with its conf, on a copy of the app
    holding the demo weights the first start makes, so that what it publishes stays in the copy)."""
    from lib.phantoms import random_studies, write_studies
    from lib.training.demo import DEMO_FILE

    phantoms, collection, studies = tmp_path / "phantoms", tmp_path / "sarcomas", tmp_path / "mine"
    cases = random_studies(3)
    names = [case.name for case in cases]
    write_studies(str(phantoms), studies=cases)
    for name in names:  # the IBSI layout: {case}/CT_image.nii.gz and {case}/CT_mask.nii.gz
        os.makedirs(collection / name)
        shutil.copy(phantoms / f"{name}.nii.gz", collection / name / "CT_image.nii.gz")
        shutil.copy(phantoms / "labels" / "final" / f"{name}.nii.gz", collection / name / "CT_mask.nii.gz")
    importing, serving = readme_blocks("bash", "## Your own labelled scans")
    assert "/data/sarcomas" in importing and "studies/mine" in importing
    subprocess.run(["bash", "-euc", importing.replace("/data/sarcomas", str(collection)).replace("studies/mine", str(studies))],
                   cwd=ROOT, check=True, timeout=300)
    assert sorted(p.name for p in (studies / "labels" / "final").iterdir()) == sorted(f"{n}.nii.gz" for n in names)

    serve_line, *rest = serving.strip().splitlines()
    assert serve_line.startswith("SAM3D_STUDIES=studies/mine PORT=8000 bash scripts/serve.sh") and serve_line.endswith("&")
    conf = shlex.split(serve_line.split("serve.sh", 1)[1].rstrip("& "))
    app = copy_app(str(tmp_path))
    os.makedirs(os.path.join(app, "model"))
    shutil.copy(trained_tiny, os.path.join(app, "model", DEMO_FILE))
    proc, url = start_server(app, str(studies), conf, str(tmp_path / "server.log"))
    try:
        commands = "\n".join(rest)
        assert '"steps": 1500' in commands
        subprocess.run(["bash", "-euc", commands.replace(README_URL, url).replace('"steps": 1500', '"steps": 5')],
                       check=True, timeout=300)
        client = MONAILabelClient(url, tmpdir=str(tmp_path))
        task = wait_for_training(client, seconds=300)
        assert task["status"] == "DONE", task
        stats = client.info()["train_stats"]["sam3d"]
        assert stats["steps"] == 5 and stats["train_images"] + stats["val_images"] == 3, stats  # all that was imported
        published = torch.load(os.path.join(app, "model", "sam3d.pt"), weights_only=True)["meta"]
        if "auto" in conf:  # the preset planned from the imported labels, recorded with the model and served
            served = client.info()["models"]["sam3d"]["preset"]
            assert served["name"].startswith("auto-") and "planned from 3 labelled images" in served["description"]
            assert list(published["preset_values"]["spacing"]) == served["spacing"]
    finally:
        stop_server(proc)
