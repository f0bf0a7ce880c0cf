"""The container files, linted and checked for what a deployment needs. Building and running them is
tests/test_container.py's (behind SAM3D_CONTAINER_TEST=1: it takes minutes)."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT

DOCKER = os.path.join(ROOT, "docker")


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "orthanc.Dockerfile"])
def test_the_dockerfiles_pass_hadolint(dockerfile):
    hadolint = os.path.join(os.path.dirname(sys.executable), "hadolint")
    result = subprocess.run([hadolint, os.path.join(DOCKER, dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_image_runs_as_a_non_root_user_with_a_healthcheck_on_info():
    with open(os.path.join(DOCKER, "Dockerfile")) as f:
        lines = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    assert lines[0].startswith("ARG BASE_IMAGE=nvidia/cuda:") and lines[1] == "FROM ${BASE_IMAGE}"
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    assert any("HEALTHCHECK" in line for line in lines) and any("/info/" in line for line in lines)
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        assert "requirements.txt" in " ".join(lines) and "monailabel==0.8.5" in f.read()


def test_the_build_context_leaves_out_local_weights_and_environments():
    with open(os.path.join(ROOT, ".dockerignore")) as f:
        rules = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    included = {rule[1:] for rule in rules if rule.startswith("!")}
    assert rules[0] == "*" and included == {"requirements.txt", "apps", "scripts", "docker/start.sh", "docker/orthanc.json"}
    assert "apps/sam3d/model" in rules[rules.index("!apps"):]  # excluded again after apps/ is let in


def test_compose_starts_sam3d_beside_orthanc_on_loopback_ports():
    with open(os.path.join(DOCKER, "compose.yaml")) as f:
        compose = yaml.safe_load(f)
    services = compose["services"]
    assert services["sam3d"]["environment"]["SAM3D_STUDIES"] == "http://orthanc:8042/dicom-web"
    with open(os.path.join(DOCKER, "orthanc.json")) as f:
        orthanc = json.load(f)
    assert orthanc["DicomWeb"] == {"Enable": True, "Root": "/dicom-web/"} and orthanc["HttpPort"] == 8042
    for service in services.values():
        assert all(port.startswith("127.0.0.1:") for port in service["ports"])
        build = service["build"]
        assert os.path.exists(os.path.join(DOCKER, build["context"], build["dockerfile"]))
    subprocess.run(["bash", "-n", os.path.join(DOCKER, "start.sh")], check=True)
