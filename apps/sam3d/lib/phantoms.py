"""Generated CT-like phantoms with tumour-like lesions, in MONAI Label's local datastore layout.

The phantoms are drawn in world millimetres and sampled through each volume's affine, so the geometry is the same
whatever the grid. ``STUDIES`` are the three demo studies (one isotropic and axis-aligned, one anisotropic with
permuted and flipped axes, one oblique); ``random_studies`` draws more of the same kind (training data, never the
demo studies themselves). ``hard_studies`` draws studies whose one lesion leaves a first click real errors to
correct (lobulated, ring-enhancing, low-contrast, touching a vessel of its own intensity) on thick-slice, oblique,
permuted grids; ``large_studies`` draws studies of one lesion 1.5-3 times the model's crop (a tumour one crop cannot
hold) on such grids; ``write_studies`` records the kinds of both in ``lesion_kinds.json`` beside the images.
"""

import json
import os
import zlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

import nibabel as nib
import numpy as np
from tqdm import tqdm


Vector = Tuple[float, float, float]
KINDS_FILE = "lesion_kinds.json"


@dataclass(frozen=True)
class Lesion:
    """A tumour of a hard study: the union of ``lobes`` (axis-aligned ellipsoids in RAS mm), all of it labelled."""

    kind: str  # "lobulated", "ring", "low_contrast" or "touching"
    lobes: Tuple[Tuple[Vector, Vector], ...]  # (centre, radii) in mm
    hu: float  # the tumour's intensity (a ring lesion's rim)
    core: Optional[Tuple[Vector, float]] = None  # ring: radii (mm) and HU of a necrotic core about the first lobe's centre
    vessel: Optional[Tuple[Vector, Vector, float]] = None  # touching: a tube (point on its axis, direction, radius mm)
    # of the tumour's intensity, in contact with it, not labelled

    def paint(self, xyz: np.ndarray, image: np.ndarray, label: np.ndarray) -> None:
        """Draw it into ``image`` (HU) and ``label`` (uint8), both (i, j, k); ``xyz`` (i, j, k, 3) RAS mm."""
        tumour = np.logical_or.reduce([inside_ellipsoid(xyz, centre, radii) for centre, radii in self.lobes])
        if self.vessel is not None:
            image[inside_tube(xyz, *self.vessel)] = self.hu
        image[tumour] = self.hu
        if self.core is not None:
            radii, hu = self.core
            image[inside_ellipsoid(xyz, self.lobes[0][0], radii)] = hu
        label[tumour] = 1


@dataclass(frozen=True)
class Study:
    name: str
    shape: Tuple[int, int, int]
    affine: np.ndarray  # voxel (i, j, k) -> RAS millimetres
    # Demo and random studies: (centre, radii (mm), HU) ellipsoids; hard and large studies: one Lesion.
    lesions: List[Union[Tuple[Vector, Vector, float], Lesion]]
    host: Optional[Tuple[Vector, Vector]] = None  # the host organ's (centre, radii) in mm; None: HOST_CENTRE, HOST_RADII
    body: Vector = (150.0, 110.0, 400.0)  # the body's radii in mm (fat; soft tissue 15 mm inside it in x and y)


# The organ that hosts the lesions (centre and radii in RAS mm, HU) and the image noise (standard deviation, HU).
HOST_CENTRE, HOST_RADII, HOST_HU = (15.0, 5.0, 0.0), (55.0, 45.0, 50.0), 60.0
NOISE_HU = 12.0


def rotation_z(degrees: float) -> np.ndarray:
    t = np.deg2rad(degrees)
    return np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])


def rotation(axis: int, degrees: float) -> np.ndarray:
    """Rotation about RAS axis 0 (x), 1 (y) or 2 (z)."""
    matrix = np.eye(3)
    others = [a for a in range(3) if a != axis]
    matrix[np.ix_(others, others)] = rotation_z(degrees)[:2, :2]
    return matrix


def make_affine(
    direction: np.ndarray, spacing: Tuple[float, float, float], shape: Tuple[int, int, int], centre: Optional[Vector] = None
) -> np.ndarray:
    """Affine whose volume is centred on ``centre`` (RAS mm), by default on the origin."""
    affine = np.eye(4)
    affine[:3, :3] = direction @ np.diag(spacing)
    affine[:3, 3] = -affine[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    if centre is not None:  # added only when given: the demo affines keep their exact values (signed zeros too)
        affine[:3, 3] += centre
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


HARD_KINDS = ("lobulated", "ring", "low_contrast", "touching")
LARGE_KINDS = ("large_ellipsoid", "large_lobulated")


def hard_lesion(kind: str, centre: np.ndarray, rng: np.random.Generator) -> Lesion:
    """A lesion of ``kind`` about ``centre`` (RAS mm), at most about 13 mm from it (tiny crops are 32 mm)."""
    bright = float(rng.uniform(110, 140))
    if kind == "lobulated":  # a core with 3 lobes whose centres lie inside it: one connected, bumpy tumour
        radii = rng.uniform(5, 8, 3)
        lobes = [(tuple(centre.tolist()), tuple(radii.tolist()))]
        for _ in range(3):
            direction = rng.normal(size=3)
            offset = direction / np.linalg.norm(direction) * rng.uniform(0.6, 0.9) * radii.min()
            lobes.append((tuple((centre + offset).tolist()), tuple(rng.uniform(3.5, 6, 3).tolist())))
        return Lesion(kind, tuple(lobes), float(rng.choice([bright, rng.uniform(10, 30)])))
    if kind == "ring":  # enhancing rim, necrotic core darker than the host organ; the core is tumour too
        radii = rng.uniform(7, 12, 3)
        core = tuple((radii - rng.uniform(2, 3.5)).tolist())
        return Lesion(kind, ((tuple(centre.tolist()), tuple(radii.tolist())),), bright, core=(core, float(rng.uniform(10, 25))))
    if kind == "low_contrast":  # a few HU above the host, under NOISE_HU of noise
        radii = tuple(rng.uniform(6, 11, 3).tolist())
        return Lesion(kind, ((tuple(centre.tolist()), radii),), HOST_HU + float(rng.uniform(8, 15)))
    if kind == "touching":  # a vessel of the same HU runs past it, in contact: a first click leaks into it
        radii = rng.uniform(5, 9, 3)
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        side = np.cross(direction, rng.normal(size=3))
        side /= np.linalg.norm(side)
        extent = 1 / np.sqrt(((side / radii) ** 2).sum())  # the lesion's reach along ``side``
        radius = float(rng.uniform(2.5, 4))
        # The tube's axis passes half a tube radius outside the lesion's surface: the two overlap there.
        axis_point = centre + side * (extent + 0.5 * radius)
        vessel = (tuple(axis_point.tolist()), tuple(direction.tolist()), radius)
        return Lesion(kind, ((tuple(centre.tolist()), tuple(radii.tolist())),), bright, vessel=vessel)
    raise ValueError(f"unknown lesion kind {kind!r}; choose one of {HARD_KINDS}")


def hard_studies(count: int, seed: int = 2000) -> List[Study]:
    """Studies of one hard lesion each, kinds in turn (HARD_KINDS), on thick-slice grids (1.5-5 mm slices along the
    body axis) with permuted, flipped axes, turned about no axis, one, or three in turn. Named ``hard<seed>_<index>``
    so that sets of other seeds never share a name (nor its noise)."""
    rng = np.random.default_rng(seed)
    studies = []
    for index in range(count):
        kind = HARD_KINDS[index % len(HARD_KINDS)]
        centre = np.asarray(HOST_CENTRE) + rng.uniform(-25, 25, 3) * [1, 1, 0.6]
        lesion = hard_lesion(kind, centre, rng)
        world_axis, direction, spacing = oblique_axes(rng, index)
        thick = int(np.flatnonzero(world_axis == 2)[0])
        field_of_view = np.where(np.arange(3) == thick, 90.0, 110.0)  # mm
        shape = tuple(int(n) for n in np.ceil(field_of_view / spacing))
        # Off-centre, so that the lesion is not always in the middle of the volume.
        volume_centre = tuple((centre + rng.uniform(-12, 12, 3)).tolist())
        affine = make_affine(direction, tuple(spacing.tolist()), shape, volume_centre)
        studies.append(Study(f"hard{seed}_{index:03d}", shape, affine, [lesion]))
    return studies


def oblique_axes(rng: np.random.Generator, index: int, spacing_scale: float = 1.0) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thick-slice axes (1.5-5 mm slices along the body axis, 0.7-1 mm in plane, both times ``spacing_scale``),
    permuted and flipped, turned about no axis, one, or three (by ``index``): (world_axis: voxel axis a runs along RAS
    axis world_axis[a], (3, 3) direction, (3,) spacing in mm)."""
    world_axis = rng.permutation(3)
    permuted = np.zeros((3, 3))
    permuted[world_axis, range(3)] = rng.choice([-1.0, 1.0], 3)
    turns = [np.eye(3), rotation_z(rng.uniform(10, 30))] + [
        rotation(2, rng.uniform(10, 30)) @ rotation(1, rng.uniform(10, 30)) @ rotation(0, rng.uniform(10, 30))
    ]
    direction = turns[index % 3] @ permuted
    spacing = rng.uniform(0.7, 1.0, 3)
    spacing[int(np.flatnonzero(world_axis == 2)[0])] = rng.choice([1.5, 2.5, 3.0, 5.0])
    return world_axis, direction, spacing * spacing_scale


def oblique_grid(
    rng: np.random.Generator, index: int, field_of_view: np.ndarray, centre: np.ndarray, spacing_scale: float = 1.0
) -> Tuple[Tuple[int, int, int], np.ndarray]:
    """A grid of ``oblique_axes`` covering ``field_of_view`` (mm per RAS axis) about ``centre``: (shape, affine)."""
    world_axis, direction, spacing = oblique_axes(rng, index, spacing_scale)
    shape = tuple(int(n) for n in np.ceil(np.asarray(field_of_view)[world_axis] / spacing))
    return shape, make_affine(direction, tuple(spacing.tolist()), shape, tuple(centre.tolist()))


def large_studies(count: int, seed: int = 4000, crop_mm: float = 32.0, extent: Tuple[float, float] = (1.5, 3.0)) -> List[Study]:
    """Studies of one lesion whose largest diameter is ``extent`` (drawn between its two values) times ``crop_mm``
    (the model's crop: 32 mm for the tiny configuration, 128 mm for the paper's), in a host organ and a body grown
    to hold it, on grids like ``hard_studies``' (in-plane and slice spacing scaled by crop_mm / 32). Kinds in turn
    (LARGE_KINDS): an ellipsoid, or one with three lobes on its surface; bright or darker than the host. Named
    ``large<seed>_<index>``."""
    rng = np.random.default_rng(seed)
    studies = []
    for index in range(count):
        kind = LARGE_KINDS[index % len(LARGE_KINDS)]
        radius = rng.uniform(*extent) * crop_mm / 2
        radii = radius * rng.permutation([1.0, rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0)])
        centre = rng.uniform(-10, 10, 3)
        lobes = [(tuple(centre.tolist()), tuple(radii.tolist()))]
        if kind == "large_lobulated":  # lobes about half-way out, reaching at most about 0.95 of the radii
            for _ in range(3):
                direction = rng.normal(size=3)
                offset = direction / np.linalg.norm(direction) * 0.5 * radii.min()
                lobes.append((tuple((centre + offset).tolist()), tuple((radii * rng.uniform(0.4, 0.45)).tolist())))
        hu = float(rng.choice([rng.uniform(110, 140), rng.uniform(10, 30)]))
        host = (tuple((centre + rng.uniform(-5, 5, 3)).tolist()), tuple((radii + rng.uniform(15, 25, 3)).tolist()))
        body = tuple(np.maximum(np.asarray(host[1]) + 40.0, [150.0, 110.0, 400.0]).tolist())
        field_of_view = 2 * radii + 1.2 * crop_mm
        shape, affine = oblique_grid(rng, index, field_of_view, centre + rng.uniform(-5, 5, 3), crop_mm / 32)
        studies.append(Study(f"large{seed}_{index:03d}", shape, affine, [Lesion(kind, tuple(lobes), hu)], host, body))
    return studies


def lesion_kinds(studies: List[Study]) -> Dict[str, str]:
    """{study name: its lesion's kind} for the hard studies (one lesion each) among ``studies``."""
    return {s.name: s.lesions[0].kind for s in studies if len(s.lesions) == 1 and isinstance(s.lesions[0], Lesion)}


def read_lesion_kinds(folder: str) -> Dict[str, str]:
    """The kinds ``write_studies`` recorded in ``folder``; empty where it recorded none."""
    path = os.path.join(folder, KINDS_FILE)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def world_grid(study: Study) -> np.ndarray:
    """RAS millimetres of every voxel centre, (i, j, k, 3)."""
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in study.shape], indexing="ij"), axis=-1).astype(np.float64)
    return ijk @ study.affine[:3, :3].T + study.affine[:3, 3]


def inside_ellipsoid(xyz: np.ndarray, centre, radii) -> np.ndarray:
    return (((xyz - np.asarray(centre)) / np.asarray(radii)) ** 2).sum(-1) <= 1.0


def inside_tube(xyz: np.ndarray, point, direction, radius: float, half_length: float = 60.0) -> np.ndarray:
    """Inside a cylinder along ``direction`` (unit) through ``point``, ``half_length`` mm each way."""
    offset = xyz - np.asarray(point)
    along = np.clip(offset @ np.asarray(direction), -half_length, half_length)
    return ((offset - along[..., None] * np.asarray(direction)) ** 2).sum(-1) <= radius**2


def render(study: Study, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """-> (i, j, k) int16 HU image and uint8 tumour label."""
    xyz = world_grid(study)
    image = np.full(study.shape, -1000.0)  # air
    image[inside_ellipsoid(xyz, (0, 0, 0), study.body)] = -100.0  # subcutaneous fat
    image[inside_ellipsoid(xyz, (0, 0, 0), np.asarray(study.body) - [15.0, 15.0, 0.0])] = 40.0  # soft tissue
    host_centre, host_radii = study.host or (HOST_CENTRE, HOST_RADII)
    image[inside_ellipsoid(xyz, host_centre, host_radii)] = HOST_HU  # the organ that hosts the lesions
    image[inside_ellipsoid(xyz, (-60, -40, 0), (12, 12, 400))] = 500.0  # a bone-like rod
    label = np.zeros(study.shape, dtype=np.uint8)
    for lesion in study.lesions:
        if isinstance(lesion, Lesion):
            lesion.paint(xyz, image, label)
        else:
            centre, radii, hu = lesion
            Lesion("ellipsoid", ((centre, radii),), hu).paint(xyz, image, label)
    image += rng.normal(0.0, NOISE_HU, study.shape)
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
    kinds = lesion_kinds(studies)
    if kinds:
        kinds = {**read_lesion_kinds(out), **kinds}  # what an earlier call recorded in the folder stays
        with open(os.path.join(out, KINDS_FILE), "w") as f:
            json.dump(kinds, f, indent=1, sort_keys=True)
    return written
