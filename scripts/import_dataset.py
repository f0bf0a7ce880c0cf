"""Import a labelled collection into a MONAI Label studies folder (images at the top, labels in labels/final/).

    # MSD (imagesTr/, labelsTr/, dataset.json); a 4D multi-modal image (BraTS) gives its --channel (default 0)
    .venv/bin/python scripts/import_dataset.py /data/Task07_Pancreas --out studies/pancreas
    .venv/bin/python scripts/import_dataset.py /data/Task01_BrainTumour --channel 2 --label-value 3 --out studies/brats
    # nnU-Net v2 (imagesTr/CASE_0000.nii.gz, labelsTr/CASE.nii.gz, dataset.json)
    .venv/bin/python scripts/import_dataset.py /data/Dataset220_KiTS2023 --label-name tumor --out studies/kits
    # per-case folders matched by patterns: the IBSI soft-tissue sarcoma collection (CT)
    .venv/bin/python scripts/import_dataset.py /work/data/ibsi --layout cases --image '{case}/CT_image.nii.gz' --label '{case}/CT_mask.nii.gz' --out studies/sts_ct
    .venv/bin/python scripts/import_dataset.py /work/data/ibsi --layout cases --image '{case}/MR_T1_image.nii.gz' \\
        --label '{case}/MR_T1_mask.nii.gz' --id '{case}_t1' --cases @train.txt --out studies/sts_t1
    # DICOM: one folder per case holding an image series and a DICOM-SEG (at any depth)
    .venv/bin/python scripts/import_dataset.py /data/dicom --layout dicom --label-name 'Neoplasm' --out studies/dicom

The layout (msd, nnunet, cases, dicom) is detected unless --layout says it. Each label is reduced to the tumour (a
0/1 label on its image's grid): --label-value N, or --label-name NAME looked up in dataset.json's labels (in the
DICOM-SEG's segment labels and descriptions for dicom); with neither, the one label (segment) whose name says
tumour, tumor, cancer, lesion or mass, else value 1 when the labels hold only 0 and 1. Every write goes through the
app's datastore (checked, atomic); a pair that is unreadable, off its image's grid or without tumour voxels is
skipped with its reason. A rerun adds nothing: cases already in the studies folder with a final label are left
alone. Exit status 0 when anything was imported or already present, else 1.
"""

import argparse
import glob
import json
import logging
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Set, Tuple

import numpy as np
import pydicom
import pydicom_seg
import SimpleITK as sitk
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "apps", "sam3d"))

from lib.cases import EXTENSIONS, strip_extension  # noqa: E402
from lib.datastore import SafeLocalDatastore, read_header, require_label_of  # noqa: E402
from lib.errors import Conflict, InvalidRequest, NotFound  # noqa: E402

logger = logging.getLogger("import_dataset")

TUMOUR_WORDS = ("tumour", "tumor", "cancer", "lesion", "mass")
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
LAYOUTS = ("msd", "nnunet", "cases", "dicom")
NNUNET_CHANNEL = re.compile(r"(.+)_(\d{4})")
IMPORTED, PRESENT = "imported", "already present"


class Skip(Exception):
    """A case that cannot be imported; the message says why."""


@dataclass
class Case:
    name: str  # the case's name in the source: what --cases selects and {case} stands for in --id
    image: str  # the image file, or for dicom the case folder
    label: str  # the label file, or for dicom the case folder
    channel: int = 0  # the channel to take from a 4D image file


@dataclass
class TumourChoice:
    """How the tumour is found: a label value (segment number for DICOM-SEG) or, for DICOM-SEG, a segment name."""

    value: Optional[int]
    name: Optional[str] = None


def volume_names(folder: str, ending: Optional[str] = None) -> Dict[str, str]:
    """{name without extension: path} of the volumes in ``folder``; hidden files (macOS ``._*``) are not."""
    found = {}
    for file in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if file.startswith("."):
            continue
        stem = (file[: -len(ending)] if file.endswith(ending) else None) if ending else (
            strip_extension(file) if file.endswith(EXTENSIONS) else None)
        if stem:
            found[stem] = os.path.join(folder, file)
    return found


def read_dataset_json(source: str) -> Dict[str, Any]:
    path = os.path.join(source, "dataset.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def label_values_by_name(dataset: Dict[str, Any]) -> Dict[str, Any]:
    """dataset.json's labels as {name: value}: MSD writes {"1": "kidney"}, nnU-Net v2 {"kidney": 1} (or a list of
    values for a region)."""
    labels = dataset.get("labels", {})
    if labels and all(str(key).isdigit() for key in labels):
        return {str(name): int(value) for value, name in labels.items()}
    return dict(labels)


def is_dicom_file(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(132)[128:] == b"DICM"


def holds_dicom(source: str) -> bool:
    for folder, _, files in os.walk(source):
        for file in files:
            if is_dicom_file(os.path.join(folder, file)):
                return True
    return False


def detect_layout(source: str, image_pattern: Optional[str]) -> str:
    if os.path.isdir(os.path.join(source, "imagesTr")):
        dataset = read_dataset_json(source)
        labels = dataset.get("labels", {})
        nnunet = "file_ending" in dataset or (labels and not all(str(key).isdigit() for key in labels))
        return "nnunet" if nnunet else "msd"
    if image_pattern:
        return "cases"
    if holds_dicom(source):
        return "dicom"
    raise SystemExit(f"cannot tell the layout of {source}: pass --layout ({', '.join(LAYOUTS)})")


def msd_cases(source: str, channel: int) -> List[Case]:
    images_dir, labels_dir = os.path.join(source, "imagesTr"), os.path.join(source, "labelsTr")
    images, labels = volume_names(images_dir), volume_names(labels_dir)
    return [Case(name, path_or_counterpart(images, labels, name, images_dir),
                 path_or_counterpart(labels, images, name, labels_dir), channel)
            for name in sorted(images.keys() | labels.keys())]


def path_or_counterpart(found: Dict[str, str], other: Dict[str, str], name: str, folder: str) -> str:
    """``found[name]``, else where it would be, named as its counterpart: the path a skipped case reports."""
    return found.get(name) or os.path.join(folder, os.path.basename(other[name]))


def nnunet_cases(source: str, channel: int, file_ending: str) -> List[Case]:
    """nnU-Net names each channel's file CASE_XXXX; its label is CASE."""
    channel_files = volume_names(os.path.join(source, "imagesTr"), file_ending)
    names = {match.group(1) for match in map(NNUNET_CHANNEL.fullmatch, channel_files) if match}
    names |= volume_names(os.path.join(source, "labelsTr"), file_ending).keys()
    return [Case(name, os.path.join(source, "imagesTr", f"{name}_{channel:04d}{file_ending}"),
                 os.path.join(source, "labelsTr", f"{name}{file_ending}")) for name in sorted(names)]


def pattern_regex(pattern: str) -> re.Pattern:
    """``{case}`` matches within one path component, as the glob ``*`` that finds the files."""
    first, *rest = re.escape(pattern).split(re.escape("{case}"))
    return re.compile(first + "(?P<case>[^/]+)" + "(?P=case)".join(rest))


def pattern_cases(source: str, image_pattern: str, label_pattern: str, channel: int) -> List[Case]:
    """Cases found by either pattern, so that one with its image or its label missing is reported, not lost."""
    for pattern in (image_pattern, label_pattern):
        if "{case}" not in pattern:
            raise SystemExit(f"--image and --label need {{case}} where the case's name goes: {pattern!r}")
    names = set()
    for pattern in (image_pattern, label_pattern):
        regex = pattern_regex(pattern)
        for path in glob.glob(os.path.join(source, pattern.replace("{case}", "*"))):
            match = regex.fullmatch(os.path.relpath(path, source))
            names |= {match.group("case")} if match else set()
    return [Case(name, os.path.join(source, image_pattern.format(case=name)),
                 os.path.join(source, label_pattern.format(case=name)), channel) for name in sorted(names)]


def dicom_cases(source: str) -> List[Case]:
    folders = sorted(f for f in os.listdir(source) if os.path.isdir(os.path.join(source, f)) and not f.startswith("."))
    return [Case(name, os.path.join(source, name), os.path.join(source, name)) for name in folders]


def find_cases(source: str, layout: str, args: argparse.Namespace) -> List[Case]:
    if layout == "msd":
        return msd_cases(source, args.channel)
    if layout == "nnunet":
        return nnunet_cases(source, args.channel, read_dataset_json(source).get("file_ending", ".nii.gz"))
    if layout == "cases":
        if not (args.image and args.label):
            raise SystemExit("the cases layout needs --image and --label patterns, e.g. '{case}/CT_image.nii.gz'")
        return pattern_cases(source, args.image, args.label, args.channel)
    return dicom_cases(source)


def wanted_names(cases_option: str) -> List[str]:
    """--cases A,B or --cases @file (one name a line)."""
    if cases_option.startswith("@"):
        with open(cases_option[1:]) as f:
            return [line.strip() for line in f if line.strip()]
    return [name.strip() for name in cases_option.split(",") if name.strip()]


def label_file_values(cases: List[Case]) -> Set[int]:
    values: Set[int] = set()
    for case in cases:
        try:
            values |= {int(v) for v in np.unique(sitk.GetArrayFromImage(sitk.ReadImage(case.label)))}
        except RuntimeError:
            continue  # missing or unreadable: the case is skipped with its reason later
    return values


def looks_like_tumour(name: str) -> bool:
    return any(word in name.lower() for word in TUMOUR_WORDS)


def tumour_value(args: argparse.Namespace, names: Dict[str, Any], cases: List[Case]) -> int:
    """The tumour's value in label files; refuses to start (SystemExit) rather than guess."""
    if args.label_value is not None:
        return args.label_value
    listed = ", ".join(f"{name}: {value}" for name, value in names.items()) or "no dataset.json labels"
    if args.label_name:
        matches = [value for name, value in names.items() if name.lower() == args.label_name.lower()]
        if not matches:
            raise SystemExit(f"--label-name {args.label_name!r} is not among dataset.json's labels ({listed})")
        return require_single_value(matches[0], args.label_name)
    tumours = {name: value for name, value in names.items() if looks_like_tumour(name)}
    if len(tumours) == 1:
        name, value = next(iter(tumours.items()))
        logger.info(f"tumour: dataset.json's label {name!r} = {value}")
        return require_single_value(value, name)
    if len(tumours) > 1:
        raise SystemExit(f"several labels look like a tumour ({listed}): pass --label-value N or --label-name NAME")
    values = label_file_values(cases)
    if values <= {0, 1}:
        return 1
    raise SystemExit(f"the labels hold the values {sorted(values)} ({listed}) and none is named as a tumour: "
                     "pass --label-value N (the tumour's value) or --label-name NAME")


def require_single_value(value: Any, name: str) -> int:
    if not isinstance(value, int):
        raise SystemExit(f"the label {name!r} is the region {value}, not one value: pass --label-value N")
    return value


def with_grid_of(image: sitk.Image, header: sitk.ImageFileReader) -> sitk.Image:
    image.SetOrigin(header.GetOrigin())
    image.SetSpacing(header.GetSpacing())
    image.SetDirection(header.GetDirection())
    return image


def write_nifti(image: sitk.Image, folder: str, name: str) -> str:
    path = os.path.join(folder, f"{name}.nii.gz")
    sitk.WriteImage(image, path, useCompression=True)
    return path


def three_d_image(case: Case, image_id: str, folder: str) -> str:
    """The case's image file, or its chosen channel written to ``folder`` when the file is 4D (MSD's BraTS)."""
    header = read_header(case.image, f"the image {image_id}")
    four_d = header.GetDimension() == 4
    channels = header.GetSize()[3] if four_d else header.GetNumberOfComponents()
    if channels == 1 and not four_d:
        if case.channel:
            raise Skip(f"the image has one channel: no channel {case.channel}")
        return case.image  # the datastore checks that it is 3D
    if case.channel >= channels:
        raise Skip(f"the image has {channels} channels: no channel {case.channel}")
    image = sitk.ReadImage(case.image)
    channel = image[:, :, :, case.channel] if image.GetDimension() == 4 else \
        sitk.VectorIndexSelectionCast(image, case.channel)
    return write_nifti(channel, folder, f"{image_id}_channel{case.channel}")


def tumour_mask_file(label: sitk.Image, value: int, image_path: str, folder: str) -> str:
    """0/1 uint8 label of the tumour, written with the image's exact grid (the label lies on it within the
    datastore's tolerance: rounding in the files' affines would otherwise show)."""
    labels = sitk.GetArrayViewFromImage(label)
    mask = (labels == value).astype(np.uint8)
    if not mask.any():
        raise Skip(f"no tumour voxels: no voxel has the value {value} (the label holds {np.unique(labels).tolist()})")
    header = read_header(image_path, "the image")
    return write_nifti(with_grid_of(sitk.GetImageFromArray(mask), header), folder, "label")


def import_file_case(store: SafeLocalDatastore, case: Case, image_id: str, value: int) -> None:
    for kind, path in (("image", case.image), ("label", case.label)):
        if not os.path.isfile(path):
            raise Skip(f"no {kind} ({path})")
    with tempfile.TemporaryDirectory(prefix="import-") as folder:
        image_path = three_d_image(case, image_id, folder)
        label = require_label_of(case.label, image_path, image_id)  # the datastore's own check, on the original label
        label_path = tumour_mask_file(label, value, image_path, folder)
        store_pair(store, image_id, image_path, label_path, {"source": case.image},
                   {"source": case.label, "label_value": value})


def store_pair(store: SafeLocalDatastore, image_id: str, image_path: str, label_path: str,
               image_info: Dict[str, Any], label_info: Dict[str, Any]) -> None:
    if image_id not in store.list_images():  # an image stored earlier without a label keeps its file
        store.add_image(image_id, image_path, image_info)
    store.save_label(image_id, label_path, "final", label_info)


def dicom_series_and_seg(folder: str) -> Tuple[List[str], str]:
    """The files of the case's one image series (in the reader's order) and its one DICOM-SEG."""
    segs, series = [], {}
    for parent, _, files in sorted(os.walk(folder)):
        for file in sorted(files):
            path = os.path.join(parent, file)
            if not is_dicom_file(path):
                continue
            header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID", "SeriesInstanceUID"])
            if header.get("SOPClassUID") == SEG_SOP_CLASS:
                segs.append(path)
            else:
                series.setdefault(str(header.get("SeriesInstanceUID")), parent)
    if len(segs) != 1:
        raise Skip(f"{len(segs)} DICOM-SEG files (one wanted)" if segs else "no label: no DICOM-SEG")
    if len(series) != 1:
        raise Skip(f"{len(series)} image series (one wanted)" if series else "no image: no DICOM image series")
    (uid, parent), = series.items()
    return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(parent, uid)), segs[0]


def describe_segments(infos: Dict[int, pydicom.Dataset]) -> str:
    return ", ".join(f"{number}: {(segment_names(info) or ['unnamed'])[0]}" for number, info in sorted(infos.items()))


def segment_names(info: pydicom.Dataset) -> List[str]:
    return [str(info.get(key, "")) for key in ("SegmentLabel", "SegmentDescription") if info.get(key)]


def chosen_segment(infos: Dict[int, pydicom.Dataset], choice: TumourChoice) -> int:
    if choice.value is not None:
        if choice.value not in infos:
            raise Skip(f"no segment {choice.value} in the DICOM-SEG (segments {describe_segments(infos)})")
        return choice.value
    if choice.name:
        matches = [n for n, info in infos.items() if choice.name.lower() in map(str.lower, segment_names(info))]
    else:
        matches = [n for n, info in infos.items() if any(map(looks_like_tumour, segment_names(info)))]
        matches = matches or (list(infos) if len(infos) == 1 else [])
    if len(matches) != 1:
        wanted = f"named {choice.name!r}" if choice.name else "named as a tumour"
        raise Skip(f"{len(matches)} segments {wanted} (segments {describe_segments(infos)}): "
                   "pass --label-name or --label-value")
    return matches[0]


def read_series(files: List[str]) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    return reader.Execute()


def import_dicom_case(store: SafeLocalDatastore, case: Case, image_id: str, choice: TumourChoice) -> None:
    series_files, seg_path = dicom_series_and_seg(case.image)
    try:
        image = read_series(series_files)
        segmentation = pydicom_seg.SegmentReader().read(pydicom.dcmread(seg_path))
    except (RuntimeError, ValueError, AttributeError) as e:  # what ITK and pydicom(-seg) raise for broken files
        raise Skip(f"the DICOM cannot be read: {str(e).strip().splitlines()[-1][-200:]}") from None
    number = chosen_segment(segmentation.segment_infos, choice)
    # A SEG covers only the slices it was drawn on, on its own grid: put it on the series' voxels.
    segment = sitk.Resample(segmentation.segment_image(number), image, sitk.Transform(), sitk.sitkNearestNeighbor,
                            0.0, sitk.sitkFloat32)
    mask = sitk.Cast(segment >= 0.5, sitk.sitkUInt8)  # fractional SEGs store probabilities
    if not sitk.GetArrayViewFromImage(mask).any():
        raise Skip(f"no tumour voxels: segment {number} is empty on the series' grid")
    with tempfile.TemporaryDirectory(prefix="import-") as folder:
        store_pair(store, image_id, write_nifti(image, folder, "image"), write_nifti(mask, folder, "label"),
                   {"source": os.path.dirname(series_files[0])}, {"source": seg_path, "label_value": number})


def import_case(store: SafeLocalDatastore, case: Case, image_id: str, layout: str, choice: TumourChoice) -> str:
    """IMPORTED or PRESENT; raises Skip."""
    if store.get_label_by_image_id(image_id, "final"):
        return PRESENT
    try:
        if layout == "dicom":
            import_dicom_case(store, case, image_id, choice)
        else:
            import_file_case(store, case, image_id, choice.value)
    except (InvalidRequest, NotFound, Conflict) as e:  # the datastore's checks: unreadable, not 3D, off the grid
        raise Skip(str(e)) from None
    return IMPORTED


def selected(cases: List[Case], cases_option: Optional[str], limit: Optional[int]) -> Tuple[List[Case], List[str]]:
    """The cases to import, and the names asked for with --cases that the source does not have."""
    if cases_option:
        wanted = wanted_names(cases_option)
        known = {case.name for case in cases}
        cases = [case for case in cases if case.name in set(wanted)]
        return cases[:limit], [name for name in wanted if name not in known]
    return cases[:limit], []


def summary(results: Dict[str, str]) -> str:
    """``results``: each case's status (IMPORTED, PRESENT) or the reason it was skipped."""
    counts = {status: sum(r == status for r in results.values()) for status in (IMPORTED, PRESENT)}
    skipped = {name: reason for name, reason in results.items() if reason not in counts}
    lines = [f"imported {counts[IMPORTED]}, already present {counts[PRESENT]}, skipped {len(skipped)}"]
    return "\n".join(lines + [f"  {name}: {reason}" for name, reason in sorted(skipped.items())])


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="the collection's folder")
    parser.add_argument("--out", required=True, help="the MONAI Label studies folder (created if need be)")
    parser.add_argument("--layout", choices=LAYOUTS, help="the source's layout (default: detected)")
    parser.add_argument("--image", help="cases layout: the image's path in the source, with {case}")
    parser.add_argument("--label", help="cases layout: the label's path in the source, with {case}")
    parser.add_argument("--id", default="{case}", help="the image id to store a case under (default: {case})")
    parser.add_argument("--channel", type=int, default=0, help="the channel of a 4D image, or nnU-Net's _XXXX")
    tumour = parser.add_mutually_exclusive_group()
    tumour.add_argument("--label-value", type=int, help="the tumour's label value (DICOM: its segment number)")
    tumour.add_argument("--label-name", help="the tumour's name in dataset.json's labels (DICOM: the segment's)")
    parser.add_argument("--cases", help="import only these cases: A,B,C or @file with one name a line")
    parser.add_argument("--limit", type=int, help="import at most this many cases")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("lib.datastore").setLevel(logging.WARNING)  # a line per file; the progress bar says as much
    layout = args.layout or detect_layout(args.source, args.image)
    cases, unknown = selected(find_cases(args.source, layout, args), args.cases, args.limit)
    logger.log(logging.INFO if cases else logging.WARNING, f"{args.source}: {layout} layout, {len(cases)} cases")
    if layout == "dicom":
        choice = TumourChoice(args.label_value, args.label_name)
    else:
        choice = TumourChoice(tumour_value(args, label_values_by_name(read_dataset_json(args.source)), cases))
        logger.info(f"the tumour is the label value {choice.value}")
    store = SafeLocalDatastore(args.out, extensions=tuple(f"*{e}" for e in EXTENSIONS), auto_reload=False)
    results = {name: "not in the source" for name in unknown}
    with logging_redirect_tqdm():  # log lines above the progress bar, not through it
        for case in tqdm(cases, desc="cases", unit="case"):
            try:
                results[case.name] = import_case(store, case, args.id.format(case=case.name), layout, choice)
            except Skip as e:
                logger.warning(f"{case.name} skipped: {e}")
                results[case.name] = str(e)
    print(summary(results))
    return 0 if any(r in (IMPORTED, PRESENT) for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
