"""Generated CT-like phantoms with tumour-like lesions, in MONAI Label's local datastore layout.

The phantoms are drawn in world millimetres and sampled through each volume's affine, so the geometry is the same
whatever the grid. ``STUDIES`` are the three demo studies (one isotropic and axis-aligned, one anisotropic with
permuted and flipped axes, one oblique); ``random_studies`` draws more of the same kind (training data, never the
demo studies themselves).
"""

import os
import zlib
from dataclasses import dataclass
from typing import List, Tuple

import nibabel as nib
import numpy as np
from tqdm import tqdm


@dataclass(frozen=True)
class Study:
    name: str
    shape: Tuple[int, int, int]
    affine: np.ndarray  # voxel (i, j, k) -> RAS millimetres
    lesions: List[Tuple[Tuple[float, float, float], Tuple[float, float, float], float]]  # centre, radii (mm), HU


def rotation_z(degrees: float) -> np.ndarray:
    t = np.deg2rad(degrees)
    return np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])


def make_affine(direction: np.ndarray, spacing: Tuple[float, float, float], shape: Tuple[int, int, int]) -> np.ndarray:
    """Affine whose volume is centred on the RAS origin."""
    affine = np.eye(4)
    affine[:3, :3] = direction @ np.diag(spacing)
    affine[:3, 3] = -affine[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    return affine


STUDIES = [
    Study(
        "demo_ct_01",
        (128, 128, 96),
        make_affine(np.eye(3), (1.0, 1.0, 1.0), (128, 128, 96)),
        [((20.0, 10.0, 0.0), (11.0, 9.0, 10.0), 125.0)],
    ),
    # Anisotropic (2.5 mm slices) and stored with permuted, flipped axes: i runs S->I, j P->A, k R->L.
    Study(
        "demo_ct_02_aniso",
        (40, 140, 150),
        make_affine(np.array([[0, 0, -1], [0, -1, 0], [-1, 0, 0]], float), (2.5, 0.8, 0.8), (40, 140, 150)),
        [((-15.0, 5.0, 5.0), (9.0, 9.0, 12.0), 20.0), ((35.0, -20.0, -10.0), (6.0, 6.0, 6.0), 130.0)],
    ),
    # Oblique: rotated 15 degrees about the body axis.
    Study(
        "demo_ct_03_oblique",
        (120, 120, 80),
        make_affine(rotation_z(15.0), (0.9, 0.9, 1.2), (120, 120, 80)),
        [((-25.0, 15.0, 5.0), (10.0, 8.0, 9.0), 120.0)],
    ),
]


def random_studies(count: int, seed: int = 1000) -> List[Study]:
    """More studies of the same kind, with lesions of random place, size and contrast (e.g. for training)."""
    rng = np.random.default_rng(seed)
    directions = [np.eye(3), np.array([[0, 0, -1], [0, -1, 0], [-1, 0, 0]], float), rotation_z(15.0)]
    studies = []
    for index in range(count):
        shape = (96, 96, 64)
        spacing = tuple(rng.choice([0.8, 1.0, 1.2], size=2).tolist()) + (float(rng.choice([1.0, 1.5, 2.0])),)
        lesions = []
        for _ in range(int(rng.integers(1, 3))):
            centre = tuple((np.array([15.0, 5.0, 0.0]) + rng.uniform(-30, 30, 3) * [1, 1, 0.6]).tolist())
            radii = tuple(rng.uniform(5, 11, 3).tolist())
            lesions.append((centre, radii, float(rng.choice([rng.uniform(10, 30), rng.uniform(110, 140)]))))
        direction = directions[index % len(directions)]
        studies.append(Study(f"random_{index:03d}", shape, make_affine(direction, spacing, shape), lesions))
    return studies


def world_grid(study: Study) -> np.ndarray:
    """RAS millimetres of every voxel centre, (i, j, k, 3)."""
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in study.shape], indexing="ij"), axis=-1).astype(np.float64)
    return ijk @ study.affine[:3, :3].T + study.affine[:3, 3]


def inside_ellipsoid(xyz: np.ndarray, centre, radii) -> np.ndarray:
    return (((xyz - np.asarray(centre)) / np.asarray(radii)) ** 2).sum(-1) <= 1.0


def render(study: Study, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    xyz = world_grid(study)
    image = np.full(study.shape, -1000.0)  # air
    image[inside_ellipsoid(xyz, (0, 0, 0), (150, 110, 400))] = -100.0  # subcutaneous fat
    image[inside_ellipsoid(xyz, (0, 0, 0), (135, 95, 400))] = 40.0  # soft tissue
    image[inside_ellipsoid(xyz, (15, 5, 0), (55, 45, 50))] = 60.0  # the organ that hosts the lesions
    image[inside_ellipsoid(xyz, (-60, -40, 0), (12, 12, 400))] = 500.0  # a bone-like rod
    label = np.zeros(study.shape, dtype=np.uint8)
    for centre, radii, hu in study.lesions:
        lesion = inside_ellipsoid(xyz, centre, radii)
        image[lesion] = hu
        label[lesion] = 1
    image += rng.normal(0.0, 12.0, study.shape)
    return image.astype(np.int16), label


def write_studies(out: str, force: bool = False, studies: List[Study] = STUDIES) -> List[str]:
    os.makedirs(os.path.join(out, "labels", "final"), exist_ok=True)
    written = []
    for study in tqdm(studies, desc="demo studies"):
        image_path = os.path.join(out, f"{study.name}.nii.gz")
        label_path = os.path.join(out, "labels", "final", f"{study.name}.nii.gz")
        if not force and os.path.exists(image_path) and os.path.exists(label_path):
            continue
        image, label = render(study, np.random.default_rng(zlib.crc32(study.name.encode())))
        nib.save(nib.Nifti1Image(image, study.affine), image_path)
        nib.save(nib.Nifti1Image(label, study.affine), label_path)
        written.append(image_path)
    return written
