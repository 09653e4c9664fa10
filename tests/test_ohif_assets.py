"""The bundled OHIF's nested files (MONAI Label 0.8.5 answers them with index.html) through sam3d's /ohif route."""

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from sam3d.monailabel import ohif


@pytest.fixture(scope="module")
def client():
    from monailabel.endpoints import ohif as monailabel_ohif

    app = FastAPI()
    app.include_router(monailabel_ohif.router)  # MONAI Label's route, which ours must precede
    ohif.install(app)
    return TestClient(app)


def test_nested_assets_are_the_files_not_index_html(client):
    nested = sorted(p for p in ohif.bundle_dir().glob("assets/*.png"))[0]
    r = client.get(f"/ohif/assets/{nested.name}")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png" and r.content == nested.read_bytes()


def test_the_viewers_pages_are_index_html_and_top_level_files_still_served(client):
    index = (ohif.bundle_dir() / "index.html").read_bytes()
    for page in ("/ohif/", "/ohif/viewer?StudyInstanceUIDs=1.2.3", "/ohif/segmentation"):
        r = client.get(page)
        assert r.status_code == 200 and r.content == index, page
    r = client.get("/ohif/manifest.json")
    assert r.status_code == 200 and r.content == (ohif.bundle_dir() / "manifest.json").read_bytes()


def test_app_config_is_the_projects_the_monai_label_mode_with_the_segmentation_panel(client):
    """The bundle's data source as it is, and the mode wrapped to show the panel whose Export DICOM SEG saves."""
    r = client.get("/ohif/app-config.js")
    assert r.status_code == 200 and r.content == ohif.APP_CONFIG.read_bytes()
    text = r.text
    assert "'@ohif/mode-monai-label'" in text and "panelModule.panelSegmentation'" in text
    bundled = (ohif.bundle_dir() / "app-config.js").read_text()
    for setting in (
        "wadoRoot: '/proxy/dicom/wado'",
        "qidoRoot: '/proxy/dicom/qido'",
        "routerBasename: '/ohif/'",
        "defaultDataSourceName: 'dicomweb'",
    ):
        assert setting in bundled and setting in text, setting


@pytest.mark.parametrize(
    "path",
    [
        "assets/no-such-icon.png",
        "../../config.py",
        "..%2F..%2Fconfig.py",
        "/etc/passwd.txt",
        "assets/../../../__init__.py",
    ],
)
def test_missing_files_and_paths_outside_the_bundle_are_404(client, path):
    r = client.get(f"/ohif/{path}")
    assert r.status_code == 404 or r.content == (ohif.bundle_dir() / "index.html").read_bytes()
    assert b"Copyright" not in r.content and b"import" not in r.content


def test_resolve_never_leaves_the_folder(tmp_path):
    root = tmp_path / "ohif"
    (root / "a").mkdir(parents=True)
    (root / "index.html").write_text("i")
    (root / "a" / "b.js").write_text("b")
    (tmp_path / "secret.js").write_text("s")
    assert ohif.resolve("a/b.js", root) == (root / "a" / "b.js").resolve()
    assert ohif.resolve("", root).name == "index.html"
    with pytest.raises(Exception) as e:
        ohif.resolve("../secret.js", root)
    assert e.value.status_code == 404
    assert ohif.resolve("viewer", root).name == "index.html"
