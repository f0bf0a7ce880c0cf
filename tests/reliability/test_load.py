"""Many users at once: 8 clients click concurrently for a bounded time, 7 on images of their own and 2 on the
same one. Every answer must equal the answer to the same request served alone, none may fail, and the
server's memory (with its child processes) must stay under a bound set by its cache settings.

The CI run lasts SAM3D_LOAD_SECONDS (default 20 s); the long run is the same test with a larger value, e.g.
`SAM3D_LOAD_SECONDS=600 bash scripts/test.sh tests/reliability -k load` (figures: docs/reliability.md).
"""

import hashlib
import os
import random
import shutil
import threading
import time

import psutil
import pytest
from monailabel.client import MONAILabelClient

from conftest import APP, start_server, stop_server

CLICKS = {  # (i, j, k) voxels inside a lesion of each demo study, and nearby ones for refinement clicks
    "demo_ct_01": [[83, 73, 47], [80, 75, 47], [85, 70, 49]],
    "demo_ct_02_aniso": [[17, 63, 93], [18, 62, 95], [16, 65, 92]],
    "demo_ct_03_oblique": [[37, 83, 44], [38, 81, 45], [36, 84, 43]],
}
CLIENTS = 8
CACHE_MB, VOLUME_CACHE_MB = 64, 256
# The bound (docs/reliability.md): the server at rest after the expected answers, plus the caches' budgets,
# plus room for pre-processing a volume per concurrent request.
MEMORY_BOUND_GIB = 4.0


@pytest.fixture(scope="module")
def load_server(demo_studies, tiny_checkpoint, tmp_path_factory):
    studies = str(tmp_path_factory.mktemp("load_studies"))
    shutil.copytree(demo_studies, studies, dirs_exist_ok=True)
    for copy in range(1, 3):  # nine images: each of 7 clients gets its own
        for name in CLICKS:
            shutil.copy(f"{studies}/{name}.nii.gz", f"{studies}/{name}_copy{copy}.nii.gz")
    conf = ["--conf", "backbone", "tiny", "--conf", "sam_checkpoint", "none", "--conf", "checkpoint",
            tiny_checkpoint[0], "--conf", "warmup", "false", "--conf", "cache_mb", str(CACHE_MB),
            "--conf", "volume_cache_mb", str(VOLUME_CACHE_MB)]
    proc, url = start_server(APP, studies, conf, str(tmp_path_factory.mktemp("logs") / "server.log"))
    yield url, proc
    stop_server(proc)


def requests_of(image):
    """The requests a client sends on one image: a first click, then refinements with more clicks."""
    clicks = CLICKS[image.split("_copy")[0]]
    return [{"foreground": clicks[:n], "background": []} for n in (1, 2, 3)]


def digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def rss_with_children(proc):
    process = psutil.Process(proc.pid)
    total = 0
    for p in [process, *process.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def test_eight_clients_at_once_get_the_answers_they_would_get_alone(load_server, tmp_path):
    url, proc = load_server
    images = [f"{name}{suffix}" for suffix in ("", "_copy1", "_copy2") for name in CLICKS][:CLIENTS - 1]
    assignment = images + [images[0]]  # two clients on the same image
    client = MONAILabelClient(url, tmpdir=str(tmp_path))
    alone = {}
    for image in images:  # each request served alone first: the expected answers
        for i, params in enumerate(requests_of(image)):
            path, _ = client.infer("sam3d", image, {**params, "result_extension": ".nrrd"})
            alone[image, i] = digest(path)

    at_rest = rss_with_children(proc)
    seconds = float(os.environ.get("SAM3D_LOAD_SECONDS", "20"))
    stop = time.time() + seconds
    results, errors, peak = [], [], [0]

    def user(index, image):
        rng = random.Random(index)
        me = MONAILabelClient(url, tmpdir=str(tmp_path / f"client{index}"))
        os.makedirs(tmp_path / f"client{index}", exist_ok=True)
        while time.time() < stop:
            i = rng.randrange(3)
            try:
                path, _ = me.infer("sam3d", image, {**requests_of(image)[i], "result_extension": ".nrrd"})
                results.append((image, i, digest(path)))
                os.remove(path)
            except Exception as e:  # every failure is reported below
                errors.append(f"{image}: {e!r}")

    def watch():
        while time.time() < stop:
            peak[0] = max(peak[0], rss_with_children(proc))
            time.sleep(0.2)

    threads = [threading.Thread(target=user, args=(n, image)) for n, image in enumerate(assignment)]
    threads.append(threading.Thread(target=watch))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=seconds + 600)

    wrong = [(image, i) for image, i, h in results if h != alone[image, i]]
    print(f"\nload: {CLIENTS} clients, {seconds:.0f} s, {len(results)} answers, {len(errors)} failures, "
          f"{len(wrong)} different from alone, server memory at rest {at_rest / 2**30:.2f} GiB, "
          f"peak {peak[0] / 2**30:.2f} GiB")
    assert not errors, errors[:5]
    assert not wrong, wrong[:5]
    assert len(results) >= CLIENTS  # every client got answers
    assert peak[0] < MEMORY_BOUND_GIB * 2**30, peak[0] / 2**30
