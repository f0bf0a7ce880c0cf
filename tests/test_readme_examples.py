"""The README's REST examples run, as written, against a real server (only its address is swapped in)."""

import os
import re
import subprocess
import sys

import nibabel as nib
import numpy as np

from conftest import ROOT

README_URL = "http://127.0.0.1:8000"


def readme_blocks(language):
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    rest = text[text.index("### REST"):]
    return re.findall(rf"```{language}\n(.*?)```", rest[: rest.index("\n## ")], re.S)


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
