"""MONAI Label's DICOMweb datastore, made to fail clearly and recover when the PACS is down, slow or interrupted.

MONAI Label 0.8.5 talks to the DICOMweb server without timeouts (a hung PACS hangs the request for ever), turns a
refused connection into a 500, and downloads a series straight into its cache folder: a download cut short
leaves a folder that later requests take for the whole series, so a partial volume would be segmented. Here:

- every DICOMweb request gives up after ``timeout`` seconds without an answer, and is not retried;
- a client waits at most ``timeout`` seconds for a series; a download still going on then keeps going in the
  background (the client is told to ask again) and a repeated request joins it instead of starting another;
- a series is downloaded into a temporary folder that is renamed into place only when complete;
- an unreachable PACS is a 503 and a series it does not have is a 404, with messages that say so; the server
  starts and /info/ answers while the PACS is down;
- a series with a slice missing or a damaged instance is a 422 instead of a volume with the wrong geometry or a 500.

Refusals are lib/errors.py's neutral errors, as in lib/datastore.py.
"""

import contextlib
import functools
import logging
import os
import re
import shutil
import tempfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as WaitedTooLong
from typing import Any, Dict

import numpy as np
import pydicom
import requests
from dicomweb_client import DICOMwebClient
from dicomweb_client.session_utils import create_session_from_user_pass
from filelock import FileLock
from monailabel.datastore.dicom import DICOMwebClientX, DICOMWebDatastore
from monailabel.datastore.utils.dicom import dicom_web_download_series
from monailabel.interfaces.datastore import DefaultLabelTag
from pydicom.errors import InvalidDicomError
from requests.adapters import HTTPAdapter

from lib.datastore import SafeLocalDatastore, reader_error
from lib.errors import InvalidRequest, NotFound, TimedOut, Unreachable
from lib.files import PARTIAL_PREFIX, PARTIAL_SUFFIX, claimed

logger = logging.getLogger(__name__)

DICOM_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")  # PS3.5 9.1: digits and dots, which also rules out paths


class TimeoutAdapter(HTTPAdapter):
    """requests waits for ever unless each call names a timeout, and dicomweb-client names none."""

    def __init__(self, timeout: float):
        super().__init__()
        self.timeout = timeout

    def send(self, request, **kwargs):
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = self.timeout
        return super().send(request, **kwargs)


def bounded_client(url: str, timeout: float, username: str = "", password: str = "", **url_prefixes) -> DICOMwebClient:
    """MONAI Label's DICOMweb client whose requests each give up after ``timeout`` seconds, without retries:
    dicomweb-client retries every failure (a refused connection too) five times over 30 s of back-off, so a
    PACS that is down would hold each click for 30 s or, hung, for five timeouts more. The user's next click is
    the retry."""
    session = create_session_from_user_pass(username, password) if username and password else requests.Session()
    for scheme in ("http://", "https://"):
        session.mount(scheme, TimeoutAdapter(timeout))
    client = DICOMwebClientX(url=url, session=session, **url_prefixes)
    client.set_http_retry_params(retry=False)
    return client


def unreachable_when_refused(method):
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except requests.RequestException as e:
            raise self.unreachable(e) from e

    return call


class DICOMwebStudies(DICOMWebDatastore, SafeLocalDatastore):
    """Local copies (and the datastore file) are written by :class:`SafeLocalDatastore`, next in line."""

    def __init__(self, client: DICOMwebClient, timeout: float, **kwargs):
        self.timeout = timeout
        self._downloads: Dict[str, Future] = {}
        self._downloads_lock = threading.Lock()
        self._downloader = ThreadPoolExecutor(max_workers=2, thread_name_prefix="DICOMweb")
        super().__init__(client, **kwargs)

    def unreachable(self, error: Exception) -> Unreachable:
        return Unreachable(
            f"the DICOMweb server {self._client.base_url} did not answer ({type(error).__name__}); "
            "try again when it is back",
        )

    def status(self) -> Dict[str, Any]:
        """MONAI Label puts this in /info/, which it also calls at start: with the PACS down, the server would not
        start and clients could not connect. Answer with the error instead."""
        try:
            return super().status()
        except Unreachable as e:
            logger.warning(e)
            return {"total": 0, "completed": 0, "label_tags": {}, "error": str(e)}

    def get_image_uri(self, image_id: str) -> str:
        folder = os.path.join(self._datastore.image_path(), image_id)
        self._fetch_series(image_id, folder)
        if not os.path.exists(f"{folder}.nii.gz"):  # not converted yet
            require_whole_series(folder, image_id)
        try:
            return self._convert(super().get_image_uri, image_id)
        except RuntimeError as e:  # ITK's reader, on a damaged instance
            detail = f"series {image_id} cannot be read as a volume: {reader_error(e)}"
            raise InvalidRequest(detail) from None

    def get_label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:
        if label_tag == DefaultLabelTag.FINAL:
            self._fetch_series(label_id, os.path.join(self._datastore.label_path(label_tag), label_id))
        return self._convert(super().get_label_uri, label_id, label_tag, image_id)

    @unreachable_when_refused
    def _convert(self, method, *args):
        """MONAI Label's conversion of the (now complete) series folder, which also asks the PACS for tags."""
        return method(*args)

    list_images = unreachable_when_refused(DICOMWebDatastore.list_images)
    get_labeled_images = unreachable_when_refused(DICOMWebDatastore.get_labeled_images)
    get_unlabeled_images = unreachable_when_refused(DICOMWebDatastore.get_unlabeled_images)
    save_label = unreachable_when_refused(DICOMWebDatastore.save_label)
    datalist = unreachable_when_refused(DICOMWebDatastore.datalist)

    def _fetch_series(self, series_uid: str, folder: str) -> None:
        if not DICOM_UID.match(series_uid or ""):
            raise NotFound(f"unknown image {series_uid!r}: not a DICOM series UID")
        if os.path.isdir(folder) and os.listdir(folder):
            return  # complete: folders are renamed into place whole
        with self._downloads_lock:
            download = self._downloads.get(series_uid)
            started = download is None
            if started:
                download = self._downloader.submit(self._download, series_uid, folder)
                self._downloads[series_uid] = download
        if started:  # outside the lock: a download already over runs the callback here, at once
            download.add_done_callback(functools.partial(self._forget, series_uid))
        try:
            download.result(timeout=self.timeout)
        except WaitedTooLong:
            raise TimedOut(
                f"series {series_uid} is still coming from {self._client.base_url} after {self.timeout:g} s; "
                "ask again later",
            ) from None
        except requests.RequestException as e:
            raise self.unreachable(e) from e

    def _forget(self, series_uid: str, download: Future) -> None:
        with self._downloads_lock:
            if self._downloads.get(series_uid) is download:
                del self._downloads[series_uid]  # a failed download is retried by the next request

    def _download(self, series_uid: str, folder: str) -> None:
        study_uid = self._study_of(series_uid)
        with contextlib.ExitStack() as stack:
            # Claimed from its creation on, under the datastore lock that a cleaning process holds while it looks.
            with FileLock(self._lock_file):
                partial = tempfile.mkdtemp(dir=os.path.dirname(folder), prefix=PARTIAL_PREFIX, suffix=PARTIAL_SUFFIX)
                stack.enter_context(claimed(partial))
            try:
                dicom_web_download_series(study_uid, series_uid, partial, self._client, self._fetch_by_frame)
                os.replace(partial, folder)  # replaces an empty folder; a non-empty one means another copy won
            except OSError:
                if not (os.path.isdir(folder) and os.listdir(folder)):
                    raise
            finally:
                shutil.rmtree(partial, ignore_errors=True)

    def _study_of(self, series_uid: str) -> str:
        found = self._client.search_for_series(search_filters={"SeriesInstanceUID": series_uid})
        found = [s for s in found if s.get("0020000E", {}).get("Value") == [series_uid]]
        if not found:
            detail = f"unknown image {series_uid!r}: {self._client.base_url} has no such series"
            raise NotFound(detail)
        return found[0]["0020000D"]["Value"][0]


def require_whole_series(folder: str, series_uid: str, tolerance: float = 0.01) -> None:
    """ITK stacks a series with a slice missing (or slices of another series mixed in) into a volume of average
    spacing, and reads a slice whose pixel data stop short without complaint: the lesions would sit where they
    are not, or half a slice would be noise. Refuse such a series instead."""
    names = sorted(os.listdir(folder))
    if len(names) < 2:  # one file: a multi-frame instance, which MONAI Label hands to GDCM whole
        return
    positions, orientations = [], set()
    for name in names:
        try:
            slice_ = pydicom.dcmread(os.path.join(folder, name))
            positions.append([float(v) for v in slice_.ImagePositionPatient])
            orientations.add(tuple(round(float(v), 4) for v in slice_.ImageOrientationPatient))
            if not slice_.file_meta.TransferSyntaxUID.is_compressed:  # compressed frames have no fixed size
                expected = slice_.Rows * slice_.Columns * slice_.SamplesPerPixel * (slice_.BitsAllocated // 8)
                if len(slice_.PixelData) < expected * int(getattr(slice_, "NumberOfFrames", 1) or 1):
                    raise ValueError(f"its pixel data stop short: {len(slice_.PixelData)} of {expected} bytes")
        except (InvalidDicomError, AttributeError, ValueError, TypeError, EOFError, OSError) as e:
            raise InvalidRequest(f"series {series_uid} cannot be read as a volume: {name}: {e}")
    if len(orientations) != 1:
        raise InvalidRequest(f"series {series_uid} mixes slice orientations")
    row, column = np.reshape(next(iter(orientations)), (2, 3))
    depths = np.sort(np.asarray(positions) @ np.cross(row, column))
    gaps = np.diff(depths)
    if len(gaps) and (gaps.min() <= 0 or gaps.max() - gaps.min() > tolerance * gaps.max()):
        raise InvalidRequest(
            f"series {series_uid} has unevenly spaced slices ({gaps.min():.3g} to {gaps.max():.3g} mm apart): "
            "a slice missing, or two series mixed",
        )
