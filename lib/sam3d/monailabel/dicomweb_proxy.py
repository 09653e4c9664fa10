"""`/proxy/dicom/{wado,qido,stow}/...` for sam3d: MONAI Label's DICOMweb proxy, off the event loop, with clear errors.

MONAI Label's proxy forwards OHIF's DICOMweb requests to the studies server with blocking `requests` calls on the
event loop (a slow PACS stalls every other request) and answers 500 when the server is unreachable or when the
studies are a local folder (there is nothing to proxy). Here a local datastore answers 404, the proxy runs in a
worker thread, and an unreachable DICOMweb server is 502.
"""

import asyncio

import requests
from fastapi import APIRouter, Depends, HTTPException, Request
from monailabel.config import settings
from monailabel.endpoints import proxy
from monailabel.endpoints.user.auth import RBAC, User

from .infer_api import put_in_front

OPS = ("wado", "qido", "stow")


def install(fastapi_app, dicomweb: bool) -> None:
    """Put the proxy's routes in front of MONAI Label's; `dicomweb`: the studies are a DICOMweb server."""
    router = APIRouter(prefix=f"{settings.MONAI_LABEL_API_STR}/proxy/dicom", tags=["Others"])

    @router.api_route("/{op}/{path:path}", methods=["GET", "POST"], include_in_schema=False)
    async def forward(
        request: Request, op: str, path: str, user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))
    ):
        if op not in OPS:
            raise HTTPException(status_code=404, detail=f"no DICOMweb service {op!r}; known: {', '.join(OPS)}")
        if not dicomweb:
            raise HTTPException(
                status_code=404,
                detail="the studies are a local folder: there is no DICOMweb "
                "server to proxy (start the server with --studies http://.../dicom-web)",
            )
        await request.body()  # read here, on the event loop; the request keeps it for the proxy's own read
        try:
            return await asyncio.to_thread(asyncio.run, proxy.proxy_dicom(request, op, path))
        except requests.RequestException as e:
            raise HTTPException(status_code=502, detail=f"the DICOMweb server did not answer: {e}") from None

    put_in_front(fastapi_app, router, __name__)
