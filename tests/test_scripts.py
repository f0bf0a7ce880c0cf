"""The command-line scripts run end to end, so that they cannot rot."""

import os
import subprocess
import sys

import nibabel as nib
import numpy as np

from conftest import ROOT


def test_benchmark_runs_end_to_end_on_the_tiny_configuration(tmp_path):
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "benchmark.py"), "--tiny", "--repeats", "1", "--bfloat16",
         "--rest", "--reference", str(tmp_path / "absent")],
        capture_output=True, text=True, timeout=900, check=True,
    ).stdout
    assert "no reference checkout" in out
    for row in ("first click (s)", "refinement click, cached (s)", "first click, bfloat16 (s)", "Dice(bf16 mask",
                "share of the floor", "peak RSS", "REST first click, end to end", "REST refinement click, model",
                "server overhead share"):
        assert row in out, row


def test_demo_studies_are_deterministic_and_hold_lesions(tmp_path, demo_studies):
    from make_demo_studies import STUDIES, write_studies

    write_studies(str(tmp_path))
    for study in STUDIES:
        for sub in ("", os.path.join("labels", "final")):
            a = nib.load(os.path.join(demo_studies, sub, f"{study.name}.nii.gz"))
            b = nib.load(os.path.join(tmp_path, sub, f"{study.name}.nii.gz"))
            assert np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
            assert np.allclose(a.affine, b.affine)
        label = np.asarray(nib.load(os.path.join(tmp_path, "labels", "final", f"{study.name}.nii.gz")).dataobj)
        assert label.sum() > 500
    zooms = [nib.load(os.path.join(tmp_path, f"{s.name}.nii.gz")).header.get_zooms() for s in STUDIES]
    assert any(max(z) / min(z) > 2 for z in zooms)  # anisotropic
    axcodes = [nib.aff2axcodes(s.affine) for s in STUDIES]
    assert any(codes != ("R", "A", "S") for codes in axcodes)  # not all in the standard orientation
