"""Talking to a sam3d server from scripts: the API token (README "Security") sent whenever `SAM3D_API_TOKEN` is set.

A server with a token answers 401 to every request without `Authorization: Bearer <token>`. The scripts and the
evaluation take the token from the same environment variable as the server, so that one `export` serves both:

- `Sam3DClient(url)`: MONAI Label's `MONAILabelClient`, the token given to its own `update_auth`;
- `auth_headers()`: the header for plain HTTP clients (`requests`).

Without `SAM3D_API_TOKEN` nothing is sent, as before (a loopback server without authentication).
"""

import json
import os

from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelUtils

from .security import TOKEN_ENV


def api_token(environ=os.environ) -> str | None:
    """The API token to send, from `SAM3D_API_TOKEN`; None when unset or blank."""
    return environ.get(TOKEN_ENV, "").strip() or None


def auth_headers(token: str | None = None) -> dict[str, str]:
    """`{"Authorization": "Bearer <token>"}` for `token`, or the environment's token; {} when there is none."""
    token = token or api_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


class Sam3DClient(MONAILabelClient):
    """`MONAILabelClient` that sends the API token (`token`, or `SAM3D_API_TOKEN`) with every request.

    MONAI Label's client hands its own header dict to helpers that add the request's content-type and
    content-length to it in place, so that after one upload or POST every later request, a GET included, would
    claim a body it does not send (a reverse proxy then waits for it). Each request here gets a fresh copy.
    """

    def __init__(
        self, server_url: str, tmpdir: str | None = None, client_id: str | None = None, token: str | None = None
    ):
        super().__init__(server_url, tmpdir=tmpdir, client_id=client_id)
        token = token or api_token()
        if token:
            self.update_auth({"token_type": "Bearer", "access_token": token})

    @property
    def _headers(self) -> dict:
        return dict(self._auth_headers)

    @_headers.setter
    def _headers(self, value: dict) -> None:
        self._auth_headers = dict(value)

    def update_auth(self, token):
        if token:
            self._auth_headers["Authorization"] = f"{token['token_type']} {token['access_token']}"

    def json_request(self, method: str, selector: str):
        """A route MONAI Label's client has no method for (e.g. `/train/?all=true`), as parsed JSON; RuntimeError
        with the status and answer unless it is 200."""
        status, body, _, _ = MONAILabelUtils.http_method(method, self._server_url, selector, headers=self._headers)
        if status != 200:
            raise RuntimeError(f"{method} {selector} answered {status}: {body}")
        return json.loads(body)
