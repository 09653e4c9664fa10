"""Who may talk to the server (sam3d.monailabel.security): bind-host policy, CORS, foreign origins, the API token.

The app here is a FastAPI app built as MONAI Label builds its own (a CORSMiddleware letting any origin in, with
credentials) whose middleware stack is already built, as it is when MONAI Label creates the sam3d app.
"""

import logging
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.middleware import Middleware
from fastapi.middleware.cors import CORSMiddleware
from fastapi.testclient import TestClient
from monailabel.config import settings

from sam3d.monailabel import load_app_config, security

REPO = Path(__file__).resolve().parents[1]
TOKEN = "a-long-enough-test-token-0123456789"
SERVER = "http://127.0.0.1:8000"


def started_app() -> FastAPI:
    app = FastAPI(
        middleware=[
            Middleware(
                CORSMiddleware, allow_origins=["*"], allow_credentials=True, allow_methods=["*"], allow_headers=["*"]
            )
        ]
    )

    @app.get("/info/")
    def info():
        return {"name": "sam3d"}

    @app.post("/infer/{model}")
    def infer(model: str):
        return {"model": model}

    app.middleware_stack = app.build_middleware_stack()  # started: add_middleware would refuse now
    return app


def client(policy: security.Policy, installs: int = 1) -> TestClient:
    app = started_app()
    for _ in range(installs):
        security.install(app, policy)
    return TestClient(app, base_url=SERVER)


def policy(conf=None, host="127.0.0.1", environ=None) -> security.Policy:
    return security.policy_for(conf or {}, ["monailabel", "start_server", "--app", "a", "--host", host], environ or {})


@pytest.mark.parametrize(
    "argv, host",
    [
        (["start_server", "--app", "a", "--host", "10.1.2.3"], "10.1.2.3"),
        (["start_server", "-i", "::1", "--port", "8080"], "::1"),
        (["start_server", "--conf", "host", "10.1.2.3"], "0.0.0.0"),  # a --conf value is not the bind host
        (["start_server", "--studies", "s"], "0.0.0.0"),  # MONAI Label's default
        (["uvicorn", "monailabel.app:app"], None),  # not started by MONAI Label: unknown
    ],
)
def test_bind_host_is_read_as_monai_label_reads_it(argv, host):
    assert security.bind_host(["monailabel", *argv]) == host


def test_loopback_addresses():
    assert all(map(security.is_loopback, ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"]))
    assert not any(map(security.is_loopback, ["0.0.0.0", "::", "10.0.0.7", "annotate.example.org", None]))


def test_beyond_loopback_needs_authentication_or_an_explicit_opt_out(tmp_path):
    assert policy() == security.Policy(token=None, cors_origins=(), loopback_only=True)
    for host in ("0.0.0.0", "10.0.0.7", "annotate.example.org"):
        with pytest.raises(security.InsecureServerError, match="SAM3D_API_TOKEN"):
            policy(host=host)
    assert policy({"insecure_no_auth": "true"}, "0.0.0.0").loopback_only is False
    assert policy(host="0.0.0.0", environ={"SAM3D_API_TOKEN": TOKEN}).token == TOKEN
    (tmp_path / "token").write_text(f"{TOKEN}\n")
    assert policy({"auth_token_file": str(tmp_path / "token")}, "0.0.0.0").token == TOKEN
    with pytest.raises(security.InsecureServerError, match="cannot read auth_token_file"):
        policy({"auth_token_file": str(tmp_path / "absent")})
    with pytest.raises(security.InsecureServerError, match="shorter than 16"):
        policy(environ={"SAM3D_API_TOKEN": "short"})


def test_the_documented_conf_keys_are_known_to_the_app_config(tmp_path, caplog):
    """The server's whole --conf goes to the app config as well: the security keys are not warned about, the
    limits are read, and a misspelt key is warned about with the keys that exist (the security ones included)."""
    (tmp_path / "token").write_text(TOKEN)
    conf = {
        "auth_token_file": str(tmp_path / "token"),
        "insecure_no_auth": "true",
        "limits.max_points": "7",
        "limits.infer_queue": "3",
    }
    with caplog.at_level(logging.WARNING, logger="sam3d.monailabel.app_config"):
        c = load_app_config(conf, REPO / "configs")
    assert caplog.messages == [] and (c.limits.max_points, c.limits.infer_queue) == (7, 3)
    assert policy(conf, "0.0.0.0").token == TOKEN
    with caplog.at_level(logging.WARNING, logger="sam3d.monailabel.app_config"):
        load_app_config({"auth_token_fille": "x"}, REPO / "configs")
    assert len(caplog.messages) == 1 and "'auth_token_fille'" in caplog.text and "'auth_token_file'" in caplog.text


def test_monai_label_auth_counts_and_excludes_a_token(monkeypatch):
    monkeypatch.setattr(settings, "MONAI_LABEL_AUTH_ENABLE", True)
    assert policy(host="0.0.0.0") == security.Policy(token=None, cors_origins=(), loopback_only=False)
    with pytest.raises(security.InsecureServerError, match="use one"):
        policy(environ={"SAM3D_API_TOKEN": TOKEN})


def test_other_origins_and_host_names_are_refused_without_configuration():
    c = client(policy())
    assert c.get("/info/").status_code == 200 and c.get("/info/", headers={"Origin": SERVER}).status_code == 200
    foreign = {"Origin": "http://evil.example"}
    for r in (c.get("/info/", headers=foreign), c.post("/infer/sam3d_point", headers=foreign, data={"a": "1"})):
        assert r.status_code == 403 and "access-control-allow-origin" not in r.headers
    preflight = c.options("/info/", headers={**foreign, "Access-Control-Request-Method": "DELETE"})
    assert preflight.status_code == 400 and "access-control-allow-origin" not in preflight.headers
    # DNS rebinding: a page of evil.example resolved to 127.0.0.1 is "same origin" to the browser
    rebound = c.get("/info/", headers={"Host": "evil.example:8000", "Origin": "http://evil.example:8000"})
    assert rebound.status_code == 400


def test_configured_origins_get_cors(monkeypatch):
    monkeypatch.setattr(settings, "MONAI_LABEL_CORS_ORIGINS", ["http://viewer.example:3000/"])
    c = client(policy())
    r = c.get("/info/", headers={"Origin": "http://viewer.example:3000"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://viewer.example:3000"
    assert c.get("/info/", headers={"Origin": "http://evil.example"}).status_code == 403


def test_the_token_is_required_everywhere_but_the_login_routes():
    c = client(policy(host="0.0.0.0", environ={"SAM3D_API_TOKEN": TOKEN}), installs=2)  # a reload installs again
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"}, {"Authorization": f"Basic {TOKEN}"}):
        r = c.get("/info/", headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert c.post("/infer/m").status_code == 401 and c.get("/", headers={"Host": "10.0.0.7"}).status_code == 401
    assert c.get("/info/", headers=bearer).json() == {"name": "sam3d"}
    assert c.get("/info/", headers={**bearer, "Host": "annotate.example.org"}).status_code == 200  # any host name

    # Slicer's login: is auth on? a password for a token; then every request carries it
    assert c.get("/auth/").json()["enabled"] is True
    assert c.post("/auth/token", data={"username": "ann", "password": "wrong"}).status_code == 401
    token = c.post("/auth/token", data={"username": "ann", "password": TOKEN}).json()
    assert token == {"access_token": TOKEN, "token_type": "Bearer"}
    assert c.get("/auth/token/valid").status_code == 401
    assert c.get("/auth/token/valid", headers=bearer).status_code == 200
    assert sum(getattr(r, "path", None) == "/auth/token" for r in c.app.router.routes) == 1
    assert sum(m.cls is CORSMiddleware for m in c.app.user_middleware) == 1
