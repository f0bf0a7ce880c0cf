"""What a server on a workstation owes the web pages its user opens: nothing.

A page on any site can send requests to ``http://127.0.0.1:8000`` from the radiologist's browser. MONAI Label
0.8.5 answers every origin with CORS allow headers and credentials (its default list is ``*``), and the browser
sends forms, ``text/plain`` and multipart bodies without asking first; a rebound DNS name that points at 127.0.0.1
reaches the server as a name of the attacker's. So, before anything else sees a request:

- **Host names**: it is served only for a host name the server answers to: the loopback names, the address the
  connection arrived on (an IP literal: what ``--host`` bound), and ``--conf allowed_hosts``; others get a 421.
- **Origins**: a request that carries a browser ``Origin`` is served only from the server's own origin (OHIF at
  ``/ohif/``) or an origin listed in ``--conf cors_origins`` or MONAI Label's ``MONAI_LABEL_CORS_ORIGINS``; others
  get a 403, whatever the method or content type (preflights included: no allow headers). A state-changing request
  whose fetch metadata says it is cross-site is refused even without an ``Origin``. Clients that are not browsers
  (Slicer, scripts, ``curl``, ``MONAILabelClient``) send no ``Origin`` and are unaffected.
- **A full disk**: a request that runs out of space while storing answers 507, saying that nothing was stored (the
  datastore writes into a temporary file that is renamed into place only when whole, and removed on failure).

CORS allow headers go to the listed origins only (Starlette's middleware, given the list); the own origin needs
none.
"""

import errno
import ipaddress
import json
import logging
import re
from typing import Iterable, List, Optional, Sequence, Tuple
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger(__name__)

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
SAFE_METHODS = ("GET", "HEAD")
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def origin_of(url: str) -> str:
    """``scheme://host[:port]`` in lower case, the default port dropped, as browsers send ``Origin``."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/") or parts.query:
        raise ValueError(f"{url!r} is not an origin (scheme://host[:port], nothing after it)")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    default = {"http": 80, "https": 443}[parts.scheme]
    port = "" if parts.port in (None, default) else f":{parts.port}"
    return f"{parts.scheme}://{host.lower()}{port}"


def parse_origins(text: str) -> Tuple[str, ...]:
    """A comma-separated list of origins (``--conf cors_origins``), each checked and normalised."""
    return tuple(origin_of(item) for item in text.split(",") if item.strip())


def parse_hosts(text: str) -> Tuple[str, ...]:
    """A comma-separated list of host names or addresses (``--conf allowed_hosts``), without ports."""
    hosts = []
    for item in (part.strip().lower() for part in text.split(",")):
        if not item:
            continue
        name = item[1:-1] if item.startswith("[") and item.endswith("]") else item
        if not name or any(c in name for c in "/@ *?#") or (":" in name and not is_ip(name)):
            raise ValueError(f"{item!r} is not a host name or address (no port, scheme or wildcard)")
        hosts.append(name)
    return tuple(hosts)


def is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


HOST_NAME = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*\.?")


def host_name(host_header: str) -> Optional[str]:
    """The name of a ``Host`` header (``name[:port]`` or ``[v6][:port]``), lower case; None if malformed."""
    host = host_header.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        rest = host[end + 1:]
        if end > 0 and is_ip(host[1:end]) and (rest == "" or (rest[0] == ":" and rest[1:].isdigit())):
            return host[1:end]
        return None
    name, _, port = host.partition(":")
    if (port and not port.isdigit()) or not HOST_NAME.fullmatch(name):
        return None
    return name.rstrip(".")


def header(scope: Scope, name: bytes) -> Optional[str]:
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return None


class BrowserGuard:
    """Pure ASGI middleware (see the module's docstring); ``allowed_origins`` are normalised origins."""

    def __init__(self, app: ASGIApp, allowed_hosts: Iterable[str] = (), allowed_origins: Iterable[str] = ()) -> None:
        self.app = app
        self.allowed_hosts = set(LOOPBACK_NAMES) | set(allowed_hosts)
        self.allowed_origins = set(allowed_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self.refusal(scope)
        if refusal:
            status, detail = refusal
            logger.warning(f"refused {scope['method']} {scope['path']}: {detail}")
            await respond(send, status, detail)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except OSError as e:
            if e.errno not in DISK_FULL or started:
                raise
            logger.error(f"{scope['method']} {scope['path']}: the disk is full ({e.strerror})")
            await respond(send, 507, "the server's disk is full: nothing was stored; free some space and try again")

    def refusal(self, scope: Scope) -> Optional[Tuple[int, str]]:
        host = header(scope, b"host")
        name = host_name(host) if host is not None else None
        if host is not None and (name is None or not self.host_allowed(name, scope)):
            return 421, (f"this server does not answer to the host name {host!r}; an administrator can add it with "
                         "--conf allowed_hosts (a browser that reached the server under a foreign name may be "
                         "a DNS-rebinding attack)")
        origin = header(scope, b"origin")
        if origin is not None and not self.origin_allowed(origin, host):
            return 403, (f"requests from the web page at {origin!r} are refused: only the server's own pages and the "
                         "origins listed with --conf cors_origins (or MONAI_LABEL_CORS_ORIGINS) may use it from a browser")
        site = header(scope, b"sec-fetch-site")
        if origin is None and scope["method"] not in SAFE_METHODS and site in ("cross-site", "same-site"):
            return 403, "a state-changing request from another site's page is refused (Sec-Fetch-Site: " + site + ")"
        return None

    def host_allowed(self, name: str, scope: Scope) -> bool:
        if name in self.allowed_hosts:
            return True
        # The address the connection arrived on, written as an IP literal: the server bound to it (--host).
        server = scope.get("server")
        return bool(server) and is_ip(name) and ipaddress.ip_address(name) == ipaddress.ip_address(server[0])

    def origin_allowed(self, origin: str, host: Optional[str]) -> bool:
        try:
            origin = origin_of(origin)
        except ValueError:  # "null" (sandboxed frames, file:// pages) and anything malformed
            return False
        if origin in self.allowed_origins:
            return True
        if host is None:
            return False
        own = (origin_of(f"http://{host}"), origin_of(f"https://{host}"))  # TLS may end at a reverse proxy
        return origin in own


async def respond(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def install(server, allowed_hosts: Sequence[str], cors_origins: Sequence[str], env_origins: Sequence[str]) -> List[str]:
    """Put the guard outermost in ``server``'s middleware and give MONAI Label's CORS middleware the listed
    origins only (it allows ``*`` by default); the server rebuilds its middleware on the next request. Returns
    the origins CORS allows."""
    from fastapi.middleware.cors import CORSMiddleware
    from starlette.middleware import Middleware

    origins = sorted(set(cors_origins) | {origin_of(str(o)) for o in env_origins})
    kept = [m for m in server.user_middleware if m.cls not in (CORSMiddleware, BrowserGuard)]
    server.user_middleware = [
        Middleware(BrowserGuard, allowed_hosts=allowed_hosts, allowed_origins=origins),
        Middleware(CORSMiddleware, allow_origins=origins, allow_credentials=True, allow_methods=["*"], allow_headers=["*"]),
        *kept,
    ]
    server.middleware_stack = None
    return origins
