"""MONAI Label's local datastore, made safe for stored labels and strict with requests.

MONAI Label 0.8.5's ``LocalDatastore`` copies a saved label or image straight onto its destination and rewrites
``datastore_v2.json`` in place: a server killed during a save leaves a truncated label (that training would read)
or a truncated JSON (and then the server no longer starts). Here every write goes to a temporary file that is
renamed into place, so after a kill each file is the old one or the new one. A label is stored only if it is a
whole 3D image on its image's grid, and unknown ids or malformed info are 4xx answers instead of 500s.

Refusals are lib/errors.py's neutral errors; the server's edge gives them their status (MONAI Label's own
datastore endpoints call these methods directly, and the handlers lib/server/endpoints.py installs answer for them).
"""

import functools
import json
import logging
import os
import re
import threading
import time
from typing import Any, Dict, List, Optional

import numpy as np
import SimpleITK as sitk
from filelock import FileLock
from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastore, LocalDatastoreModel
from monailabel.interfaces.exception import ImageNotFoundException, LabelNotFoundException

from lib.activelearning.uncertain import INFO_KEY as UNCERTAINTY_KEY
from lib.activelearning.uncertain import is_score
from lib.errors import Conflict, InvalidRequest, NotFound
from lib.files import atomic_copy, atomic_write, remove_partial_files, sync_folder
from lib.nifti import require_complete_nifti

logger = logging.getLogger(__name__)

SAFE_NAME = re.compile(r"\w[\w.+-]*")
MAX_NAME_BYTES = 128  # with an extension and a temporary file's prefix, a file name stays within 255 bytes


def missing_is_not_found(method):
    @functools.wraps(method)
    def call(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except (ImageNotFoundException, LabelNotFoundException) as e:
            raise NotFound(str(e)) from e

    return call


def require_json_object(info: Any) -> None:
    if not isinstance(info, dict):
        raise InvalidRequest(f"info must be a JSON object, not {type(info).__name__}")


def require_bookkeeping_types(info: Dict[str, Any]) -> None:
    """Image info keys that MONAI Label's next-sample endpoint and the uncertain strategy read: another type
    there (any annotator may write image info) would make every later next-sample a 500."""
    strategies = info.get("strategy", {})
    if not isinstance(strategies, dict) or not all(isinstance(v, dict) for v in strategies.values()):
        raise InvalidRequest("image info 'strategy' must map strategy names to objects")
    if UNCERTAINTY_KEY in info and not is_score(info[UNCERTAINTY_KEY]):
        raise InvalidRequest(f"image info {UNCERTAINTY_KEY!r} must be a number in [0, 1]")


def one_thread_at_a_time(method):
    """MONAI Label keeps the datastore's index in a dict that a click (its info update, in the server's thread
    pool) and a removal (a refresh, iterating it) change at once: "dictionary changed size during iteration", a
    500. The methods that change or rebuild the index take turns."""

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        with self._index_lock:
            return method(self, *args, **kwargs)

    return call


class SafeLocalDatastore(LocalDatastore):
    def __init__(self, datastore_path: str, datastore_config: str = "datastore_v2.json", **kwargs):
        self._index_lock = threading.RLock()  # before LocalDatastore's own start-up refreshes the index
        set_aside_unreadable(os.path.join(datastore_path, datastore_config))
        super().__init__(datastore_path, datastore_config=datastore_config, **kwargs)
        self.remove_partial_files()

    @one_thread_at_a_time
    def refresh(self):
        super().refresh()

    def remove_partial_files(self) -> None:
        """Temporary files left by a killed writer. Under the datastore's lock: MONAI Label opens the datastore
        in new processes (scoring, training) while the server may be saving."""
        labels = self._datastore.label_path(None)
        tags = [os.path.join(labels, tag) for tag in next(os.walk(labels))[1]]
        with FileLock(self._lock_file):
            for folder in [self._datastore_path, self._datastore.image_path(), labels, *tags]:
                remove_partial_files(folder)

    # A removal shows at once (MONAI Label leaves it to its file watcher when auto-reload is on): a training run
    # started right after would otherwise be given a label that is gone.
    @missing_is_not_found
    @one_thread_at_a_time
    def remove_image(self, image_id: str) -> None:
        super().remove_image(image_id)
        self.refresh()

    @missing_is_not_found
    @one_thread_at_a_time
    def remove_label(self, label_id: str, label_tag: str) -> None:
        super().remove_label(label_id, label_tag)
        self.refresh()

    @missing_is_not_found
    @one_thread_at_a_time
    def update_image_info(self, image_id: str, info: Dict[str, Any]) -> None:
        require_json_object(info)
        require_bookkeeping_types(info)
        super().update_image_info(image_id, info)

    @missing_is_not_found
    @one_thread_at_a_time
    def update_label_info(self, label_id: str, label_tag: str, info: Dict[str, Any]) -> None:
        require_json_object(info)
        super().update_label_info(label_id, label_tag, info)

    def get_dataset_archive(self, limit_cases: Optional[int]) -> str:
        if not self.datalist():
            raise NotFound("no image has a final label yet: nothing to archive")
        return super().get_dataset_archive(limit_cases)

    # The two methods below keep LocalDatastore's bookkeeping (ids, names, info, lock); they check what they are
    # given and write the file atomically.
    @one_thread_at_a_time
    def add_image(self, image_id: str, image_filename: str, image_info: Dict[str, Any]) -> str:
        default_id, ext = self._to_id(os.path.basename(image_filename))
        image_id = image_id or default_id
        require_name("image id", image_id)
        require_json_object(image_info or {})
        require_volume(image_filename, f"the image {image_id}")
        logger.info(f"Adding image {image_id} ({ext})")
        with FileLock(self._lock_file):
            # Labels belong to the scan they were drawn on: a new scan under the same id would inherit them.
            labelled = self.label_files(image_id)
            if labelled:
                raise Conflict(
                    f"image {image_id!r} has labels ({', '.join(labelled)}): delete the image first "
                    "(DELETE /datastore/image) or upload the new scan under another id",
                )
            previous = self._datastore.objects.get(image_id)
            name = self.replace_file(image_filename, self._datastore.image_path(), image_id, ext,
                                     previous and previous.image)
            info = dict(image_info or {}, ts=int(time.time()), name=name)
            self._datastore.objects[image_id] = ImageLabelModel(image=DataModel(info=info, ext=ext))
            self._update_datastore_file(lock=False)
        return image_id

    @one_thread_at_a_time
    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: Dict[str, Any]) -> str:
        entry = self._datastore.objects.get(image_id)
        if not entry:
            raise NotFound(f"unknown image {image_id!r}: not in the datastore")
        require_json_object(label_info or {})
        require_name("label tag", label_tag)
        require_label_of(label_filename, self.get_image_uri(image_id), image_id)
        _, ext = self._to_id(os.path.basename(label_filename))
        logger.info(f"Saving label {label_tag} of {image_id} ({ext})")
        with FileLock(self._lock_file):
            name = self.replace_file(label_filename, self._datastore.label_path(label_tag), image_id, ext,
                                     entry.labels.get(label_tag))
            info = dict(label_info or {}, ts=int(time.time()), name=name)
            entry.labels[label_tag] = DataModel(info=info, ext=ext)
            self._update_datastore_file(lock=False)
        return image_id

    def replace_file(self, source: str, folder: str, image_id: str, ext: str, previous: Optional[DataModel]) -> str:
        """Store ``source`` as the file of ``image_id`` in ``folder``; returns its name. A previous file of
        another extension (``.nii.gz`` replaced by ``.nrrd``) goes once the new one is in place: left, both
        would be on disk and a restart would pick either."""
        name = self._filename(image_id, ext)
        atomic_copy(source, os.path.join(folder, name))
        old_name = self._filename(image_id, previous.ext) if previous else name
        if old_name != name and os.path.exists(os.path.join(folder, old_name)):
            os.remove(os.path.join(folder, old_name))
            sync_folder(folder)
        return name

    def label_files(self, image_id: str) -> List[str]:
        """``tag/file`` of every label file of ``image_id`` on disk, listed in the datastore or not (a restart
        would attach those that are not)."""
        labels = self._datastore.label_path(None)
        found = []
        for tag in sorted(next(os.walk(labels))[1]):
            found += [f"{tag}/{name}" for name in sorted(os.listdir(os.path.join(labels, tag)))
                      if self._to_id(name)[0] == image_id]
        return found

    def _update_datastore_file(self, lock=True):
        def write():
            self._ignore_event_config = True  # our own write: the file watcher need not reload it
            text = json.dumps(self._datastore.model_dump(exclude={"base_path"}), indent=2, default=str)
            atomic_write(self._datastore_config_path, lambda f: f.write(text), mode="w")
            self._config_ts = os.stat(self._datastore_config_path).st_mtime

        if lock:
            with FileLock(self._lock_file):
                write()
        else:
            write()


def require_name(kind: str, name: str) -> None:
    """Ids and tags become file and folder names: ``../x`` would write outside the datastore."""
    if not SAFE_NAME.fullmatch(name or "") or len(name.encode()) > MAX_NAME_BYTES:
        raise InvalidRequest(
            f"{kind} {name[:40]!r}: use letters, digits and . _ + - (not first), {MAX_NAME_BYTES} bytes at most",
        )


def read_header(path: str, what: str) -> sitk.ImageFileReader:
    try:
        require_complete_nifti(path)
        reader = sitk.ImageFileReader()
        reader.SetFileName(path)
        reader.ReadImageInformation()
        return reader
    except (OSError, RuntimeError, EOFError, ValueError) as e:  # what ITK, nibabel and gzip raise for bad files
        raise InvalidRequest(f"{what} cannot be read: {reader_error(e)}") from None


def reader_error(error: Exception) -> str:
    """The last line of an ITK (or nibabel, gzip) error: the reason, without ITK's source locations."""
    return str(error).strip().splitlines()[-1][-200:]


def require_volume(path: str, what: str) -> sitk.ImageFileReader:
    """MONAI Label stores whatever file is sent. sam3d segments single-channel 3D volumes."""
    header = read_header(path, what)
    if header.GetDimension() != 3 or header.GetNumberOfComponents() != 1:
        raise InvalidRequest(f"{what} is not one 3D volume: {describe(header)}")
    return header


def require_label_of(label_path: str, image_path: str, image_id: str) -> sitk.Image:
    """A wrong or broken label would replace the one stored before (a radiologist's work) and later break
    training: keep only a whole 3D label on the image's voxel grid. Returns the label as read (all its voxels)."""
    what = f"the label for {image_id}"
    label = require_volume(label_path, what)
    try:
        voxels = label.Execute()  # all voxels: a compressed file cut short fails here
    except RuntimeError:
        raise InvalidRequest(f"{what} cannot be read: its voxel data are damaged") from None
    image = read_header(image_path, f"the stored image {image_id}")
    if label.GetSize() != image.GetSize():
        raise InvalidRequest(f"{what} is {describe(label)}; the image is {describe(image)}")
    offset = grid_offset(label, image)
    if offset > GRID_TOLERANCE * min(image.GetSpacing()):
        raise InvalidRequest(
            f"{what} is not on the image's voxel grid: its corners lie up to {offset:.3g} mm from the "
            f"image's (label {describe_grid(label)}; image {describe_grid(image)})",
        )
    return voxels


# How far (in voxels) a label's corners may lie from its image's: rounding of the affine by the file formats.
GRID_TOLERANCE = 0.01


def voxel_to_physical(header: sitk.ImageFileReader) -> np.ndarray:
    direction = np.asarray(header.GetDirection()).reshape(3, 3)
    return np.vstack([np.hstack([direction * header.GetSpacing(), np.asarray(header.GetOrigin())[:, None]]), [0, 0, 0, 1]])


def grid_offset(label: sitk.ImageFileReader, image: sitk.ImageFileReader) -> float:
    """The largest distance (mm) between where the label and the image put one of the volume's corners."""
    corners = np.array([[i, j, k, 1] for i in (0, 1) for j in (0, 1) for k in (0, 1)], float)
    corners[:, :3] *= np.asarray(image.GetSize()) - 1
    return float(np.abs((voxel_to_physical(label) - voxel_to_physical(image)) @ corners.T).max())


def describe_grid(header: sitk.ImageFileReader) -> str:
    rounded = lambda values: [round(v, 3) for v in values]
    return (f"origin {rounded(header.GetOrigin())}, spacing {rounded(header.GetSpacing())}, "
            f"direction {rounded(header.GetDirection())}")


def describe(header: sitk.ImageFileReader) -> str:
    components = header.GetNumberOfComponents()
    return "x".join(map(str, header.GetSize())) + (f" with {components} components" if components > 1 else "")


def set_aside_unreadable(config_path: str) -> None:
    """A datastore file that does not parse (written by a crashed older server, or edited by hand) would stop
    MONAI Label from starting. Move it aside, keeping it for a person to inspect: the datastore is then
    rebuilt from the image and label files, which are intact; only the info recorded in the JSON is lost."""
    if not os.path.exists(config_path):
        return
    try:
        with open(config_path) as f:
            LocalDatastoreModel.model_validate_json(f.read())
    except ValueError as e:
        kept = f"{config_path}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}"
        os.replace(config_path, kept)
        logger.error(f"{config_path} could not be read ({str(e).splitlines()[0]}); kept as {kept}, rebuilt from files")
