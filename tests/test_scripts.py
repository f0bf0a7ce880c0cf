"""The command-line scripts run end to end, so that they cannot rot."""

import json
import math
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from conftest import ROOT


@pytest.mark.slow  # runs a script that trains or clicks every lesion
def test_benchmark_runs_end_to_end_on_the_tiny_configuration(tmp_path):
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "benchmark.py"), "clicks", "--tiny", "--repeats", "1", "--bfloat16",
         "--rest", "--reference", str(tmp_path / "absent")],
        capture_output=True, text=True, timeout=900, check=True,
    ).stdout
    assert "no reference checkout" in out
    for row in ("first click (s)", "refinement click, cached (s)", "first click, bfloat16 (s)", "Dice(bf16 mask",
                "share of the floor", "peak RSS", "REST first click, end to end", "REST refinement click, model",
                "server overhead share", "server resident memory"):
        assert row in out, row


@pytest.mark.slow  # runs a script that trains or clicks every lesion
def test_training_benchmark_runs_end_to_end_on_the_tiny_configuration(tmp_path):
    figures = tmp_path / "training.json"
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "benchmark.py"), "training", "--tiny", "--device", "cpu",
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


@pytest.mark.slow  # runs a script that trains or clicks every lesion
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
         "--preset", "kits", "--clicks", "2", "--out", str(out)],
        capture_output=True, text=True, timeout=900, check=True,
    ).stdout
    with open(out / "results.csv") as f:
        rows = f.read().splitlines()
    assert rows[0] == ("case,lesion,kind,dice_1,nsd_1,recall_1,click_1,boundary_1,dice_2,nsd_2,recall_2,click_2,boundary_2,"
                       "dice_auc,worst_drop,dsc_auc_challenge,nsd_auc_challenge")
    assert len(rows) - 1 == lesions
    header = rows[0].split(",")
    cells = [dict(zip(header, row.split(","))) for row in rows[1:]]
    scores = np.array([[float(c[k]) for k in header[3:] if not k.startswith("click_") and "challenge" not in k]
                       for c in cells])
    assert ((scores >= 0) & (scores <= 1)).all()
    # The challenge's AUCs: trapezoids over the click steps (two clicks: one unit of width), so within [0, 1] here.
    assert all(0 <= float(c["dsc_auc_challenge"]) <= 1 and 0 <= float(c["nsd_auc_challenge"]) <= 1 for c in cells)
    assert all(c["click_1"] == "foreground" and c["click_2"] in ("foreground", "background", "none") for c in cells)
    assert ("| case | lesions | Dice@1 | Dice@2 | NSD@1 | NSD@2 | recall@1 | Dice AUC | worst drop | DSC_AUC | NSD_AUC "
            "| background clicks | Dice change per background click |") in table  # no kinds: per case
    assert f"| all (mean per lesion) | {lesions} |" in table and (out / "results.png").stat().st_size > 0


def hard_rendered(count=4, seed=5):
    """Hard studies (one of each kind) with their (i, j, k) HU image and label, rendered as write_studies does."""
    import zlib

    from lib.phantoms import hard_studies, render

    return [(s, *render(s, np.random.default_rng(zlib.crc32(s.name.encode())))) for s in hard_studies(count, seed)]


def test_hard_studies_are_deterministic_per_seed(tmp_path):
    from lib.phantoms import hard_studies, read_lesion_kinds, write_studies

    first, again, other = hard_studies(4, seed=5), hard_studies(4, seed=5), hard_studies(4, seed=6)
    for a, b, c in zip(first, again, other):
        assert a.name == b.name != c.name and a.shape == b.shape and a.lesions == b.lesions != c.lesions
        assert np.array_equal(a.affine, b.affine)
    write_studies(str(tmp_path / "a"), studies=first)
    write_studies(str(tmp_path / "b"), studies=again)
    for study in first:
        for sub in ("", os.path.join("labels", "final")):
            a, b = (np.asarray(nib.load(str(tmp_path / d / sub / f"{study.name}.nii.gz")).dataobj) for d in "ab")
            assert np.array_equal(a, b)
    write_studies(str(tmp_path / "a"), studies=other)  # a second set in the same folder adds its kinds
    kinds = read_lesion_kinds(str(tmp_path / "a"))
    assert kinds == {s.name: k for s, k in zip(first + other, ["lobulated", "ring", "low_contrast", "touching"] * 2)}


def test_hard_studies_lie_on_thick_slice_permuted_and_oblique_grids():
    from lib.phantoms import hard_studies

    studies = hard_studies(6, seed=5)
    oblique_axes = []
    for study in studies:
        spacing = np.linalg.norm(study.affine[:3, :3], axis=0)
        direction = study.affine[:3, :3] / spacing
        thick = int(spacing.argmax())
        assert spacing[thick] >= 1.5 and spacing[thick] / np.delete(spacing, thick).max() >= 1.5
        assert abs(direction[2, thick]) > 0.8  # slices across the body axis (S), however the axes are stored
        # How many world axes no voxel axis runs along (cosine below 0.99): 0 straight, 2 turned about one, 3 oblique.
        oblique_axes.append(int((np.abs(direction).max(axis=1) < 0.99).sum()))
    assert oblique_axes[:3] == [0, 2, 3] and oblique_axes[3:] == [0, 2, 3]
    assert len({nib.aff2axcodes(s.affine) for s in studies}) >= 3  # permuted and flipped in several ways


def test_hard_lesions_are_what_their_kind_says():
    from scipy import ndimage

    from lib.phantoms import HOST_HU, inside_ellipsoid, world_grid

    rendered = {s.lesions[0].kind: (s, image, label.astype(bool)) for s, image, label in hard_rendered()}
    for study, image, label in rendered.values():
        assert label.dtype == bool and ndimage.label(label, np.ones((3, 3, 3)))[1] == 1  # one lesion, whole
        inner = (slice(1, -1),) * 3
        assert label[inner].sum() == label.sum()  # inside the field of view

    def shell(label):  # the voxels just outside the lesion
        return ndimage.binary_dilation(label, np.ones((3, 3, 3))) & ~label

    def like_lesion(study, image):  # voxels nearer the lesion's HU (a ring's rim) than the host's
        return np.abs(image - study.lesions[0].hu) < np.abs(image - HOST_HU)

    study, image, label = rendered["ring"]
    lesion = study.lesions[0]
    core = inside_ellipsoid(world_grid(study), lesion.lobes[0][0], lesion.core[0])
    assert core.sum() > 50 and (label & ~core).sum() > 50 and (label | ~core).all()  # the core is tumour too
    assert image[core].mean() < HOST_HU - 20 and image[label & ~core].mean() > HOST_HU + 40  # dark core, bright rim
    assert like_lesion(study, image)[shell(label)].mean() < 0.02  # nothing of its HU touches it

    study, image, label = rendered["low_contrast"]
    around = ndimage.binary_dilation(label, np.ones((3, 3, 3)), iterations=3) & ~label
    assert 3 < image[label].mean() - image[around].mean() < 20  # a few HU above its host, noise 12 HU

    study, image, label = rendered["touching"]
    contact = like_lesion(study, image) & shell(label)
    assert contact.sum() >= 10  # a structure of the lesion's HU touches it
    vessel = ndimage.label(like_lesion(study, image) & ~label, np.ones((3, 3, 3)))[0]
    touching = np.unique(vessel[contact])
    assert np.isin(vessel, touching[touching > 0]).sum() > label.sum() / 4  # and it is a sizeable one, not noise

    study, image, label = rendered["lobulated"]
    lobes = study.lesions[0].lobes
    body = inside_ellipsoid(world_grid(study), *lobes[0])
    assert len(lobes) > 1 and (label & ~body).sum() > label.sum() / 10  # lobes stick out of the body
    assert like_lesion(study, image)[shell(label)].mean() < 0.02


@pytest.mark.slow  # runs evaluate.py over four studies
@pytest.mark.parametrize("grid, first", [("model", "click"), ("image", "click"), ("model", "box")])
def test_evaluation_figures_follow_from_each_other_on_hard_studies(tmp_path, grid, first):
    """A tiny run on one study of each kind, scored on the model's grid or the images' own, click-first or
    box-first: per-lesion AUCs and worst drop from the per-step Dice, the table's per-kind and overall means from
    the rows."""
    import csv

    from lib.phantoms import hard_studies, write_studies
    from lib.training.evaluate import challenge_auc

    write_studies(str(tmp_path / "hard"), studies=hard_studies(4, seed=5))
    out = tmp_path / "results"
    subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "evaluate.py"), str(tmp_path / "hard"), "--backbone", "tiny",
         "--preset", "kits", "--label-value", "1", "--clicks", "3", "--grid", grid, "--first", first, "--out", str(out),
         *(["--pictures", "2"] if grid == "image" else [])],
        capture_output=True, text=True, timeout=900, check=True,
    )
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["kind"] for r in rows] == ["lobulated", "ring", "low_contrast", "touching"]
    if grid == "image":  # the first two cases' lesions, each after the first and the last click
        pictures = sorted(p.name for p in (out / "pictures").iterdir())
        assert pictures == sorted(f"{r['case']}_{r['lesion']}.png" for r in rows[:2])
        assert all((out / "pictures" / p).read_bytes().startswith(b"\x89PNG") for p in pictures)
    summary = (out / "results.md").read_text()
    assert f"on the {grid}'s grid" in summary and f"first prompt: {first}" in summary
    steps = (0, 1, 2, 3) if first == "box" else (1, 2, 3)
    for row in rows:
        dice = [float(row[f"dice_{n}"]) for n in steps]
        assert np.isclose(float(row["dice_auc"]), np.mean(dice[-3:]))
        assert np.isclose(float(row["worst_drop"]), max([0.0] + [a - b for a, b in zip(dice[:-1], dice[1:])]))
        # The challenge's DSC_AUC: trapezoids over the click steps only (the box's step before them does not count).
        assert np.isclose(float(row["dsc_auc_challenge"]), challenge_auc(dice, 3))
        assert np.isclose(float(row["dsc_auc_challenge"]), (dice[-3] + 2 * dice[-2] + dice[-1]) / 2)
        assert row[f"click_{steps[0]}"] == ("box" if first == "box" else "foreground")
        assert {row[f"click_{n}"] for n in steps[1:]} <= {"foreground", "background", "none"}
    table = {cells[0]: cells[1:] for cells in ([c.strip() for c in line.split("|")[1:-1]]
                                              for line in summary.splitlines() if line.startswith("| "))}
    names = [("box" if n == 0 else str(n)) for n in steps]
    assert table["kind"] == ["lesions", *[f"Dice@{n}" for n in names], *[f"NSD@{n}" for n in names], f"recall@{names[0]}",
                             "Dice AUC", "worst drop", "DSC_AUC", "NSD_AUC", "background clicks",
                             "Dice change per background click"]
    columns = [f"dice_{n}" for n in steps] + [f"nsd_{n}" for n in steps] + [f"recall_{steps[0]}", "dice_auc",
                                                                          "worst_drop", "dsc_auc_challenge", "nsd_auc_challenge"]
    for name, chosen in [(r["kind"], [r]) for r in rows] + [("all (mean per lesion)", rows)]:
        expected = [str(len(chosen))] + [f"{np.mean([float(r[c]) for r in chosen]):.3f}" for c in columns]
        changes = [float(r[f"dice_{n}"]) - float(r[f"dice_{n - 1}"]) for r in chosen for n in steps[1:]
                   if r[f"click_{n}"] == "background"]
        expected += [str(len(changes)), f"{np.mean(changes):+.3f}" if changes else "-"]
        assert table[name] == expected, name
    # The same clicks apart by the Dice before them: on masks under 0.8 and on the others.
    for name, before in (("under", lambda dice: dice < 0.8), ("at or above", lambda dice: dice >= 0.8)):
        changes = [float(r[f"dice_{n}"]) - float(r[f"dice_{n - 1}"]) for r in rows for n in steps[1:]
                   if r[f"click_{n}"] == "background" and before(float(r[f"dice_{n - 1}"]))]
        assert f"on masks {name} Dice 0.8: " + (f"{np.mean(changes):+.3f} ({len(changes)})" if changes else "none") in summary


def label_centre_mm(path):
    image = nib.load(path)
    voxels = np.argwhere(np.asarray(image.dataobj) > 0)
    return nib.affines.apply_affine(image.affine, voxels).mean(axis=0), len(voxels)


def test_reframed_studies_keep_each_lesion_where_it_was(tmp_path, demo_studies):
    """Padded in-plane with air, or cut to the lesion: the lesion keeps its voxels and its place in the scanner."""
    from make_demo_studies import STUDIES

    script = os.path.join(ROOT, "scripts", "reframe_studies.py")
    for option, value in (("--pad", "0.5"), ("--margin-mm", "5")):
        out = tmp_path / option
        subprocess.run([sys.executable, script, demo_studies, str(out), option, value], check=True, timeout=300)
        for study in STUDIES:
            name = f"{study.name}.nii.gz"
            before, after = nib.load(os.path.join(demo_studies, name)), nib.load(out / name)
            centre, count = label_centre_mm(os.path.join(demo_studies, "labels", "final", name))
            moved, kept = label_centre_mm(out / "labels" / "final" / name)
            assert kept == count and np.allclose(moved, centre, atol=1e-3), (option, study.name)
            shape, zooms = np.array(before.shape), np.array(before.header.get_zooms())
            grown = np.array(after.shape) - shape
            if option == "--pad":
                thickest = int(np.argmax(zooms))
                assert all(grown[a] == (0 if a == thickest else 2 * round(shape[a] * 0.5)) for a in range(3))
                assert np.asarray(after.dataobj)[0, 0, 0] == np.asarray(before.dataobj).min()
            else:
                assert (grown <= 0).all() and grown.sum() < 0
