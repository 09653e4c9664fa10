"""The datastore's write routes for sam3d: their JSON form field checked before MONAI Label's endpoint runs.

MONAI Label's `PUT /datastore/image`, `/datastore/label` (form field `params`), `/datastore/image/info`,
`/datastore/label/info` (`info`) and the deprecated `/datastore/updatelabelinfo` (`params`) read the field with
`json.loads` and use it as a dict: broken JSON, a list or `null` is an HTTP 500. These routes, put in front of
MONAI Label's (same paths, parameters and answers), answer 422 with the reason, then run MONAI Label's endpoint.
Unknown images and labels are the datastore's to refuse (404, `datastore.py`).
"""

import logging

from fastapi import APIRouter, BackgroundTasks, Depends, File, Form, UploadFile
from monailabel.config import RBAC_ANNOTATOR, settings
from monailabel.endpoints import datastore as endpoints
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.datastore import DefaultLabelTag

from .infer_api import json_object, put_in_front

logger = logging.getLogger(__name__)


def install(fastapi_app) -> None:
    """Put the routes in front of MONAI Label's (the first matching route serves), in place of earlier ones."""
    annotator = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR))
    router = APIRouter(prefix=f"{settings.MONAI_LABEL_API_STR}/datastore", tags=["Datastore"])

    @router.put("/", include_in_schema=False, deprecated=True)
    @router.put("/image", summary=f"{RBAC_ANNOTATOR}Upload new Image (params checked)")
    async def add_image(
        background_tasks: BackgroundTasks,
        image: str | None = None,
        params: str = Form("{}"),
        file: UploadFile = File(...),
        user: User = annotator,
    ):
        json_object("params", params)
        return endpoints.add_image(background_tasks, image, params, file, user.username)

    @router.put("/label", summary=f"{RBAC_ANNOTATOR}Save Finished Label (params checked)")
    async def save_label(
        background_tasks: BackgroundTasks,
        image: str,
        params: str = Form("{}"),
        tag: str = DefaultLabelTag.FINAL.value,
        label: UploadFile = File(...),
        user: User = annotator,
    ):
        json_object("params", params)
        return endpoints.save_label(background_tasks, image, params, tag, label, user.username)

    @router.put("/image/info", summary=f"{RBAC_ANNOTATOR}Update Image Info (info checked)")
    async def update_image_info(image: str, info: str = Form("{}"), user: User = annotator):
        json_object("info", info)
        return endpoints.update_image_info(image, info, user.username)

    @router.put("/label/info", summary=f"{RBAC_ANNOTATOR}Update Label Info (info checked)")
    async def update_label_info(label: str, tag: str, info: str = Form("{}"), user: User = annotator):
        json_object("info", info)
        return endpoints.update_label_info(label, tag, info, user.username)

    @router.put("/updatelabelinfo", include_in_schema=False, deprecated=True)
    async def update_label_info_deprecated(label: str, tag: str, params: str = Form("{}"), user: User = annotator):
        json_object("params", params)
        return endpoints.update_label_info(label, tag, params, user.username)

    put_in_front(fastapi_app, router, __name__)
    logger.info("sam3d: /datastore uploads and info updates checked (params and info must be JSON objects)")
