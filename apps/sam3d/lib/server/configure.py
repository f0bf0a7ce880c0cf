"""The server's configuration once the app exists, and the fix that lets MONAI Label 0.8.5 check tokens."""

import functools
import logging
import types

from monailabel.config import settings

from lib.settings import Settings

from . import browser_guard
from .endpoints import install_endpoints

logger = logging.getLogger(__name__)

# Keycloak signs its access tokens with RS256.
TOKEN_ALGORITHMS = ["RS256"]


def verify_tokens_with_pyjwt2() -> None:
    """MONAI Label 0.8.5 calls ``jwt.decode`` without ``algorithms``, which PyJWT 2 (what installs with it)
    refuses for every token: with authentication on, nobody could sign in. Give its auth module a ``jwt``
    whose ``decode`` names the algorithms; signature and expiry checks stay PyJWT's own."""
    import jwt
    from monailabel.endpoints.user import auth

    if getattr(auth.jwt, "__name__", None) == "jwt":
        auth.jwt = types.SimpleNamespace(decode=functools.partial(jwt.decode, algorithms=TOKEN_ALGORITHMS))


def configure_server(app_settings: Settings) -> None:
    """sam3d's endpoints in place of MONAI Label's (endpoints.py), the browser guard in place of MONAI Label's
    allow-every-origin CORS (browser_guard.py), and a request body limit: MONAI Label copies every upload to
    disk without one, so one client could fill the disk. FastAPI answers 413 to bodies over ``max_body_size``;
    MONAI Label creates its server without one, and the app exists only after the server has built its
    middleware, so set both and let the server rebuild its middleware on the next request (Starlette builds it
    when it is None)."""
    from monailabel.app import app as server  # the FastAPI server that runs this app

    install_endpoints(server)
    origins = browser_guard.install(server, app_settings.allowed_hosts, app_settings.cors_origins,
                                    settings.MONAI_LABEL_CORS_ORIGINS)
    logger.info(f"sam3d: browser pages may use this server from its own origin{' and ' + ', '.join(origins) if origins else ' only'}")
    server.max_body_size = app_settings.max_upload_bytes
    server.middleware_stack = None
