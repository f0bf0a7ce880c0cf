"""Turn volumes (the demo studies by default) into DICOM CT series, and optionally upload them to a PACS.

    .venv/bin/python scripts/make_dicom_studies.py --out studies/dicom
    .venv/bin/python scripts/make_dicom_studies.py --out studies/dicom --upload http://127.0.0.1:8042/dicom-web

Each volume becomes one axial CT series (one file per slice) with the tags a viewer and MONAI Label rely on:
patient, study, series and frame-of-reference identifiers, image orientation and position per slice, pixel
spacing, slice thickness, rescale slope and intercept. The volume is reoriented to the DICOM axes (LPS, no
resampling), so an oblique volume stays oblique. UIDs are derived from the study name, so a rerun writes the
same series. Uploading goes through DICOMweb STOW-RS.
"""

import argparse
import glob
import logging
import os
import sys
from typing import Dict, List

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from tqdm import tqdm

logger = logging.getLogger(__name__)
UID_PREFIX = "1.2.826.0.1.3680043.10.1338."  # a prefix for UIDs derived from names (see generate_uid)


def uid(*names: str) -> str:
    return generate_uid(prefix=UID_PREFIX, entropy_srcs=list(names))


def series_uids(name: str) -> Dict[str, str]:
    return {
        "study": uid(name, "study"),
        "series": uid(name, "series"),
        "frame_of_reference": uid(name, "frame"),
    }


def write_series(image_path: str, name: str, out: str) -> List[str]:
    """Write ``image_path`` (any ITK-readable volume, HU) as a CT series in ``out/name``; -> the file paths."""
    image = sitk.DICOMOrient(sitk.ReadImage(image_path), "LPS")
    pixels = sitk.GetArrayFromImage(image)  # (slices, rows, columns) = (k, j, i)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    spacing, origin = np.array(image.GetSpacing()), np.array(image.GetOrigin())
    intercept = float(min(pixels.min(), -1024))
    stored = np.round(pixels - intercept).astype(np.uint16)  # CT stores unsigned values with an intercept
    uids = series_uids(name)
    folder = os.path.join(out, name)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for k in range(pixels.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = uid(name, "slice", str(k))
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = os.path.join(folder, f"{k:04d}.dcm")
        ds = FileDataset(path, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID = f"Demo^{name}", name
        ds.PatientBirthDate, ds.PatientSex = "", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = uids["study"], uids["series"]
        ds.FrameOfReferenceUID = uids["frame_of_reference"]
        ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 1, k + 1
        ds.StudyDate = ds.SeriesDate = "20260101"
        ds.StudyDescription, ds.SeriesDescription = "sam3d demo", f"{name} CT"
        ds.Modality, ds.Manufacturer, ds.BodyPartExamined = "CT", "sam3d phantom", "ABDOMEN"
        ds.AccessionNumber, ds.ReferringPhysicianName = "", ""
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImageOrientationPatient = [float(v) for v in np.r_[direction[:, 0], direction[:, 1]]]
        ds.ImagePositionPatient = [float(v) for v in origin + direction @ (spacing * [0, 0, k])]
        ds.SliceLocation = float(ds.ImagePositionPatient[2])
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]  # row spacing (between rows), column spacing
        ds.SliceThickness = float(spacing[2])
        ds.Rows, ds.Columns = stored.shape[1:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = intercept, 1.0, "HU"
        ds.WindowCenter, ds.WindowWidth = 40.0, 400.0
        ds.PixelData = stored[k].tobytes()
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(path, write_like_original=False)
        paths.append(path)
    return paths


def upload(paths: List[str], url: str) -> None:
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(url=url)
    for start in range(0, len(paths), 50):
        client.store_instances([pydicom.dcmread(p) for p in paths[start : start + 50]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", help="a folder of .nii.gz volumes (default: the demo studies, written first)")
    parser.add_argument("--out", required=True, help="where the series go, one folder per volume")
    parser.add_argument("--upload", metavar="DICOMWEB_URL", help="also store them there (STOW-RS)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    studies = args.studies
    if studies is None:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from make_demo_studies import write_studies

        studies = os.path.join(args.out, "nifti")
        write_studies(studies)
    for path in tqdm(sorted(glob.glob(os.path.join(studies, "*.nii.gz"))), desc="series"):
        name = os.path.basename(path)[: -len(".nii.gz")]
        files = write_series(path, name, args.out)
        if args.upload:
            upload(files, args.upload)
        logger.info(f"{name}: {len(files)} slices, series {series_uids(name)['series']}")


if __name__ == "__main__":
    main()
