"""MONAI Label's local datastore with crash-safe writes.

MONAI Label 0.8.5's ``LocalDatastore`` copies a saved label or image straight onto its destination and rewrites
``datastore_v2.json`` in place: a server killed during a save leaves a truncated label (that training would read)
or a truncated JSON (and then the server no longer starts). Here every write goes to a temporary file that is
renamed into place, so after a kill each file is the old one or the new one.
"""

import json
import logging
import os
import time
from typing import Any, Dict

from filelock import FileLock
from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastore, LocalDatastoreModel
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.interfaces.exception import ImageNotFoundException

from lib.files import atomic_copy, atomic_write, remove_partial_files

logger = logging.getLogger(__name__)


class AtomicLocalDatastore(LocalDatastore):
    def __init__(self, datastore_path: str, datastore_config: str = "datastore_v2.json", **kwargs):
        set_aside_unreadable(os.path.join(datastore_path, datastore_config))
        super().__init__(datastore_path, datastore_config=datastore_config, **kwargs)
        for tag in (None, DefaultLabelTag.FINAL, DefaultLabelTag.ORIGINAL):
            remove_partial_files(self._datastore.label_path(tag))
        remove_partial_files(self._datastore.image_path())
        remove_partial_files(datastore_path)

    # The two methods below keep LocalDatastore's bookkeeping (ids, names, info, lock) and change only how the
    # file is written.
    def add_image(self, image_id: str, image_filename: str, image_info: Dict[str, Any]) -> str:
        default_id, ext = self._to_id(os.path.basename(image_filename))
        image_id = image_id or default_id
        name = self._filename(image_id, ext)
        logger.info(f"Adding image {image_id} => {name}")
        with FileLock(self._lock_file):
            atomic_copy(image_filename, os.path.join(self._datastore.image_path(), name))
            info = dict(image_info or {}, ts=int(time.time()), name=name)
            self._datastore.objects[image_id] = ImageLabelModel(image=DataModel(info=info, ext=ext))
            self._update_datastore_file(lock=False)
        return image_id

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: Dict[str, Any]) -> str:
        entry = self._datastore.objects.get(image_id)
        if not entry:
            raise ImageNotFoundException(f"Image {image_id} not found")
        _, ext = self._to_id(os.path.basename(label_filename))
        name = self._filename(image_id, ext)
        logger.info(f"Saving label {label_tag} of {image_id} => {name}")
        with FileLock(self._lock_file):
            atomic_copy(label_filename, os.path.join(self._datastore.label_path(label_tag), name))
            info = dict(label_info or {}, ts=int(time.time()), name=name)
            entry.labels[label_tag] = DataModel(info=info, ext=ext)
            self._update_datastore_file(lock=False)
        return image_id

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
