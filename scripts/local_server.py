"""A real `monailabel start_server` with the sam3d app on a free loopback port: for the tests and for scripts
that act through REST (scripts/simulate_session.py)."""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APP = os.path.join(ROOT, "apps", "sam3d")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(app, studies, conf, log_path, env=None, start_seconds=180):
    """`monailabel start_server` on a free loopback port; returns (process, url) once /info/ answers.

    The venv's bin folder goes first on PATH, as scripts/serve.sh does (MONAI Label looks there for tools)."""
    port = free_port()
    cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", app, "--studies", studies]
    cmd += ["--host", "127.0.0.1", "--port", str(port), *conf]
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    env = {**os.environ, "PYTHONPATH": "", "PATH": path, **(env or {})}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + start_seconds
    try:
        while True:
            try:
                urllib.request.urlopen(f"{url}/info/", timeout=5).read()
                return proc, url
            except urllib.error.HTTPError:  # up, but asking for credentials (authentication on)
                return proc, url
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"server did not start:\n{open(log_path).read()[-5000:]}") from None
                time.sleep(0.25)
    except BaseException:  # a failed start, or the caller interrupted
        stop_server(proc)
        raise


def copy_app(folder):
    """A copy of the app, so that what a server publishes or logs stays in ``folder``."""
    app = os.path.join(folder, "sam3d")
    shutil.copytree(APP, app, ignore=lambda parent, names: [n for n in names if n == "__pycache__" or (
        parent == APP and n in ("model", "logs"))])
    return app


def stop_server(proc):
    """Stop the server and what it started (MONAI Label runs training and scoring in processes of their own,
    which outlive a terminated server)."""
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for child in children:
        try:
            child.terminate()
        except psutil.NoSuchProcess:
            continue
    for child in psutil.wait_procs(children, timeout=10)[1]:  # still alive
        try:
            child.kill()
        except psutil.NoSuchProcess:
            continue
