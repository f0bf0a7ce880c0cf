"""A server started as the README starts it, probed as a web page in the radiologist's browser would probe it:
foreign origins, requests that need no preflight, a rebound DNS name, and a full disk. Real servers on loopback;
a real Chromium for the page on another origin and the rebound name."""

import json
import os
import shutil
import subprocess
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from monailabel.client import MONAILabelClient

from conftest import APP, free_port, start_server, stop_server

FOREIGN = "https://attacker.example"


def call(url, path, method="GET", headers=None, body=None, content_type=None):
    """(status, headers, text) of a raw HTTP request, as a browser would send it with the given headers."""
    headers = dict(headers or {})
    if content_type:
        headers["Content-Type"] = content_type
    request = urllib.request.Request(f"{url}{path}", data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, dict(response.headers), response.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read().decode(errors="replace")


def multipart(params):
    boundary = "sam3dsecurityboundary"
    body = f'--{boundary}\r\nContent-Disposition: form-data; name="params"\r\n\r\n{json.dumps(params)}\r\n--{boundary}--\r\n'
    return body.encode(), f"multipart/form-data; boundary={boundary}"


def allow_headers(headers):
    return {k.lower(): v for k, v in headers.items() if k.lower().startswith("access-control-allow")}


def stored(studies):
    """Every file of a datastore folder with its bytes' size: what a refused request must leave as it was."""
    return {os.path.relpath(os.path.join(d, f), studies): os.path.getsize(os.path.join(d, f))
            for d, _, files in os.walk(studies) for f in files if not f.startswith(".")}


@pytest.mark.parametrize("path", ["/info/", "/datastore/image?image=demo_ct_01", "/datastore/dataset?output=dataset",
                                  "/datastore/label?label=demo_ct_01&tag=final"])
def test_a_foreign_page_cannot_read_patient_data(server, path):
    url, _, _ = server
    status, headers, body = call(url, path, headers={"Origin": FOREIGN})
    assert status == 403 and not allow_headers(headers), (status, headers)
    assert "cors_origins" in json.loads(body)["detail"]


@pytest.mark.parametrize("method, path", [("DELETE", "/datastore/image?id=demo_ct_01"), ("PUT", "/datastore/label?image=demo_ct_01"),
                                          ("POST", "/infer/sam3d?image=demo_ct_01")])
def test_a_foreign_preflight_gets_no_allow_headers(server, method, path):
    url, _, _ = server
    status, headers, _ = call(url, path, "OPTIONS", {"Origin": FOREIGN, "Access-Control-Request-Method": method,
                                                      "Access-Control-Request-Headers": "content-type"})
    assert status >= 400 and not allow_headers(headers), (status, headers)


def test_requests_that_need_no_preflight_are_refused_whatever_their_content_type(server):
    """A form post that would store a label, and text/plain bodies that would start training and batch
    inference: each refused with 403, nothing stored, nothing started."""
    url, studies, _ = server
    before = stored(studies)
    body, content_type = multipart({"foreground": [[83, 73, 47]], "save_label": True})
    probes = [
        ("/infer/sam3d?image=demo_ct_01&output=json", body, content_type),
        ("/train/sam3d", b'{"max_epochs": 1}', "text/plain"),
        ("/batch/infer/sam3d", b'{"images": "all"}', "text/plain"),
        ("/scoring/dice", b"", "application/x-www-form-urlencoded"),
        ("/session/", b"", "multipart/form-data; boundary=x"),
    ]
    for path, data, kind in probes:
        status, headers, text = call(url, path, "POST", {"Origin": FOREIGN}, data, kind)
        assert status == 403 and not allow_headers(headers), (path, status, text)
    assert stored(studies) == before


def test_a_cross_site_request_without_an_origin_is_still_refused_but_a_plain_client_is_not(server):
    url, _, _ = server
    body, content_type = multipart({"foreground": [[83, 73, 47]]})
    status, _, _ = call(url, "/infer/sam3d?image=demo_ct_01&output=json", "POST", {"Sec-Fetch-Site": "cross-site"},
                        body, content_type)
    assert status == 403
    status, _, text = call(url, "/infer/sam3d?image=demo_ct_01&output=json", "POST", {}, body, content_type)
    assert status == 200, text  # curl, scripts, Slicer: no Origin, no fetch metadata


def test_the_servers_own_pages_keep_working(server):
    """OHIF is served from the server's own origin: its requests carry that origin (on writes too)."""
    url, _, _ = server
    assert call(url, "/info/", headers={"Origin": url})[0] == 200
    localhost = url.replace("127.0.0.1", "localhost")
    assert call(localhost, "/info/", headers={"Origin": localhost})[0] == 200
    body, content_type = multipart({"foreground": [[83, 73, 47]]})
    status, _, text = call(url, "/infer/sam3d?image=demo_ct_01&output=json", "POST",
                           {"Origin": url, "Sec-Fetch-Site": "same-origin"}, body, content_type)
    assert status == 200, text
    assert call(url, "/info/", headers={"Origin": "null"})[0] == 403  # a sandboxed frame or a file:// page


@pytest.mark.parametrize("host", ["rebound.attacker.example:8000", "attacker.example", "127.0.0.1.attacker.example",
                                  "[::2]:8000", "localhost:8000@x", "localhost.:x"])
def test_a_foreign_host_name_is_refused_naming_the_setting(server, host):
    url, _, _ = server
    for path in ("/info/", "/datastore/image?image=demo_ct_01"):
        status, _, body = call(url, path, headers={"Host": host})
        assert status == 421 and "allowed_hosts" in json.loads(body)["detail"], (host, status, body)


def test_the_python_client_and_an_empty_result_extension_work_as_before(server, tmp_path):
    """MONAILabelClient sends no Origin; its empty result_extension means the default (NIfTI)."""
    url, _, _ = server
    client = MONAILabelClient(url, tmpdir=str(tmp_path))
    assert "sam3d" in client.info()["models"]
    path, _ = client.infer("sam3d", "demo_ct_01", {"foreground": [[83, 73, 47]], "result_extension": ""})
    assert path.endswith(".nii.gz")


PAGE = """<!doctype html><title>running</title><script>
const target = "%s";
async function probe() {
  const out = {};
  try { const r = await fetch(target + "/datastore/image?image=demo_ct_01"); out.read = r.status; }
  catch (e) { out.read = "blocked"; }
  try {
    const form = new FormData();
    form.append("params", JSON.stringify({foreground: [[83, 73, 47]], save_label: true}));
    const r = await fetch(target + "/infer/sam3d?image=demo_ct_01&output=json", {method: "POST", body: form, mode: "no-cors"});
    out.write = r.type;
  } catch (e) { out.write = "blocked"; }
  document.title = JSON.stringify(out);
}
probe();
</script>"""


def chromium(tmp_path):
    path = shutil.which("chromium") or "/usr/bin/chromium"
    if not os.path.exists(path):
        pytest.skip("no chromium (scripts/test.sh installs Debian's)")
    return path


@pytest.mark.browser
def test_in_chromium_a_page_on_another_origin_can_neither_read_nor_write(server, tmp_path):
    """A page served from another loopback origin fetches a patient's image and posts a click that would store a
    label: the read fails in the browser, the post is refused by the server, and nothing is stored."""
    from playwright.sync_api import sync_playwright

    url, studies, _ = server
    executable = chromium(tmp_path)
    page_html = (PAGE % url).encode()

    class Page(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(page_html)

        def log_message(self, *args):
            pass

    attacker = ThreadingHTTPServer(("127.0.0.1", free_port()), Page)
    threading.Thread(target=attacker.serve_forever, daemon=True).start()
    before = stored(studies)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=executable)
            page = browser.new_page()
            page.goto(f"http://localhost:{attacker.server_address[1]}/")
            page.wait_for_function("document.title !== 'running'", timeout=60_000)
            outcome = json.loads(page.title())
            browser.close()
    finally:
        attacker.shutdown()
    assert outcome["read"] == "blocked", outcome
    assert outcome["write"] in ("opaque", "blocked"), outcome  # a no-cors post: the page never sees the answer
    assert stored(studies) == before  # and the server did not store the label


@pytest.mark.browser
def test_in_chromium_a_rebound_dns_name_gets_nothing(server, tmp_path):
    """A name of the attacker's that resolves to 127.0.0.1 (Chromium's resolver rules play the rebound DNS):
    the page on that name reads nothing of the server."""
    from playwright.sync_api import sync_playwright

    url, _, _ = server
    executable = chromium(tmp_path)
    port = url.rsplit(":", 1)[1]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable,
                                             args=["--host-resolver-rules=MAP rebound.attacker.test 127.0.0.1"])
        page = browser.new_page()
        response = page.goto(f"http://rebound.attacker.test:{port}/info/")
        status, text = response.status, page.content()
        browser.close()
    assert status == 421 and "allowed_hosts" in text and "sam3d" not in text.split("allowed_hosts")[0][-200:]


@pytest.fixture(scope="module")
def small_disk(tmp_path_factory):
    """A 24 MiB tmpfs for the studies (root only: skipped where the machine cannot mount one)."""
    folder = str(tmp_path_factory.mktemp("small_disk"))
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", folder], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or 'not root'})")
    yield folder
    subprocess.run(["umount", "-l", folder], check=False)


@pytest.fixture(scope="module")
def configured_server(tmp_path_factory, demo_studies, tiny_checkpoint, small_disk):
    """A server whose studies live on a small disk, with a listed origin and a host name added by conf."""
    shutil.copy(os.path.join(demo_studies, "demo_ct_01.nii.gz"), small_disk)
    conf = ["--conf", "backbone", "tiny", "--conf", "sam_checkpoint", "none", "--conf", "checkpoint", tiny_checkpoint[0],
            "--conf", "follow_max_extent", "1", "--conf", "cors_origins", "http://viewer.example:3000",
            "--conf", "allowed_hosts", "sam3d.example.org"]
    proc, url = start_server(APP, small_disk, conf, str(tmp_path_factory.mktemp("logs") / "server.log"))
    yield url, small_disk
    stop_server(proc)


def test_a_listed_origin_and_a_listed_host_name_are_served(configured_server):
    url, _ = configured_server
    status, headers, _ = call(url, "/info/", headers={"Origin": "http://viewer.example:3000"})
    assert status == 200 and allow_headers(headers)["access-control-allow-origin"] == "http://viewer.example:3000"
    status, headers, _ = call(url, "/datastore/label?image=demo_ct_01", "OPTIONS",
                              {"Origin": "http://viewer.example:3000", "Access-Control-Request-Method": "PUT"})
    assert status == 200 and "PUT" in allow_headers(headers)["access-control-allow-methods"]
    assert call(url, "/info/", headers={"Origin": "http://viewer.example:3001"})[0] == 403
    assert call(url, "/info/", headers={"Host": "sam3d.example.org:8000"})[0] == 200
    assert call(url, "/info/", headers={"Host": "other.example.org:8000"})[0] == 421


def fill(folder):
    """Fill the disk to its last bytes; returns the filler's path."""
    path = os.path.join(folder, ".filler")
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        for size in (2**20, 2**12, 1):
            try:
                while True:
                    os.write(descriptor, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(descriptor)
    return path


def test_a_full_disk_is_a_507_that_stores_nothing_and_the_server_recovers(configured_server, tmp_path):
    url, studies = configured_server
    rng = np.random.default_rng(0)
    noise = tmp_path / "noise.nii.gz"  # a valid image that does not compress: it needs room on the disk
    import nibabel as nib

    nib.save(nib.Nifti1Image(rng.normal(size=(64, 64, 64)).astype(np.float32), np.eye(4)), str(noise))
    filler = fill(studies)
    try:
        before = stored(studies)
        body = noise.read_bytes()
        boundary = "fullboundary"
        upload = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="noise.nii.gz"\r\n'
                  f"Content-Type: application/gzip\r\n\r\n").encode() + body + f"\r\n--{boundary}--\r\n".encode()
        status, _, text = call(url, "/datastore/image?image=noise", "PUT", {}, upload, f"multipart/form-data; boundary={boundary}")
        assert status == 507 and "disk is full" in json.loads(text)["detail"] and "nothing was stored" in text, (status, text)
        label, kind = multipart({"foreground": [[83, 73, 47]], "save_label": True})
        status, _, text = call(url, "/infer/sam3d?image=demo_ct_01&output=json", "POST", {}, label, kind)
        assert status == 507, (status, text)
        assert stored(studies) == before  # nothing half-written left behind
        assert call(url, "/info/")[0] == 200  # the server answers the next request
    finally:
        os.remove(filler)
    status, _, text = call(url, "/datastore/image?image=noise", "PUT", {}, upload, f"multipart/form-data; boundary={boundary}")
    assert status == 200, text  # space came back: the same upload is stored
