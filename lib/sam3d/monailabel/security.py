"""Who may talk to the server: CORS, an API token, and the bind-host policy (README "Security").

MONAI Label builds its FastAPI app at import with a CORSMiddleware that lets any origin in, credentials allowed,
and has no authentication unless its Keycloak auth (`MONAI_LABEL_AUTH_ENABLE`) is configured. `install` puts
sam3d's policy in front of every route:

- CORS: the origins of MONAI Label's own setting `MONAI_LABEL_CORS_ORIGINS` when it is set; otherwise none, so
  only pages the server serves itself (OHIF at /ohif/) may call it from a browser;
- a request whose `Origin` is neither the server's own (its Host) nor an allowed one is refused (403): CORS only
  hides the answer from the page, and a form POST from another site would still run an inference or a write;
- with a token (env `SAM3D_API_TOKEN`, or `--conf auth_token_file PATH`), every route needs
  `Authorization: Bearer <token>` except `/auth/` and `/auth/token`: MONAILabelClient and Slicer's MONAI Label
  module log in there with the token as password, as they do with MONAI Label's own auth;
- without authentication the server answers only requests addressed to a loopback name (a DNS-rebinding page
  addresses its own host name) and refuses to start when it listens beyond loopback, unless
  `--conf insecure_no_auth true` says that this is wanted.
"""

import argparse
import ipaddress
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, HTTPException
from fastapi.middleware import Middleware
from fastapi.middleware.cors import CORSMiddleware
from fastapi.middleware.trustedhost import TrustedHostMiddleware
from fastapi.security import OAuth2PasswordRequestForm
from monailabel.config import settings
from monailabel.utils.others.generic import strtobool
from starlette.datastructures import Headers
from starlette.responses import JSONResponse

logger = logging.getLogger(__name__)

TOKEN_ENV = "SAM3D_API_TOKEN"
MIN_TOKEN_CHARS = 16
LOOPBACK_HOSTS = ["localhost", "127.0.0.1", "[::1]"]  # Host header names (IPv6 in brackets, as Starlette keeps it)
AUTH_TAG = "Auth (sam3d API token)"  # marks our login routes, so that a second install replaces them
MAKE_TOKEN = "python -c 'import secrets; print(secrets.token_urlsafe(32))'"


class InsecureServerError(RuntimeError):
    """The server would listen beyond loopback without authentication, or its authentication is unusable."""


@dataclass(frozen=True)
class Policy:
    token: str | None  # the API token every request must carry; None: no token (MONAI Label's auth, or none)
    cors_origins: tuple[str, ...]  # other origins a browser page may call from
    loopback_only: bool  # no authentication at all: serve requests addressed to a loopback name only


def bind_host(argv: list[str]) -> str | None:
    """The address `monailabel start_server` listens on (its --host, default 0.0.0.0); None when not started so."""
    if "start_server" not in argv:
        return None
    from monailabel.main import Main

    parser = argparse.ArgumentParser(add_help=False)
    Main.args_start_server(None, parser)  # MONAI Label's own options: the same flags and the same default
    args, _ = parser.parse_known_args(argv[argv.index("start_server") + 1 :])
    return args.host


def is_loopback(host: str | None) -> bool:
    if host is None:
        return False
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def read_token(conf: dict, environ) -> str | None:
    """The API token from `--conf auth_token_file` or the environment; InsecureServerError when unusable."""
    path = conf.get("auth_token_file")
    if path:
        try:
            token = Path(path).expanduser().read_text().strip()
        except OSError as e:
            raise InsecureServerError(f"cannot read auth_token_file {path}: {e}") from None
    else:
        token = environ.get(TOKEN_ENV, "").strip()
        if not token:
            return None
    if len(token) < MIN_TOKEN_CHARS:
        raise InsecureServerError(
            f"the API token is shorter than {MIN_TOKEN_CHARS} characters; make one with {MAKE_TOKEN}"
        )
    return token


def policy_for(conf: dict, argv: list[str], environ=os.environ) -> Policy:
    """The server's policy from its --conf, command line and environment; InsecureServerError when it must not
    start (beyond loopback without authentication, a token and MONAI Label's auth both, an unusable token)."""
    token = read_token(conf, environ)
    if token and settings.MONAI_LABEL_AUTH_ENABLE:
        raise InsecureServerError(
            "both MONAI Label's auth (MONAI_LABEL_AUTH_ENABLE) and a sam3d API token are configured; use one"
        )
    authenticated = bool(token) or settings.MONAI_LABEL_AUTH_ENABLE
    insecure = strtobool(conf.get("insecure_no_auth", "false"))
    host = bind_host(argv)
    if not authenticated and not insecure and not is_loopback(host):
        raise InsecureServerError(
            f"refusing to listen on {host or 'an address not given with --host'} without authentication: set "
            f"{TOKEN_ENV} or --conf auth_token_file PATH (make a token with {MAKE_TOKEN}), or listen on "
            "--host 127.0.0.1, or accept an open server with --conf insecure_no_auth true (README 'Security')"
        )
    origins = tuple(str(o).rstrip("/") for o in settings.MONAI_LABEL_CORS_ORIGINS)  # pydantic adds a slash
    return Policy(token=token, cors_origins=origins, loopback_only=not authenticated and not insecure)


class Guard:
    """ASGI middleware: refuses foreign origins (403), then requests without the API token (401)."""

    def __init__(self, app, policy: Policy):
        self.app, self.policy = app, policy
        self.open_paths = {f"{settings.MONAI_LABEL_API_STR}/auth/", f"{settings.MONAI_LABEL_API_STR}/auth/token"}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":  # lifespan; MONAI Label has no websocket route
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        origin = headers.get("origin")
        if origin is not None and not self.same_or_allowed(origin, headers.get("host")):
            response = JSONResponse({"detail": f"cross-origin request from {origin} refused"}, status_code=403)
        elif self.policy.token and not self.has_token(headers) and self.route_path(scope) not in self.open_paths:
            response = JSONResponse(
                {"detail": "missing or wrong API token (Authorization: Bearer <token>)"},
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        else:
            return await self.app(scope, receive, send)
        await response(scope, receive, send)

    @staticmethod
    def route_path(scope) -> str:
        return scope["path"].removeprefix(scope.get("root_path", ""))  # as Starlette's router matches it

    def same_or_allowed(self, origin: str, host: str | None) -> bool:
        return origin in self.policy.cors_origins or (host is not None and urlsplit(origin).netloc == host.lower())

    def has_token(self, headers: Headers) -> bool:
        scheme, _, value = headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(value.strip().encode(), self.policy.token.encode())


def token_routes(policy: Policy) -> APIRouter:
    """MONAI Label's login routes, answered with the API token: Slicer's MONAI Label module asks `/auth/` whether
    to log in, posts a user name and password to `/auth/token`, and sends the token it gets as a bearer token."""
    router = APIRouter(prefix=f"{settings.MONAI_LABEL_API_STR}/auth", tags=[AUTH_TAG])

    @router.get("/", summary="Authentication is on: log in with the API token as password")
    async def auth_enabled():
        return {"enabled": True, "client_id": "sam3d", "realm": None}

    @router.post("/token", summary="The bearer token for a password that is the API token")
    async def access_token(form: OAuth2PasswordRequestForm = Depends()):
        if not secrets.compare_digest(form.password.encode(), policy.token.encode()):
            raise HTTPException(status_code=401, detail="wrong API token", headers={"WWW-Authenticate": "Bearer"})
        return {"access_token": policy.token, "token_type": "Bearer"}

    @router.get("/token/valid", summary="The bearer token is valid (the guard let the request in)")
    async def valid_token():
        return {"valid": True}

    return router


def install(fastapi_app, policy: Policy) -> None:
    """Put the policy in front of MONAI Label's routes, in place of its CORS middleware.

    The app is created in MONAI Label's lifespan start-up, when Starlette has already built the middleware stack
    from `user_middleware` (so `add_middleware` refuses). Replacing the CORS entry there and rebuilding the stack
    from the same list, as Starlette itself builds it, takes effect from the first request and keeps MONAI Label's
    other middleware; a second install (POST /reload re-creates the app) replaces the first.
    """
    ours = [
        Middleware(
            CORSMiddleware,
            allow_origins=list(policy.cors_origins),
            allow_credentials=True,
            allow_methods=["*"],
            allow_headers=["*"],
        )
    ]
    if policy.loopback_only:
        ours.append(Middleware(TrustedHostMiddleware, allowed_hosts=LOOPBACK_HOSTS, www_redirect=False))
    ours.append(Middleware(Guard, policy=policy))
    replaced = (CORSMiddleware, TrustedHostMiddleware, Guard)
    fastapi_app.user_middleware = ours + [m for m in fastapi_app.user_middleware if m.cls not in replaced]
    fastapi_app.middleware_stack = fastapi_app.build_middleware_stack()

    routes = fastapi_app.router.routes
    routes[:] = [r for r in routes if AUTH_TAG not in (getattr(r, "tags", None) or ())]
    if policy.token:
        routes.extend(token_routes(policy).routes)  # as train_api adds its route: plain routes, found by their tag
    access = (
        "API token required"
        if policy.token
        else "MONAI Label's auth"
        if settings.MONAI_LABEL_AUTH_ENABLE
        else "loopback names only, no authentication"
        if policy.loopback_only
        else "OPEN: no authentication"
    )
    (logger.warning if access.startswith("OPEN") else logger.info)(
        f"sam3d security: {access}; browser origins: {', '.join(policy.cors_origins) or 'its own only'}"
    )
