"""An HTTP load balancer in front of several sam3d servers: nginx (Debian's `nginx-light`, or the official image),
configured here so that one configuration is used everywhere (docker/nginx.conf is this script's output).

    .venv/bin/python scripts/balancer.py --listen 127.0.0.1:8000 --trainer 127.0.0.1:8001 --replica 127.0.0.1:8002
    .venv/bin/python scripts/balancer.py --listen 80 --trainer sam3d-1:8000 --replica sam3d-2:8000 --print

The first form runs nginx in the foreground (Ctrl-C stops it) with its configuration, logs and temporary files in
a folder of its own; --print writes the configuration only. What the configuration does:

- Requests about one image (the `image` query parameter of /infer/, /datastore/ ...) go to one server, chosen by
  consistent hashing on the image id, so that refinement clicks find the crops' encodings in that server's cache
  (adding or removing a server moves only its share of the images). Each answer names its server in the
  `X-Sam3d-Upstream` header.
- A server that refuses the connection, drops it or answers 502-504 is skipped: the request (POST and PUT too:
  a click and a label save can be repeated safely) is retried once on the next server, which answers it the
  same since every click request carries all its prompts; the failed server is rested for 30 s.
- /train/ goes to the trainer (the server started without `--conf trainer`).
- Host and Origin pass through unchanged, so that each server's browser guard judges the browser's request.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from typing import List, Optional

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
# How long a failed server is skipped before it is tried again, and how long one answer may take (a first click
# of the paper configuration on a CPU takes minutes; a label upload of a large series too).
REST_SECONDS, ANSWER_SECONDS = 30, 3600


def server_address(text: str) -> str:
    """host:port of a server, from host:port or http://host:port[/]."""
    address = text.strip().removeprefix("http://").rstrip("/")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or "/" in address:
        raise argparse.ArgumentTypeError(f"{text!r} is not host:port (or http://host:port)")
    return address


def nginx_config(
    listen: str, trainer: str, replicas: List[str], workdir: Optional[str] = None, temporary: Optional[str] = None
) -> str:
    """nginx's configuration: ``listen`` (port or address:port) in front of ``trainer`` and ``replicas``
    (host:port). With ``workdir``, the pid file, logs and temporary files (in ``temporary`` if given) go there (a
    loopback run); without, nginx's defaults (a container)."""
    servers = "\n".join(
        f"        server {address} max_fails=1 fail_timeout={REST_SECONDS}s;" for address in [trainer, *replicas]
    )
    if workdir:
        files = f"pid {workdir}/nginx.pid;\nerror_log {workdir}/error.log warn;\n"
        temporary = "".join(f"    {kind}_temp_path {temporary or workdir}/{kind};\n"
                            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        access = f"    access_log {workdir}/access.log sam3d;\n"
    else:  # Debian's nginx package: its workers' user owns /var/lib/nginx; logs to the container's output
        files = "user www-data;\nerror_log stderr warn;\n"
        temporary, access = "", "    access_log /dev/stdout sam3d;\n"
    return f"""# sam3d behind nginx: written by scripts/balancer.py ({' '.join(['--listen', listen, '--trainer', trainer,
    *[a for r in replicas for a in ('--replica', r)]])})
{files}worker_processes 1;
events {{
    worker_connections 1024;
}}
http {{
{temporary}    log_format sam3d '$remote_addr "$request" $status upstream=$upstream_addr ($upstream_status) '
                     '$request_time s';
{access}    # Uploads of images and labels have no size limit here (the servers check them).
    client_max_body_size 0;
    proxy_http_version 1.1;
    proxy_set_header Host $http_host;
    proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
    proxy_connect_timeout 5s;
    proxy_read_timeout {ANSWER_SECONDS}s;
    proxy_send_timeout {ANSWER_SECONDS}s;
    # Repeat a request on the next server when its server fails before answering; clicks and label saves can
    # be repeated (non_idempotent: POST and PUT too), at most once.
    proxy_next_upstream error timeout http_502 http_503 http_504 non_idempotent;
    proxy_next_upstream_tries 2;
    add_header X-Sam3d-Upstream $upstream_addr always;

    upstream sam3d {{
        # One image's requests to one server (its cache holds the image's crops' encodings).
        hash $arg_image consistent;
{servers}
    }}
    upstream sam3d_trainer {{
        server {trainer};
    }}
    server {{
        listen {listen};
        location / {{
            proxy_pass http://sam3d;
        }}
        location /train/ {{
            proxy_pass http://sam3d_trainer;
            proxy_next_upstream off;
        }}
    }}
}}
"""


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", default="127.0.0.1:8000", help="port or address:port (default 127.0.0.1:8000)")
    parser.add_argument("--trainer", type=server_address, required=True,
                        help="host:port of the server that trains (also serves clicks)")
    parser.add_argument("--replica", type=server_address, action="append", default=[],
                        help="host:port of another server (started with --conf trainer); repeat for more")
    parser.add_argument("--print", action="store_true", help="write the configuration to stdout and exit")
    parser.add_argument("--workdir", help="folder for the configuration, logs and temporary files "
                                          "(default: a new one under the system's temporary folder)")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.print:
        sys.stdout.write(nginx_config(args.listen, args.trainer, args.replica))
        return 0
    workdir = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="sam3d-balancer-"))
    os.makedirs(workdir, exist_ok=True)
    temporary = None
    if os.geteuid() == 0:
        # Started as root, nginx's workers run as `nobody`, which must reach and write the temporary files of
        # large uploads: a folder of their own under the system's temporary folder.
        temporary = tempfile.mkdtemp(prefix="sam3d-balancer-uploads-")
        os.chmod(temporary, 0o777)
    config = os.path.join(workdir, "nginx.conf")
    with open(config, "w") as f:
        f.write(nginx_config(args.listen, args.trainer, args.replica, workdir, temporary))
    if not os.path.exists(NGINX):
        raise SystemExit("nginx is needed: apt-get install nginx-light (scripts/test.sh does)")
    checked = subprocess.run([NGINX, "-t", "-q", "-c", config, "-e", f"{workdir}/error.log"],
                             capture_output=True, text=True)
    if checked.returncode:
        raise SystemExit(f"nginx refused {config}:\n{checked.stderr}")
    print(f"sam3d balancer on {args.listen}: {config}, logs in {workdir}", flush=True)
    os.execv(NGINX, [NGINX, "-c", config, "-e", f"{workdir}/error.log", "-g", "daemon off;"])


if __name__ == "__main__":
    sys.exit(main())
