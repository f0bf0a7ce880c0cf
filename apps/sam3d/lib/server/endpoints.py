"""sam3d's versions of the MONAI Label 0.8.5 endpoints that take uploads, run the model or start training.

MONAI Label's own run the model on the server's event loop (while a click is segmented, ``/info/`` and every
other request wait), copy uploads into the shared temporary folder and remove them only after a successful
answer (refused uploads pile up there), write results under names that MONAI Label's client reuses in its own
temporary folder (a client on the server's machine loses its mask to the server's clean-up), answer a
``params`` or ``info`` field that is not a JSON object with a 500, and start duplicate training runs. These
keep MONAI Label's paths, fields and roles; each request's files live in a folder of its own under a private
folder of the server's, removed whatever the answer.
"""

import atexit
import contextlib
import functools
import json
import logging
import os
import shutil
import tempfile
import threading
from typing import Any, Callable, Dict, Iterator, Optional

from fastapi import BackgroundTasks, Depends, FastAPI, File, Form, HTTPException, UploadFile
from fastapi.responses import JSONResponse
from monailabel.config import settings
from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.datastore.utils.convert import nifti_to_dicom_seg
from monailabel.endpoints.infer import ResultType, send_response
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.interfaces.utils.app import app_instance
from monailabel.utils.async_tasks.task import AsyncTask
from starlette.requests import Request

from lib.errors import Conflict, InvalidRequest, NotFound, TimedOut, Unreachable

logger = logging.getLogger(__name__)

# The answer to each of sam3d's errors (lib/errors.py), wherever in the server it is raised: decided here only.
ERROR_STATUS = {InvalidRequest: 422, NotFound: 404, Conflict: 409, Unreachable: 503, TimedOut: 504}
ERRORS = tuple(ERROR_STATUS)


def error_response(request: Request, error: Exception) -> JSONResponse:
    status = next(code for kind, code in ERROR_STATUS.items() if isinstance(error, kind))
    return JSONResponse({"detail": str(error)}, status_code=status)


# The 3D formats sam3d reads; an upload's name is matched case-insensitively and nothing else of it is used.
UPLOAD_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")


@functools.lru_cache(maxsize=None)
def requests_folder() -> str:
    """The server's private folder for request files (0700): nobody else's files share its paths."""
    folder = tempfile.mkdtemp(prefix="sam3d-requests-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    logger.info(f"request files go to {folder}")
    return folder


def is_request_file(path: str) -> bool:
    root = os.path.realpath(requests_folder())
    return os.path.realpath(path).startswith(root + os.sep)


class RequestFiles:
    """The files of one request, in a folder of their own."""

    def __init__(self) -> None:
        self.folder = tempfile.mkdtemp(dir=requests_folder())

    def save(self, upload: UploadFile, name: str) -> str:
        path = os.path.join(self.folder, name + upload_suffix(upload.filename))
        with open(path, "wb") as f:
            shutil.copyfileobj(upload.file, f, length=1 << 20)
        return path

    def adopt(self, path: str) -> str:
        """Move a file MONAI Label wrote into the shared temporary folder (a result) into this folder."""
        if not path or not os.path.isfile(path) or os.path.dirname(path) == self.folder:
            return path
        moved = os.path.join(self.folder, os.path.basename(path))
        shutil.move(path, moved)
        return moved

    def hide(self, text: str) -> str:
        """An error message without the server's paths."""
        return text.replace(self.folder + os.sep, "").replace(self.folder, "")

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


@contextlib.contextmanager
def request_files(background_tasks: BackgroundTasks) -> Iterator[RequestFiles]:
    """Removed after the answer is sent, or at once when the request fails."""
    files = RequestFiles()
    try:
        yield files
    except HTTPException as e:
        files.remove()
        raise HTTPException(status_code=e.status_code, detail=files.hide(str(e.detail))) from None
    except ERRORS as e:
        files.remove()
        raise type(e)(files.hide(str(e))) from None
    except BaseException:
        files.remove()
        raise
    background_tasks.add_task(files.remove)


def upload_suffix(filename: Optional[str]) -> str:
    if not filename:
        return UPLOAD_SUFFIXES[0]  # MONAI Label's client sends names; a bare body is taken as NIfTI, as it does
    suffix = next((s for s in UPLOAD_SUFFIXES if filename.lower().endswith(s)), None)
    if suffix is None:
        raise HTTPException(status_code=422, detail=f"upload a {', '.join(UPLOAD_SUFFIXES)} file, not {filename[-40:]!r}")
    return suffix


def json_object(text: Optional[str], field: str) -> Dict[str, Any]:
    try:
        value = json.loads(text) if text else {}
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise HTTPException(status_code=422, detail=f"the {field!r} field must be a JSON object, e.g. {{}}")
    return value


def by_user(info: Dict[str, Any], user: User) -> Dict[str, Any]:
    return {**info, "user": user.username} if user.username else info


def role(name: str):
    return Depends(RBAC(name))


# Values of MONAI Label's own request keys that its infer task and writer handle; others fail inside them.
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
RESULT_EXTENSIONS = (".nii.gz", ".nii", ".nrrd")
RESULT_DTYPES = ("uint8", "int8", "uint16", "int16", "int32", "float32")


def check_infer_request(request: Dict[str, Any]) -> None:
    """What a click may ask of MONAI Label's machinery around the model, checked before any of it runs (an empty
    ``result_extension`` is taken out: it means the default)."""
    def refuse(key: str, allowed: str) -> None:
        raise HTTPException(status_code=422, detail=f"{key!r} must be {allowed}, got {request[key]!r}")

    image = request.get("image")
    if not isinstance(image, str) or not image:
        refuse("image", "an image id (a string)")
    if "logging" in request and str(request["logging"]).lower() not in LOG_LEVELS:
        refuse("logging", " or ".join(LOG_LEVELS))
    if "device" in request and not isinstance(request["device"], str):
        refuse("device", "a device name such as 'cpu' or 'cuda'")
    for key, required in (("skip_writer", False), ("result_write_to_file", True), ("result_compress", None)):
        value = request.get(key, required)
        if key in request and (not isinstance(value, bool) or required not in (None, value)):
            refuse(key, "true or false" if required is None else str(required).lower())
    if request.get("result_extension") == "":  # what MONAI Label's clients send for "the default"
        del request["result_extension"]
    if request.get("result_extension") not in (None, *RESULT_EXTENSIONS):
        refuse("result_extension", " or ".join(RESULT_EXTENSIONS))
    if request.get("result_dtype") not in (None, *RESULT_DTYPES):
        refuse("result_dtype", " or ".join(RESULT_DTYPES))
    # MONAI Label stores a result under any label_tag a request names, final included: a user-role click would
    # overwrite the radiologist's label, which only annotators may save. A click stores the model's own mask.
    if not isinstance(request.get("save_label", False), bool):
        refuse("save_label", "true or false")
    if request.get("save_label") and request.get("label_tag", DefaultLabelTag.ORIGINAL.value) != DefaultLabelTag.ORIGINAL.value:
        raise HTTPException(
            status_code=422,
            detail=f"a click stores only the model's mask ('label_tag': 'original'), not {request['label_tag']!r}; "
            "save a corrected label with PUT /datastore/label",
        )


def infer(
    background_tasks: BackgroundTasks,
    model: str,
    image: str = "",
    session_id: str = "",
    params: str = Form("{}"),
    file: UploadFile = File(None),
    label: UploadFile = File(None),
    output: Optional[ResultType] = None,
    user: User = role(settings.MONAI_LABEL_AUTH_ROLE_USER),
):
    app = app_instance()
    with request_files(background_tasks) as files:
        request = {"model": model, "image": image, **json_object(params, "params")}
        if label:
            raise HTTPException(status_code=422, detail="sam3d segments from clicks; it takes no label upload")
        if file:
            request["image"] = files.save(file, "image")
        if session_id:
            session = app.sessions().get_session(session_id)
            if not session:
                raise HTTPException(status_code=404, detail=f"unknown session {session_id!r}")
            request.update(image=session.image, session=session.to_json())
        if not request["image"]:
            raise HTTPException(status_code=422, detail="give an image id, upload a file or name a session")
        if output == ResultType.dicom_seg and not isinstance(app.datastore(), DICOMWebDatastore):
            raise HTTPException(status_code=422, detail="output=dicom_seg needs a DICOMweb datastore")
        result = app.infer(request)
        result["file"] = files.adopt(result.get("file"))
        if output == ResultType.dicom_seg:
            result["dicom_seg"] = files.adopt(dicom_seg(app.datastore(), image, result["file"], request))
        return send_response(app.datastore(), result, output, background_tasks)


def dicom_seg(datastore, image: str, mask: str, request: Dict[str, Any]) -> str:
    if request.get("label_info") is None:
        raise HTTPException(status_code=422, detail="output=dicom_seg needs 'label_info' in params")
    series = datastore.get_image_uri(image)
    return nifti_to_dicom_seg(series, mask, request["label_info"], use_itk=True)


def add_image(
    background_tasks: BackgroundTasks,
    image: Optional[str] = None,
    params: str = Form("{}"),
    file: UploadFile = File(...),
    user: User = role(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR),
):
    with request_files(background_tasks) as files:
        info = by_user(json_object(params, "params"), user)
        suffix = upload_suffix(file.filename)
        image_id = image or os.path.basename(file.filename or "")[: -len(suffix)]
        if not image_id:
            raise HTTPException(status_code=422, detail="give the image an id (?image=...) or its file a name")
        return {"image": app_instance().datastore().add_image(image_id, files.save(file, "image"), info)}


def save_label(
    background_tasks: BackgroundTasks,
    image: str,
    params: str = Form("{}"),
    tag: str = DefaultLabelTag.FINAL.value,
    label: UploadFile = File(...),
    user: User = role(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR),
):
    app = app_instance()
    with request_files(background_tasks) as files:
        info = json_object(params, "params")
        label_id = app.datastore().save_label(image, files.save(label, "label"), tag or DefaultLabelTag.FINAL.value, info)
        return {**(app.on_save_label(image, label_id) or {}), "image": image, "label": label_id}


def update_image_info(image: str, info: str = Form("{}"), user: User = role(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR)):
    return app_instance().datastore().update_image_info(image, by_user(json_object(info, "info"), user))


def update_label_info(
    label: str, tag: str, info: str = Form("{}"), user: User = role(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR)
):
    return app_instance().datastore().update_label_info(label, tag, by_user(json_object(info, "info"), user))


def update_label_info_by_params(
    label: str, tag: str, params: str = Form("{}"), user: User = role(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR)
):
    return update_label_info(label, tag, params, user)


_train_start = threading.Lock()  # the check for a run under way and the start are one step


def train(
    model: str,
    params: Optional[dict] = None,
    run_sync: Optional[bool] = False,
    enqueue: Optional[bool] = False,
    user: User = role(settings.MONAI_LABEL_AUTH_ROLE_ADMIN),
):
    """One run at a time, started only if its request can succeed: MONAI Label checks it in the training
    process, after answering 200 (a wrong option, no labels, an unknown GPU: the run fails or never starts)."""
    app = app_instance()
    trainer = app._trainers.get(model)
    if trainer is None:
        raise HTTPException(status_code=404, detail=f"unknown model {model!r}; this app trains {list(app._trainers)}")
    if app.settings.trainer:  # replicas behind a load balancer: one of them trains, all serve what it publishes
        raise HTTPException(status_code=409, detail=f"this replica does not train: send POST /train/{model} to the "
                            f"trainer, {app.settings.trainer} (--conf trainer); the model it publishes in the shared "
                            "model folder is served here from the next click on")
    trainer.check_request({"model": model, **(params or {})}, app.datastore())
    with _train_start:
        under_way = [t for t in AsyncTask.status("train", all=True)[0] or [] if t["status"] in ("SUBMITTED", "RUNNING")]
        if under_way:
            raise HTTPException(status_code=429, detail=f"a training run is under way ({under_way[0]['id']}); "
                                "wait for it or stop it (DELETE /train/)")
        result, detail = AsyncTask.run("train", request={"model": model}, params=params, force_sync=run_sync)
    return result


def train_all(params: Optional[dict] = None, run_sync: Optional[bool] = False,
              user: User = role(settings.MONAI_LABEL_AUTH_ROLE_ADMIN)):
    return {model: {"result": train(model, (params or {}).get(model), run_sync, user=user), "detail": None}
            for model in app_instance()._trainers}


# (method, path) -> endpoint: the routes of MONAI Label's that these replace.
ROUTES: Dict[tuple, Callable] = {
    ("POST", "/infer/{model}"): infer,
    ("PUT", "/datastore/image"): add_image,
    ("PUT", "/datastore/"): add_image,
    ("PUT", "/datastore/label"): save_label,
    ("PUT", "/datastore/image/info"): update_image_info,
    ("PUT", "/datastore/label/info"): update_label_info,
    ("PUT", "/datastore/updatelabelinfo"): update_label_info_by_params,
    ("POST", "/train/{model}"): train,
    ("POST", "/train/"): train_all,
}


def install_endpoints(server: FastAPI) -> None:
    """Replace MONAI Label's routes in its routers, keeping path, method, summary and schema visibility. Plain
    ``def`` endpoints run in the server's thread pool, off its event loop."""
    from monailabel.endpoints import datastore, infer as infer_routes, train as train_routes

    for router in (infer_routes.router, datastore.router, train_routes.router):
        for route in list(router.routes):
            endpoint = next((ROUTES[key] for key in ((m, route.path) for m in route.methods) if key in ROUTES), None)
            if endpoint is None:
                continue
            router.routes.remove(route)
            router.add_api_route(  # marks the router changed: the server's route cache is rebuilt
                route.path[len(router.prefix):], endpoint, methods=list(route.methods), summary=route.summary,
                include_in_schema=route.include_in_schema, deprecated=route.deprecated,
            )
    for error in ERRORS:  # the server's middleware is rebuilt on its next request (configure.configure_server)
        server.add_exception_handler(error, error_response)
    server.openapi_schema = None
    requests_folder()
