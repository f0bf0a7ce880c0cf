"""MONAI Label's authentication switched on for sam3d: who may infer, save labels and train.

A small OpenID realm on loopback publishes an RSA public key, as Keycloak's realm endpoint does; tokens are
signed here with the private key and carry Keycloak's `realm_access.roles` claim. The server verifies them
for real (signature and expiry) and applies MONAI Label's roles to sam3d's endpoints.
"""

import base64
import http.server
import json
import os
import re
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from conftest import APP, free_port, start_server, stop_server

KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def token(*roles, expired=False):
    now = int(time.time())
    claims = {"preferred_username": "reader", "realm_access": {"roles": list(roles)}, "iat": now,
              "exp": now - 60 if expired else now + 600}
    return jwt.encode(claims, KEY, algorithm="RS256")


@pytest.fixture(scope="module")
def realm():
    public = KEY.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    body = json.dumps({"realm": "sam3d", "public_key": base64.b64encode(public).decode()}).encode()

    class Realm(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Realm)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/realms/sam3d"
    server.shutdown()


@pytest.fixture(scope="module")
def auth_server(realm, demo_studies, tiny_checkpoint, tmp_path_factory):
    studies = str(tmp_path_factory.mktemp("auth_studies"))
    shutil.copytree(demo_studies, studies, dirs_exist_ok=True)
    conf = ["--conf", "backbone", "tiny", "--conf", "sam_checkpoint", "none", "--conf", "checkpoint", tiny_checkpoint[0],
            "--conf", "warmup", "false"]
    env = {"MONAI_LABEL_AUTH_ENABLE": "true", "MONAI_LABEL_AUTH_REALM_URI": realm}
    proc, url = start_server(APP, studies, conf, str(tmp_path_factory.mktemp("logs") / "server.log"), env)
    yield url, studies
    stop_server(proc)


def call(url, method, path, bearer=None, fields=None, files=None):
    """(status, body) of a multipart request, as the clients send them."""
    boundary = "sam3dauthboundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in (fields or {}).items()]
    for name, (filename, content) in (files or {}).items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                     f"Content-Type: application/octet-stream\r\n\r\n".encode() + content + b"\r\n")
    data = b"".join(parts) + f"--{boundary}--\r\n".encode()
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    if bearer:
        headers["Authorization"] = f"Bearer {bearer}"
    request = urllib.request.Request(url + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def save_label(url, studies, bearer):
    with open(f"{studies}/labels/final/demo_ct_01.nii.gz", "rb") as f:
        label = f.read()
    return call(url, "PUT", "/datastore/label?image=demo_ct_01&tag=final", bearer,
                {"params": "{}"}, {"label": ("demo_ct_01.nii.gz", label)})


def test_without_a_valid_token_nothing_is_saved_trained_or_inferred(auth_server):
    url, studies = auth_server
    for bearer in (None, token("monailabel-admin", expired=True), "not-a-token"):
        assert save_label(url, studies, bearer)[0] == 401
        assert call(url, "POST", "/train/sam3d", bearer, {"params": "{}"})[0] == 401
        assert call(url, "POST", "/infer/sam3d?image=demo_ct_01&output=json", bearer,
                    {"params": json.dumps({"foreground": [[83, 73, 47]]})})[0] == 401


def test_roles_decide_who_may_infer_save_and_train(auth_server):
    url, studies = auth_server
    user, annotator = token("monailabel-user"), token("monailabel-user", "monailabel-annotator")
    status, body = call(url, "POST", "/infer/sam3d?image=demo_ct_01&output=json", user,
                        {"params": json.dumps({"foreground": [[83, 73, 47]]})})
    assert status == 200, body  # a user may ask for masks
    assert save_label(url, studies, user)[0] == 403  # but not save them
    assert save_label(url, studies, annotator)[0] == 200  # an annotator may
    assert call(url, "POST", "/train/sam3d", annotator, {"params": "{}"})[0] == 403  # only an admin trains


SECRET_PATTERNS = {
    "private key": re.compile(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "signed token": re.compile(rb"eyJ[\w-]{10,}\.eyJ[\w-]{10,}\.[\w-]{10,}"),
    "cloud access key": re.compile(rb"\b(AKIA[0-9A-Z]{16}|AIza[\w-]{35})\b"),
    "GitHub token": re.compile(rb"\bgh[pousr]_[A-Za-z0-9]{36}\b"),
}


def test_the_repository_holds_no_keys_or_tokens():
    """The test keys above are made at run time; nothing secret is committed."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    files = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True).stdout.split(b"\0")
    found = []
    for name in filter(None, files):
        with open(os.path.join(root, name.decode()), "rb") as f:
            text = f.read()
        found += [(name.decode(), kind) for kind, pattern in SECRET_PATTERNS.items() if pattern.search(text)]
    assert len(files) > 50 and not found, found
