"""The command-line scripts run end to end, so that they cannot rot."""

import json
import math
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


def test_training_benchmark_runs_end_to_end_on_the_tiny_configuration(tmp_path):
    figures = tmp_path / "training.json"
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "benchmark_training.py"), "--tiny", "--device", "cpu",
         "--repeats", "1", "--json", str(figures)],
        capture_output=True, text=True, timeout=900, check=True,
    ).stdout
    assert "skipping the side-by-side comparison" in out
    rows = {cells[1].strip(): cells[2].strip() for cells in (line.split("|") for line in out.splitlines()) if len(cells) > 2}
    for variant in ("ours float32", "ours float32 + checkpointing", "ours bfloat16 + checkpointing"):
        assert math.isfinite(float(rows[variant])) and float(rows[variant]) > 0, variant
    variants = json.loads(figures.read_text())["variants"]
    # Checkpointing recomputes the same activations: the same weights, crop and click give the same loss.
    assert math.isclose(variants["ours float32 + checkpointing"]["loss"], variants["ours float32"]["loss"], rel_tol=1e-5)


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


def test_evaluate_reports_every_tumour_of_an_msd_dataset(tmp_path, demo_studies):
    """An MSD-layout copy of the demo studies whose labels also hold an organ (1) beside the tumours (2):
    the kits preset evaluates the tumours only, one row per lesion, with a table and a plot."""
    from make_demo_studies import STUDIES

    for folder in ("imagesTr", "labelsTr"):
        (tmp_path / "msd" / folder).mkdir(parents=True)
    lesions = 0
    for study in STUDIES:
        image = nib.load(os.path.join(demo_studies, f"{study.name}.nii.gz"))
        label = nib.load(os.path.join(demo_studies, "labels", "final", f"{study.name}.nii.gz"))
        tumour = np.asarray(label.dataobj) > 0
        values = np.where(tumour, 2, 0).astype(np.uint8)
        values[:8, :8, :8] = 1  # an "organ" far from every lesion
        lesions += len(study.lesions)
        nib.save(image, str(tmp_path / "msd" / "imagesTr" / f"{study.name}.nii.gz"))
        nib.save(nib.Nifti1Image(values, label.affine), str(tmp_path / "msd" / "labelsTr" / f"{study.name}.nii.gz"))

    out = tmp_path / "results"
    table = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "evaluate.py"), str(tmp_path / "msd"), "--backbone", "tiny",
         "--preset", "kits", "--clicks", "1", "3", "--out", str(out)],
        capture_output=True, text=True, timeout=900, check=True,
    ).stdout
    with open(out / "results.csv") as f:
        rows = f.read().splitlines()
    assert rows[0] == "case,lesion,dice_1,nsd_1,dice_3,nsd_3" and len(rows) - 1 == lesions
    scores = np.array([[float(v) for v in row.split(",")[2:]] for row in rows[1:]])
    assert ((scores >= 0) & (scores <= 1)).all()
    assert f"| mean (per lesion) | {lesions} |" in table and (out / "results.png").stat().st_size > 0
