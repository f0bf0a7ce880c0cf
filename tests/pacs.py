"""A real PACS for the tests: Orthanc with its DICOMweb plugin (Debian's packages), started on loopback with a
configuration written here (the fixtures ``orthanc`` and ``dicom_series`` in conftest.py use it)."""

import json
import os
import shutil
import subprocess
import time
import urllib.request

import numpy as np
import SimpleITK as sitk

from local_server import free_port

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
LPS = np.array([-1.0, -1.0, 1.0])  # RAS <-> LPS


def get_json(url):
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.load(response)


def write_orthanc_config(folder, port):
    config = {
        "Name": "sam3d-test",
        "HttpPort": port,
        "DicomPort": free_port(),
        "StorageDirectory": str(folder / "db"),
        "IndexDirectory": str(folder / "db"),
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "Plugins": [DICOMWEB_PLUGIN],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    (folder / "orthanc.json").write_text(json.dumps(config))
    return f"http://127.0.0.1:{port}"


def start_orthanc(folder):
    """Orthanc on the configuration in ``folder`` (its database stays there across restarts); returns the process
    once it answers."""
    assert os.path.exists(ORTHANC) and os.path.exists(DICOMWEB_PLUGIN), (
        "Orthanc with its DICOMweb plugin is needed: apt-get install orthanc orthanc-dicomweb (scripts/test.sh does)"
    )
    port = json.loads((folder / "orthanc.json").read_text())["HttpPort"]
    with open(folder / "orthanc.log", "a") as log:
        proc = subprocess.Popen([ORTHANC, str(folder / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 60
    while True:
        try:
            get_json(f"http://127.0.0.1:{port}/system")
            return proc
        except OSError:
            assert proc.poll() is None and time.time() < deadline, (folder / "orthanc.log").read_text()
            time.sleep(0.5)


def stop_orthanc(proc):
    proc.terminate()
    proc.wait(timeout=30)


def read_series(folder):
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(folder))
    return reader.Execute()
