"""The container files: Docker cannot run here, so they are linted and checked for what a deployment needs."""

import os
import subprocess
import sys

import yaml

from conftest import ROOT

DOCKER = os.path.join(ROOT, "docker")


def test_the_dockerfile_passes_hadolint():
    hadolint = os.path.join(os.path.dirname(sys.executable), "hadolint")
    result = subprocess.run([hadolint, os.path.join(DOCKER, "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_image_runs_as_a_non_root_user_with_a_healthcheck_on_info():
    with open(os.path.join(DOCKER, "Dockerfile")) as f:
        lines = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    assert lines[0].startswith("FROM nvidia/cuda:")
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    assert any("HEALTHCHECK" in line for line in lines) and any("/info/" in line for line in lines)
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        assert "requirements.txt" in " ".join(lines) and "monailabel==0.8.5" in f.read()


def test_compose_starts_sam3d_beside_orthanc_on_loopback_ports():
    with open(os.path.join(DOCKER, "compose.yaml")) as f:
        compose = yaml.safe_load(f)
    services = compose["services"]
    assert services["sam3d"]["environment"]["SAM3D_STUDIES"] == "http://orthanc:8042/dicom-web"
    assert services["orthanc"]["environment"]["DICOM_WEB_PLUGIN_ENABLED"] == "true"
    for service in services.values():
        assert all(port.startswith("127.0.0.1:") for port in service["ports"])
    build = services["sam3d"]["build"]
    assert os.path.exists(os.path.join(DOCKER, build["context"], build["dockerfile"]))
    subprocess.run(["bash", "-n", os.path.join(DOCKER, "start.sh")], check=True)
