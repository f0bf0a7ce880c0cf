"""The image as a user runs it: built from docker/Dockerfile by scripts/container.sh, serving the demo as a non-root
user, the README's click, a saved label, a few training steps, and a new container on the same model volume that
serves what training published. Runs only with SAM3D_CONTAINER_TEST=1 (see README: Container); needs podman (or
Docker) and, to make the Debian base image, debootstrap as root."""

import logging
import os
import resource
import shutil
import subprocess
import time
import urllib.request

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from monailabel.client import MONAILabelClient

from conftest import ROOT, free_port, inside_ellipsoid, mask_points_ras, train_and_wait
from test_readme_examples import README_URL, readme_blocks

pytestmark = [pytest.mark.container, pytest.mark.skipif(
    os.environ.get("SAM3D_CONTAINER_TEST") != "1",
    reason="the container test builds an image (minutes): set SAM3D_CONTAINER_TEST=1 to run it",
)]

logger = logging.getLogger(__name__)
IMAGE = "localhost/sam3d:latest"  # what scripts/container.sh builds and docker/compose.yaml runs
ORTHANC_IMAGE = "localhost/sam3d-orthanc:latest"
FIRST_START_SECONDS = 3600  # demo weights: about 2 minutes on 2 quiet cores, over 30 on busy ones
MODEL_DIR = "/opt/sam3d/apps/sam3d/model"


def engine_command():
    """podman (cgroupfs where no systemd manages cgroups) or Docker, whichever can run containers here."""
    if shutil.which("podman"):
        cmd = ["podman"] + ([] if os.path.isdir("/run/systemd/system") else ["--cgroup-manager", "cgroupfs"])
    elif shutil.which("docker"):
        cmd = ["docker"]
    else:
        pytest.skip("no container engine here: install podman (apt-get install podman debootstrap)")
    probe = subprocess.run([*cmd, "info"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"{cmd[0]} cannot run containers here: {probe.stderr.strip()[-300:]}")
    return cmd


def engine_run_options(engine):
    """podman's defaults ask for more open files and processes than a container manager without CAP_SYS_RESOURCE
    (this machine's sandbox) may set: ask for the host's own limits, processes no more than the kernel's pid_max
    (podman's monitor process has no more). Its health checks run on systemd timers, which only a host with
    systemd has: here they run on demand (Container.healthy)."""
    if engine[0] != "podman":
        return []
    files = resource.getrlimit(resource.RLIMIT_NOFILE)
    with open("/proc/sys/kernel/pid_max") as f:
        processes = min(resource.getrlimit(resource.RLIMIT_NPROC)[0], int(f.read()))
    options = ["--ulimit", f"nofile={files[0]}:{files[1]}", "--ulimit", f"nproc={processes}:{processes}"]
    return options + ([] if os.path.isdir("/run/systemd/system") else ["--health-interval", "disable"])


class Container:
    """A sam3d container serving on a loopback port: `start` runs one of the image with the model volume."""

    def __init__(self, engine, name, port):
        self.engine, self.name, self.port, self.url = engine, name, port, f"http://127.0.0.1:{port}"

    @classmethod
    def start(cls, engine, name, volume):
        started = cls(engine, name, free_port())
        start = time.monotonic()
        started.run("run", "-d", "--name", name, "-p", f"127.0.0.1:{started.port}:8000", "-v", f"{volume}:{MODEL_DIR}",
                    *engine_run_options(engine), IMAGE)
        started.wait_healthy(start, FIRST_START_SECONDS)
        return started

    def run(self, *args, check=True):
        result = subprocess.run([*self.engine, *args], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0 or not check, f"{args[0]}: {result.stderr[-3000:]}"
        return result

    def healthy(self):
        if self.engine[0] == "podman":  # podman runs health checks from systemd timers: here, on demand
            return self.run("healthcheck", "run", self.name, check=False).returncode == 0
        return self.run("inspect", "-f", "{{.State.Health.Status}}", self.name).stdout.strip() == "healthy"

    def wait_healthy(self, start, seconds):
        while not self.healthy():
            state = self.run("inspect", "-f", "{{.State.Status}}", self.name).stdout.strip()
            if state != "running" or time.monotonic() - start > seconds:
                raise AssertionError(f"container {state}, not healthy:\n{self.logs()[-5000:]}")
            time.sleep(2)
        logger.info(f"{self.name}: healthy {time.monotonic() - start:.0f} s after its start")

    def logs(self):
        result = self.run("logs", self.name, check=False)
        return result.stdout + result.stderr

    def exec(self, *args):
        return self.run("exec", self.name, *args).stdout.strip()

    def remove(self):
        self.run("rm", "-f", "-t", "10", self.name, check=False)


@pytest.fixture(scope="module")
def engine():
    cmd = engine_command()
    subprocess.run(["bash", os.path.join(ROOT, "scripts", "container.sh"), IMAGE], check=True, timeout=3600)
    return cmd


@pytest.fixture(scope="module")
def volume(engine):
    name = f"sam3d-test-model-{os.getpid()}"
    subprocess.run([*engine, "volume", "create", name], check=True, capture_output=True)
    yield name
    subprocess.run([*engine, "volume", "rm", "-f", name], check=True, capture_output=True)


@pytest.fixture(scope="module")
def container(engine, volume):
    """The first start on an empty volume: the entry point writes the demo studies, the app makes demo weights."""
    started = Container.start(engine, f"sam3d-test-{os.getpid()}", volume)
    yield started
    started.remove()


def test_the_server_runs_as_the_non_root_user(container):
    assert container.exec("stat", "-c", "%u", "/proc/1") == "1000"  # the server is the container's first process
    assert "demo weights are being made" in container.logs()


def test_the_readme_click_segments_the_demo_lesion(container, tmp_path):
    (block,) = [b for b in readme_blocks("bash") if "curl" in b]
    start = time.monotonic()
    subprocess.run(["bash", "-euc", block.replace(README_URL, container.url)], cwd=tmp_path, check=True, timeout=300)
    logger.info(f"the README's click through the container: {time.monotonic() - start:.2f} s")
    truth_path = "/data/studies/labels/final/demo_ct_01.nii.gz"  # the demo study's own lesion mask
    container.run("cp", f"{container.name}:{truth_path}", str(tmp_path / "truth.nii.gz"))
    mask = nib.load(tmp_path / "mask.nii.gz")
    truth = nib.load(tmp_path / "truth.nii.gz").get_fdata() > 0
    predicted = mask.get_fdata() > 0
    assert mask.shape == truth.shape
    assert 2 * (predicted & truth).sum() / (predicted.sum() + truth.sum()) >= 0.7


def test_training_publishes_into_the_volume_and_a_new_container_serves_it(engine, volume, container, tmp_path):
    client = MONAILabelClient(container.url, tmpdir=str(tmp_path))
    mask_path, _ = client.infer("sam3d", "demo_ct_01", {"foreground": [[83, 73, 47]], "background": []})
    client.save_label("demo_ct_01", mask_path, tag="final")  # the annotator accepts the mask as it is
    saved = urllib.request.urlopen(f"{container.url}/datastore/label?label=demo_ct_01&tag=final", timeout=60).read()
    (tmp_path / "saved.nii.gz").write_bytes(saved)
    assert np.array_equal(nib.load(tmp_path / "saved.nii.gz").get_fdata(), nib.load(mask_path).get_fdata())

    task = train_and_wait(client, {"steps": 4}, seconds=900)
    assert task["status"] == "DONE", task
    assert client.info()["train_stats"]["sam3d"]["steps"] == 4
    published = container.exec("sha256sum", f"{MODEL_DIR}/sam3d.pt")

    container.remove()  # nothing of the first container is left but the volume
    again = Container.start(engine, f"{container.name}-again", volume)
    try:
        assert again.exec("sha256sum", f"{MODEL_DIR}/sam3d.pt") == published
        weights = MONAILabelClient(again.url, tmpdir=str(tmp_path)).info()["models"]["sam3d"]["weights"]
        assert weights["state"] == "trained" and weights["adapters"] == f"{MODEL_DIR}/sam3d.pt (sam3d format)"
        assert "demo weights are being made" not in again.logs()  # the demo weights came from the volume too
        _, result = MONAILabelClient(again.url, tmpdir=str(tmp_path)).infer(
            "sam3d", "demo_ct_01", {"foreground": [[83, 73, 47]], "background": []}
        )
        assert "DEMO WEIGHTS" not in result.get("warning", "")
    finally:
        again.remove()



def compose_command(engine):
    """podman-compose with the options engine_run_options gives `run`, or Docker Compose; None where neither is."""
    if engine[0] == "podman":
        if not shutil.which("podman-compose"):
            return None
        return ["podman-compose", "--podman-args", " ".join(engine[1:]),
                "--podman-run-args", " ".join(engine_run_options(engine))]
    found = subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0
    return ["docker", "compose"] if found else None


def compose_container(engine, project, service):
    """The name of a compose project's container for a service (podman-compose and Docker Compose name them
    differently; both label them)."""
    in_project = ["--filter", f"label=com.docker.compose.project={project}"]
    listed = subprocess.run([*engine, "ps", "--format", "{{.Names}}", *in_project], capture_output=True, text=True)
    names = listed.stdout.split()
    label = '{{index .Config.Labels "com.docker.compose.service"}}'
    (name,) = [n for n in names if subprocess.run([*engine, "inspect", "-f", label, n], capture_output=True,
                                                   text=True).stdout.strip() == service]
    return name


def test_compose_serves_a_click_on_a_pacs_series(engine, volume, container, demo_studies, tmp_path):
    """docker/compose.yaml: Orthanc from Debian's packages and sam3d on its DICOMweb; a series uploaded to the PACS,
    a click on its lesion through the sam3d container."""
    from make_demo_studies import STUDIES
    from make_dicom_studies import series_uids, upload, write_series
    from test_dicomweb import LPS, read_series

    compose = compose_command(engine)
    if compose is None:
        pytest.skip(f"no compose for {engine[0]}: install podman-compose (apt-get install podman-compose)")
    subprocess.run(["bash", os.path.join(ROOT, "scripts", "container.sh"), ORTHANC_IMAGE, "docker/orthanc.Dockerfile"],
                   check=True, timeout=1800)
    project = f"sam3d-test-compose-{os.getpid()}"
    # The demo weights that the first container made: this start needs not make them again.
    subprocess.run([*engine, "volume", "create", f"{project}_sam3d-model"], check=True, capture_output=True)
    subprocess.run([*engine, "run", "--rm", "-v", f"{volume}:/made", "-v", f"{project}_sam3d-model:{MODEL_DIR}",
                    *engine_run_options(engine), "--entrypoint", "cp", IMAGE, "/made/sam3d_demo_tiny.pt", MODEL_DIR],
                   check=True, capture_output=True)
    sam3d_port, orthanc_port = free_port(), free_port()
    env = {**os.environ, "SAM3D_PORT": str(sam3d_port), "ORTHANC_PORT": str(orthanc_port)}
    up = [*compose, "-p", project, "-f", os.path.join(ROOT, "docker", "compose.yaml")]
    try:
        subprocess.run([*up, "up", "-d"], check=True, capture_output=True, env=env, timeout=600)
        sam3d = Container(engine, compose_container(engine, project, "sam3d"), sam3d_port)
        sam3d.wait_healthy(time.monotonic(), FIRST_START_SECONDS)

        study = STUDIES[0]
        files = write_series(os.path.join(demo_studies, f"{study.name}.nii.gz"), study.name, str(tmp_path / "dicom"))
        upload(files, f"http://127.0.0.1:{orthanc_port}/dicom-web")
        series = read_series(os.path.dirname(files[0]))
        centre, radii, _ = study.lesions[0]
        click = list(series.TransformPhysicalPointToIndex((np.asarray(centre) * LPS).tolist()))
        path, _ = MONAILabelClient(sam3d.url, tmpdir=str(tmp_path)).infer(
            "sam3d", series_uids(study.name)["series"], {"foreground": [click], "result_extension": ".nrrd"}
        )
        mask = sitk.ReadImage(path)
        assert mask.GetSize() == series.GetSize() and np.allclose(mask.GetOrigin(), series.GetOrigin(), atol=1e-3)
        assert inside_ellipsoid(mask_points_ras(mask), centre, radii).mean() > 0.6  # as in test_dicomweb.py
    finally:
        subprocess.run([*up, "down", "-v"], capture_output=True, env=env, timeout=300)
        # podman-compose 1.0.3 leaves the network, and a volume it did not create, behind
        subprocess.run([*engine, "volume", "rm", "-f", f"{project}_sam3d-model"], capture_output=True)
        subprocess.run([*engine, "network", "rm", f"{project}_default"], capture_output=True)
