"""`GET /ohif/{path}`: the OHIF viewer bundled with MONAI Label, nested assets included.

MONAI Label 0.8.5 joins a nested path with `os.pathsep` (":" on Linux, not "/"), so that every file below a folder
of the bundle (`/ohif/assets/...`, `/ohif/dicom-microscopy-viewer/...`) is answered with index.html: icons and
the microscopy viewer never load, and a browser reports HTML where it expected an image or a script. This route,
put in front of MONAI Label's (same path, same user role), serves:

- a file of the bundle at its path, nested or not (never a file outside the bundle's folder);
- index.html for the viewer's own pages (`/ohif/`, `/ohif/viewer?StudyInstanceUIDs=...`: no file extension);
- 404 for a missing file that has an extension (MONAI Label would answer index.html);
- `app-config.js` from this package (`ohif_app_config.js`) instead of the bundle's: the same settings, and the
  "MONAI Label" mode with OHIF's Segmentation panel beside its own, whose "Export DICOM SEG" stores the label on
  the PACS, where the DICOMweb datastore takes it as the image's final label (README, "OHIF").
"""

import logging
import os
from pathlib import Path

from fastapi import APIRouter, Depends, HTTPException
from fastapi.responses import FileResponse
from monailabel.config import settings
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.utils.others.generic import get_mime_type

logger = logging.getLogger(__name__)


def bundle_dir() -> Path:
    import monailabel.endpoints

    return Path(monailabel.endpoints.__file__).resolve().parent / "static" / "ohif"


APP_CONFIG = Path(__file__).resolve().parent / "ohif_app_config.js"


def resolve(path: str, root: Path | None = None) -> Path:
    """The file that answers `GET /ohif/{path}`; HTTPException 404 when there is none."""
    if root is None and path.strip("/") == "app-config.js":
        return APP_CONFIG
    root = (root or bundle_dir()).resolve()
    index = root / "index.html"
    if path and "\0" not in path:
        file = (root / path.lstrip("/")).resolve()
        if file.is_relative_to(root) and file.is_file():
            return file
        if Path(path).suffix:  # an asset that is not there: not the viewer's page
            raise HTTPException(status_code=404, detail=f"no such file in the OHIF bundle: {path}")
    if not index.is_file():
        raise HTTPException(status_code=404, detail="the OHIF bundle is not installed")
    return index


def install(fastapi_app) -> None:
    """Put the route in front of MONAI Label's `/ohif/{path}` (the first matching route serves)."""
    router = APIRouter(prefix=f"{settings.MONAI_LABEL_API_STR}/ohif")

    @router.get("/{path:path}", include_in_schema=False)
    async def ohif(path: str, user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))):
        file = resolve(path)
        return FileResponse(str(file), media_type=get_mime_type(str(file)))

    routes = fastapi_app.router.routes  # POST /reload re-creates the app: its route replaces the last one
    earlier = [r for r in routes if getattr(getattr(r, "endpoint", None), "__module__", "") == __name__]
    routes[:] = router.routes + [r for r in routes if r not in earlier]
    logger.info(f"sam3d: /ohif/ serves the bundled viewer's nested files ({os.fspath(bundle_dir())})")
