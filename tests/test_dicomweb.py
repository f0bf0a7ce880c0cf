"""sam3d over a real PACS: Orthanc with its DICOMweb plugin, started here on loopback with a config written here.

The demo volumes go in as DICOM CT series (scripts/make_dicom_studies.py, uploaded with STOW-RS); MONAI Label
serves them with `--studies http://.../dicom-web`; clicks on their lesions give masks on the series' grid; a
saved final label lands in Orthanc as a DICOM-SEG that references its series and reads back voxel for voxel;
and OHIF, in headless Chromium, sends a click and shows the mask, and a background click there takes a leak off it.
"""

import io
import json
import os
import shutil
import signal
import time
import urllib.request
from concurrent.futures import Executor, Future

import numpy as np
import pydicom
import pydicom_seg
import pytest
import SimpleITK as sitk
from scipy import ndimage
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException

from conftest import APP, free_port, inside_ellipsoid, mask_points_ras, start_server, stop_server
from pacs import LPS, get_json, read_series, start_orthanc, stop_orthanc, write_orthanc_config

pytestmark = pytest.mark.pacs

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "test-artifacts")


@pytest.fixture(scope="module")
def pacs_server(orthanc, dicom_series, trained_tiny, tmp_path_factory):
    conf = ["--conf", "backbone", "tiny", "--conf", "sam_checkpoint", "none", "--conf", "checkpoint", trained_tiny,
            "--conf", "warmup", "false"]
    env = {"MONAI_LABEL_DICOMWEB_CACHE_PATH": str(tmp_path_factory.mktemp("dicomweb_cache"))}
    proc, url = start_server(APP, f"{orthanc}/dicom-web", conf, str(tmp_path_factory.mktemp("logs") / "server.log"), env)
    yield url
    stop_server(proc)


def test_the_pacs_holds_the_series_with_their_tags(orthanc, dicom_series):
    from make_dicom_studies import series_uids

    for name in dicom_series:
        found = get_json(f"{orthanc}/dicom-web/series?SeriesInstanceUID={series_uids(name)['series']}")
        assert len(found) == 1, name
        tags = found[0]
        assert tags["00080060"]["Value"] == ["CT"] and tags["00100020"]["Value"] == [name]


def test_clicks_on_a_pacs_series_give_masks_on_its_grid_over_the_lesions(pacs_server, dicom_series, tmp_path):
    from make_demo_studies import STUDIES
    from make_dicom_studies import series_uids

    client = MONAILabelClient(pacs_server, tmpdir=str(tmp_path))
    assert get_json(f"{pacs_server}/datastore/?output=stats")["total"] == len(STUDIES)
    for study in STUDIES:
        series = read_series(dicom_series[study.name])
        for centre, radii, _ in study.lesions:
            click = list(series.TransformPhysicalPointToIndex((np.asarray(centre) * LPS).tolist()))
            path, result = client.infer("sam3d", series_uids(study.name)["series"],
                                        {"foreground": [click], "background": [], "result_extension": ".nrrd"})
            mask = sitk.ReadImage(path)
            assert mask.GetSize() == series.GetSize()
            assert np.allclose(mask.GetOrigin(), series.GetOrigin(), atol=1e-3)
            assert np.allclose(mask.GetDirection(), series.GetDirection(), atol=1e-4)
            inside = inside_ellipsoid(mask_points_ras(mask), centre, radii).mean()
            assert inside > 0.6, (study.name, centre, inside)  # as in test_slicer_protocol.py (0.66 for the small one)


def test_a_saved_final_label_is_a_dicom_seg_of_its_series_that_reads_back_the_same(
    orthanc, pacs_server, dicom_series, tmp_path
):
    from make_demo_studies import STUDIES
    from make_dicom_studies import series_uids

    study = STUDIES[0]
    series_uid = series_uids(study.name)["series"]
    client = MONAILabelClient(pacs_server, tmpdir=str(tmp_path))
    series = read_series(dicom_series[study.name])
    click = list(series.TransformPhysicalPointToIndex((np.asarray(study.lesions[0][0]) * LPS).tolist()))
    path, _ = client.infer("sam3d", series_uid, {"foreground": [click], "result_extension": ".nrrd"})
    saved = sitk.GetArrayFromImage(sitk.ReadImage(path))
    assert saved.sum() > 0

    client.save_label(series_uid, path, tag="final")
    segs = [s for s in get_json(f"{orthanc}/series?expand") if s["MainDicomTags"].get("Modality") == "SEG"]
    assert len(segs) == 1
    instance = segs[0]["Instances"][0]
    with urllib.request.urlopen(f"{orthanc}/instances/{instance}/file", timeout=30) as response:
        (tmp_path / "seg.dcm").write_bytes(response.read())
    seg = pydicom.dcmread(str(tmp_path / "seg.dcm"))
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid
    assert seg.FrameOfReferenceUID == series_uids(study.name)["frame_of_reference"]
    result = pydicom_seg.SegmentReader().read(seg)
    (segment,) = result.available_segments
    read_back = sitk.Resample(result.segment_image(segment), series, sitk.Transform(), sitk.sitkNearestNeighbor)
    assert np.array_equal(sitk.GetArrayFromImage(read_back) > 0, saved > 0)


def green_pixels(png: bytes, box) -> int:
    """Pixels of a screenshot inside ``box`` where green clearly dominates (OHIF draws the segment green)."""
    from PIL import Image

    image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    x, y, w, h = (int(v) for v in (box["x"], box["y"], box["width"], box["height"]))
    r, g, b = (image[y : y + h, x : x + w, c] for c in range(3))
    return int(((g > r + 40) & (g > b + 40)).sum())


BROWSER_ARGS = ["--use-gl=swiftshader", "--enable-unsafe-swiftshader"]
# Moves a cornerstone viewport's slice through a patient (LPS) point and returns the point's page coordinates:
# what a radiologist does by scrolling to the slice and pointing at the spot.
SHOW_AND_LOCATE = """([world, viewportId]) => {
  const viewport = window.cornerstone.getEnabledElements().find(e => e.viewportId === viewportId).viewport;
  const camera = viewport.getCamera();
  const normal = camera.viewPlaneNormal;
  const along = normal.reduce((sum, n, i) => sum + n * (world[i] - camera.focalPoint[i]), 0);
  viewport.setCamera({
    focalPoint: camera.focalPoint.map((v, i) => v + along * normal[i]),
    position: camera.position.map((v, i) => v + along * normal[i]),
  });
  viewport.render();
  const [x, y] = viewport.worldToCanvas(world);
  const rect = viewport.canvas.getBoundingClientRect();
  return [rect.left + x, rect.top + y];
}"""


VIEWPORT_BOX = """(viewportId) => {
  const viewport = window.cornerstone.getEnabledElements().find(e => e.viewportId === viewportId).viewport;
  const rect = viewport.canvas.getBoundingClientRect();
  return {x: rect.left, y: rect.top, width: rect.width, height: rect.height};
}"""


def open_point_prompts(page, server, study_name):
    """OHIF (MONAI Label mode) on ``study_name`` from the PACS, its panel connected to ``server``, the point
    prompts open with the tumour segment chosen."""
    page.goto(f"{server}/ohif/", wait_until="networkidle", timeout=120_000)
    page.get_by_text("Confirm and Hide").click()
    page.get_by_text(study_name).first.click()
    page.get_by_role("button", name="MONAI Label").first.click()
    server_field = page.locator("input[value='http://127.0.0.1:8000/']")
    server_field.wait_for(timeout=120_000)
    server_field.fill(f"{server}/")
    page.locator(".actionButton").first.click()
    page.get_by_text("Point Prompts").click()
    page.get_by_text("tumor", exact=True).click()
    page.locator("canvas").first.wait_for(timeout=120_000)
    page.wait_for_timeout(3000)  # the slices stream in


def run_sam3d(page, answers, count):
    """Press the panel's Run and wait for the ``count``-th answer of /infer/sam3d and for its mask to be drawn."""
    page.get_by_role("button", name="Run").nth(1).click()
    deadline = time.time() + 120
    while len(answers) < count and time.time() < deadline:
        page.wait_for_timeout(500)
    page.wait_for_timeout(5000)
    assert len(answers) == count and answers[-1].status == 200, answers


def save_screenshot(page, name):
    os.makedirs(ARTIFACTS, exist_ok=True)
    return page.screenshot(path=os.path.join(ARTIFACTS, name))


def screenshot_once_drawn(page, name, box, at_least, seconds=60):
    """A screenshot taken once ``box`` holds more than ``at_least`` green pixels, or the last one after ``seconds``:
    OHIF draws a returned mask some time after the answer arrives, later on a busy machine."""
    deadline = time.time() + seconds
    while True:
        shot = save_screenshot(page, name)
        if green_pixels(shot, box) > at_least or time.time() > deadline:
            return shot
        page.wait_for_timeout(1000)


def request_clicks(answer):
    """The click parameters OHIF sent with an answered request (the multipart form's params field)."""
    return json.loads(answer.request.post_data.split("\r\n\r\n", 1)[1].split("\r\n", 1)[0])


@pytest.mark.browser
def test_ohif_in_a_browser_sends_a_click_on_the_lesion_and_shows_the_sam3d_mask(
    pacs_server, dicom_series, tmp_path
):
    """The OHIF bundled with MONAI Label, in headless Chromium: open the oblique study from Orthanc in the MONAI
    Label mode, connect the panel to this server, pick the tumour segment, click on the brightest blob of the
    axial viewport (the lesion) and run sam3d. The request must carry a click on the lesion, the answer must be
    a mask over it, and the viewport must show it (green pixels appear). Screenshots go to test-artifacts/."""
    from playwright.sync_api import sync_playwright
    from PIL import Image

    from make_demo_studies import STUDIES

    study = STUDIES[2]
    series = read_series(dicom_series[study.name])
    answers = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.on("response", lambda r: answers.append(r) if "/infer/sam3d" in r.url else None)
        open_point_prompts(page, pacs_server, study.name)
        box = page.locator("canvas").first.bounding_box()
        before = page.screenshot()
        gray = np.asarray(Image.open(io.BytesIO(before)).convert("L")).astype(float)
        x, y, w, h = (int(v) for v in (box["x"], box["y"], box["width"], box["height"]))
        region = gray[y : y + h, x : x + w]
        bright = np.argwhere(region >= np.percentile(region[region > 0], 99.5))
        cy, cx = bright.mean(axis=0)
        page.mouse.click(x + cx, y + cy)
        page.wait_for_timeout(1000)
        marked = page.screenshot()
        run_sam3d(page, answers, 1)
        after = screenshot_once_drawn(page, "ohif_sam3d.png", box, green_pixels(marked, box) + 50)
        params = request_clicks(answers[0])
        mask_bytes = answers[0].body()
        browser.close()

    (click,) = params["foreground"]
    ras = np.asarray(series.TransformIndexToPhysicalPoint([int(v) for v in click])) * LPS
    centre, radii, _ = study.lesions[0]
    assert inside_ellipsoid(ras, centre, radii).all(), (click, ras)  # on the lesion
    (tmp_path / "mask.nrrd").write_bytes(mask_bytes)
    mask = sitk.ReadImage(str(tmp_path / "mask.nrrd"))
    points = mask_points_ras(mask)
    assert len(points) and inside_ellipsoid(points, centre, radii).mean() > 0.7
    assert green_pixels(after, box) > green_pixels(marked, box) + 50  # the segment is drawn over the image


@pytest.fixture(scope="module")
def touching_series(orthanc, tmp_path_factory):
    """A held-out hard study whose lesion touches a vessel of its own intensity (a first click leaks into it),
    uploaded to the PACS: (name, series folder, label image)."""
    from lib.phantoms import hard_studies, write_studies
    from make_dicom_studies import upload, write_series

    study = hard_studies(4, seed=3000)[3]
    assert study.lesions[0].kind == "touching"
    folder = tmp_path_factory.mktemp("touching")
    write_studies(str(folder), studies=[study])
    files = write_series(str(folder / f"{study.name}.nii.gz"), study.name, str(folder / "dicom"))
    upload(files, f"{orthanc}/dicom-web")
    return study.name, os.path.dirname(files[0]), sitk.ReadImage(str(folder / "labels" / "final" / f"{study.name}.nii.gz"))


@pytest.fixture(scope="module")
def pacs_server_corrections(orthanc, touching_series, trained_tiny_mixed, tmp_path_factory):
    """A server on the PACS with the model trained on hard lesions as users correct them."""
    conf = ["--conf", "backbone", "tiny", "--conf", "sam_checkpoint", "none", "--conf", "checkpoint",
            trained_tiny_mixed[0], "--conf", "warmup", "false"]
    env = {"MONAI_LABEL_DICOMWEB_CACHE_PATH": str(tmp_path_factory.mktemp("dicomweb_cache_corrections"))}
    log = str(tmp_path_factory.mktemp("logs_corrections") / "server.log")
    proc, url = start_server(APP, f"{orthanc}/dicom-web", conf, log, env)
    yield url
    stop_server(proc)


@pytest.mark.browser
def test_ohif_a_background_click_on_a_leak_shrinks_the_leak_and_keeps_the_lesion(
    pacs_server_corrections, touching_series, tmp_path
):
    """A radiologist's correction in OHIF: a first foreground click at the lesion's deepest point gives a mask
    that leaks into the touching vessel; they pick the panel's background row, scroll to the leak's deepest
    point and click it, pick the tumour row again (OHIF sends the chosen row's points as foreground) and run.
    The second request must carry the first click as foreground and the click on the leak as background; its
    mask must have lost much of the leak and kept the lesion; the viewport still shows a mask."""
    from playwright.sync_api import sync_playwright

    from lib.training.simulated_user import CONNECTIVITY, interior_click

    name, _, truth = touching_series
    lesion_point = truth.TransformIndexToPhysicalPoint(
        [int(v) for v in interior_click(sitk.GetArrayFromImage(truth) > 0)[::-1]]  # the array is (k, j, i)
    )
    answers, masks = [], []

    def mask_of(answer, index):
        path = tmp_path / f"mask{index}.nrrd"
        path.write_bytes(answer.body())
        return sitk.ReadImage(str(path))

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.on("response", lambda r: answers.append(r) if "/infer/sam3d" in r.url else None)
        open_point_prompts(page, pacs_server_corrections, name)
        page.mouse.click(*page.evaluate(SHOW_AND_LOCATE, [list(lesion_point), "mpr-axial"]))
        page.wait_for_timeout(1000)
        run_sam3d(page, answers, 1)
        masks.append(mask_of(answers[0], 1))

        lesion = sitk.GetArrayFromImage(sitk.Resample(truth, masks[0], sitk.Transform(), sitk.sitkNearestNeighbor)) > 0
        first = sitk.GetArrayFromImage(masks[0]) > 0
        components, count = ndimage.label(first & ~lesion, structure=CONNECTIVITY)
        assert count, "the first mask does not leak: nothing to correct"
        leak = components == np.argmax(np.bincount(components.ravel())[1:]) + 1
        leak_point = masks[0].TransformIndexToPhysicalPoint([int(v) for v in interior_click(leak)[::-1]])

        page.get_by_text("background", exact=True).click()
        page.mouse.click(*page.evaluate(SHOW_AND_LOCATE, [list(leak_point), "mpr-axial"]))
        page.wait_for_timeout(1000)
        page.get_by_text("tumor", exact=True).click()
        page.wait_for_timeout(1000)
        run_sam3d(page, answers, 2)
        # Back to the lesion's slice: the correction may have emptied the leak's.
        page.evaluate(SHOW_AND_LOCATE, [list(lesion_point), "mpr-axial"])
        box = page.evaluate(VIEWPORT_BOX, "mpr-axial")
        after = screenshot_once_drawn(page, "ohif_sam3d_background_click.png", box, 50)
        masks.append(mask_of(answers[1], 2))
        browser.close()

    first_clicks, second_clicks = request_clicks(answers[0]), request_clicks(answers[1])
    assert second_clicks["foreground"] == first_clicks["foreground"] and len(second_clicks["background"]) == 1
    (i, j, k) = second_clicks["background"][0]
    assert leak[k, j, i], "OHIF's background click is not on the leak"
    second = sitk.GetArrayFromImage(masks[1]) > 0
    leaked_before, leaked_after = (first & ~lesion).sum(), (second & ~lesion).sum()
    # Measured with this recipe (scripts/train.py, seed 0): the leak 525 -> 278 voxels, the lesion in the mask 1036 -> 1017
    # of 1047.
    assert leaked_after <= 0.7 * leaked_before, (leaked_before, leaked_after)
    assert (second & lesion).sum() >= (first & lesion).sum() - 0.05 * lesion.sum(), "the lesion went with the leak"
    assert green_pixels(after, box) > 50  # the corrected mask is drawn


def test_a_pacs_that_is_down_or_hung_gets_a_clear_error_in_bounded_time_and_sam3d_recovers(
    demo_studies, trained_tiny, tmp_path
):
    """The PACS is down when the server starts, comes up, hangs (SIGSTOP) while a series is fetched, resumes,
    then goes away again: each request gets a 4xx/5xx that says what happened within the configured timeout
    (never a 500 or a hang), series fetched before stay usable, and no partial series is ever served."""
    from make_demo_studies import STUDIES
    from make_dicom_studies import series_uids, upload, write_series

    timeout = 5
    folder = tmp_path / "orthanc"
    folder.mkdir()
    pacs = write_orthanc_config(folder, free_port())
    cache = tmp_path / "cache"
    conf = ["--conf", "backbone", "tiny", "--conf", "sam_checkpoint", "none", "--conf", "checkpoint", trained_tiny,
            "--conf", "warmup", "false", "--conf", "dicomweb_timeout", str(timeout)]
    server, url = start_server(APP, f"{pacs}/dicom-web", conf, str(tmp_path / "server.log"),
                               {"MONAI_LABEL_DICOMWEB_CACHE_PATH": str(cache)})
    client = MONAILabelClient(url, tmpdir=str(tmp_path))
    first, second = (series_uids(s.name)["series"] for s in STUDIES[:2])
    series_folders = {}
    for study in STUDIES[:2]:
        files = write_series(os.path.join(demo_studies, f"{study.name}.nii.gz"), study.name, str(tmp_path / "dicom"))
        series_folders[series_uids(study.name)["series"]] = (study, read_series(os.path.dirname(files[0])), files)

    def click(series_uid):
        study, series, _ = series_folders[series_uid]
        ijk = list(series.TransformPhysicalPointToIndex((np.asarray(study.lesions[0][0]) * LPS).tolist()))
        started = time.time()
        try:
            path, _ = client.infer("sam3d", series_uid, {"foreground": [ijk], "result_extension": ".nrrd"})
        except MONAILabelClientException as e:
            return e, time.time() - started
        mask = sitk.ReadImage(path)
        assert mask.GetSize() == series.GetSize()
        assert inside_ellipsoid(mask_points_ras(mask), *study.lesions[0][:2]).mean() > 0.7
        return None, time.time() - started

    orthanc = None
    try:
        error, seconds = click(first)  # the PACS is not running yet
        assert error and "503" in str(error) and pacs in str(error) and seconds < timeout + 10, (error, seconds)
        assert "did not answer" in get_json(f"{url}/info/")["datastore"]["error"]  # OHIF and Slicer can connect

        orthanc = start_orthanc(folder)
        for _, _, files in series_folders.values():
            upload(files, f"{pacs}/dicom-web")
        assert click(first)[0] is None  # it is back: served

        os.kill(orthanc.pid, signal.SIGSTOP)  # hung: connections open, nothing answers
        error, seconds = click(second)
        assert error and ("503" in str(error) or "504" in str(error)) and seconds < 2 * timeout + 10, (error, seconds)
        assert click(first)[0] is None  # a series fetched before does not need the PACS
        os.kill(orthanc.pid, signal.SIGCONT)
        deadline = time.time() + 60
        while (error := click(second)[0]) is not None:  # a download cut short is retried, whole
            assert time.time() < deadline and ("503" in str(error) or "504" in str(error)), error

        for unknown in ("1.2.3.4.5", "../../etc"):
            with pytest.raises(MONAILabelClientException, match="404"):
                client.infer("sam3d", unknown, {"foreground": [[1, 1, 1]]})

        stop_orthanc(orthanc)
        orthanc = None
        assert click(first)[0] is None
        assert not list(cache.rglob(".partial-*")), "a partial download was left in the cache"
    finally:
        if orthanc:
            os.kill(orthanc.pid, signal.SIGCONT)
            stop_orthanc(orthanc)
        stop_server(server)


def test_a_series_with_a_slice_missing_or_a_damaged_slice_is_a_422_not_a_wrong_volume(
    orthanc, pacs_server, demo_studies, tmp_path
):
    from make_demo_studies import STUDIES
    from make_dicom_studies import series_uids, upload, write_series

    client = MONAILabelClient(pacs_server, tmpdir=str(tmp_path))
    source = os.path.join(demo_studies, f"{STUDIES[0].name}.nii.gz")
    gap = sorted(write_series(source, "slice_missing", str(tmp_path)))
    os.remove(gap.pop(len(gap) // 2))  # ITK would stack the rest at their average spacing
    damaged = sorted(write_series(source, "slice_damaged", str(tmp_path)))
    broken = pydicom.dcmread(damaged[len(damaged) // 2])
    broken.PixelData = broken.PixelData[: len(broken.PixelData) // 2]
    broken.save_as(damaged[len(damaged) // 2])
    for files, reason in ((gap, "unevenly spaced slices"), (damaged, "cannot be read as a volume")):
        upload(files, f"{orthanc}/dicom-web")
        name = os.path.basename(os.path.dirname(files[0]))
        with pytest.raises(MONAILabelClientException, match=f"422.*{reason}"):
            client.infer("sam3d", series_uids(name)["series"], {"foreground": [[40, 40, 10]]})


class RunAtOnce(Executor):
    """Runs each task in the caller's thread: the download is over before ``submit`` returns."""

    def submit(self, fn, *args, **kwargs):
        future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as e:
            future.set_exception(e)
        return future


@pytest.mark.timeout(60)
def test_a_download_over_before_its_bookkeeping_is_set_up_is_unreachable_and_is_retried(tmp_path):
    """A download that fails at once (connection refused) may finish before the request registers it; that once
    deadlocked the server (found by the test above, in a full run). Running downloads at once makes it certain."""
    from lib.dicomweb import DICOMwebStudies, bounded_client
    from lib.errors import Unreachable

    pacs = f"http://127.0.0.1:{free_port()}/dicom-web"  # nothing listens there
    studies = DICOMwebStudies(bounded_client(pacs, 5), timeout=5, search_filter={"Modality": "CT"},
                              cache_path=str(tmp_path))
    studies._downloader = RunAtOnce()
    for _ in range(2):  # the failed download is forgotten, so the second click tries again
        with pytest.raises(Unreachable, match=pacs):
            studies.get_image_uri("1.2.3.4")
    assert not studies._downloads
