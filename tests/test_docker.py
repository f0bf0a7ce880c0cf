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


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "orthanc.Dockerfile", "balancer.Dockerfile"])
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
    assert rules[0] == "*" and included == {"requirements.txt", "apps", "scripts", "docker/start.sh", "docker/orthanc.json",
                                           "docker/nginx.conf"}
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


def balancer_config(*args):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "balancer.py"), *args, "--print"],
                          capture_output=True, text=True, check=True)
    return done.stdout


def test_the_scaled_compose_puts_two_replicas_on_one_pacs_and_one_model_volume_behind_the_balancer():
    with open(os.path.join(DOCKER, "compose.scale.yml")) as f:
        services = yaml.safe_load(f)["services"]
    replicas = {name: service for name, service in services.items() if name.startswith("sam3d-")}
    assert sorted(replicas) == ["sam3d-1", "sam3d-2"]
    for name, service in replicas.items():
        assert service["environment"]["SAM3D_STUDIES"] == "http://orthanc:8042/dicom-web"
        assert "sam3d-model:/opt/sam3d/apps/sam3d/model" in service["volumes"]
        assert "ports" not in service  # reached through the balancer only
    assert "SAM3D_CONF" not in replicas["sam3d-1"]["environment"]  # the trainer
    assert replicas["sam3d-2"]["environment"]["SAM3D_CONF"] == "--conf trainer http://sam3d-1:8000"
    assert services["balancer"]["ports"] == ["127.0.0.1:${SAM3D_PORT:-8000}:8000"]
    # The balancer's configuration is scripts/balancer.py's, for these replicas.
    with open(os.path.join(DOCKER, "nginx.conf")) as f:
        assert f.read() == balancer_config("--listen", "8000", "--trainer", "sam3d-1:8000", "--replica", "sam3d-2:8000")


def test_the_kubernetes_manifests_pass_kubernetes_schemas_and_carry_the_balancers_configuration():
    path = os.path.join(DOCKER, "k8s", "sam3d.yaml")
    tools = os.path.join(ROOT, ".venv", "tools")  # scripts/setup.sh installs the validator there, apart
    result = subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", path], capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": tools})
    assert result.returncode == 0 and result.stdout.count("passed") == 9, result.stdout + result.stderr
    with open(path) as f:
        documents = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(f)}
    config = documents[("ConfigMap", "sam3d-balancer")]["data"]["nginx.conf"]
    assert config == balancer_config("--listen", "8000", "--trainer", "sam3d-0.sam3d:8000",
                                     "--replica", "sam3d-1.sam3d:8000")
    replicas = documents[("StatefulSet", "sam3d")]["spec"]
    assert replicas["replicas"] == 2 and replicas["serviceName"] == "sam3d"
    volumes = replicas["template"]["spec"]["volumes"]
    assert volumes == [{"name": "model", "persistentVolumeClaim": {"claimName": "sam3d-model"}}]
    assert documents[("PersistentVolumeClaim", "sam3d-model")]["spec"]["accessModes"] == ["ReadWriteMany"]
    # The start command: sam3d-0 trains, the others name it.
    command = " ".join(replicas["template"]["spec"]["containers"][0]["args"])
    for hostname, trainer in (("sam3d-0", False), ("sam3d-1", True)):
        shown = subprocess.run(["bash", "-c", command.replace("docker/start.sh", """-c 'echo "$SAM3D_CONF"'""")],
                               env={"HOSTNAME": hostname, "SAM3D_ALLOWED_HOSTS": "example"}, capture_output=True,
                               text=True, check=True).stdout
        assert ("--conf trainer http://sam3d-0.sam3d:8000" in shown) == trainer and "allowed_hosts example" in shown
