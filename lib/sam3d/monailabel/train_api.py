"""`POST /train/<model>` for sam3d's train task: checked before MONAI Label starts a process, queued, not doubled.

MONAI Label starts a training process for any request and reports a bad parameter only as an ERROR in the
process's log lines; it answers a second request while one runs with 429, or with `enqueue=true` lines it up
behind the first without limit. This route, put in front of MONAI Label's own (same path), answers a bad
request with HTTP 4xx and its reason before anything starts, and queues by default: a request while a run is
going is queued once; further requests while that one waits join it (the waiting run reads the datastore when
it starts, so it sees every label saved meanwhile). `enqueue=false` keeps MONAI Label's 429. Training always
runs in MONAI Label's subprocess (`run_sync` would train inside the server, so it is refused). The retrain
policy (`retrain`) submits through `submit_training` too.
"""

import logging

from fastapi import APIRouter, Depends, HTTPException
from monailabel.config import settings
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.utils.async_tasks.task import AsyncTask
from monailabel.utils.async_tasks.utils import tasks

from .train_task import Sam3DTrainTask, TrainRequestError

logger = logging.getLogger(__name__)


def waiting_run(model: str) -> dict | None:
    """A train task for `model` queued behind another (MONAI Label runs one at a time, in submission order)."""
    active = [t for t in tasks("train") if t["status"] in ("SUBMITTED", "RUNNING")]
    return next((t for t in reversed(active[1:]) if t["request"].get("model") == model), None)


def submit_training(app, model: str, params: dict | None, enqueue: bool = True) -> dict:
    """Check the request (HTTPException 4xx), then start it, queue it, or join the run already waiting."""
    task = app._trainers.get(model)
    if task is None:
        raise HTTPException(status_code=404, detail=f"no train task {model!r}; known: {', '.join(app._trainers)}")
    params = dict(params or {})
    if isinstance(task, Sam3DTrainTask):
        try:
            params.update(task.check_request(params, app.datastore()))
        except TrainRequestError as e:
            raise HTTPException(status_code=e.status, detail=str(e)) from None
    waiting = waiting_run(model)
    if waiting is not None:
        logger.info(f"sam3d: a {model} training is already waiting; this request joins it")
        return {**waiting, "queued": "joined the training already waiting to run"}
    busy = any(t["status"] in ("SUBMITTED", "RUNNING") for t in tasks("train"))  # SUBMITTED: starting now
    if busy and not enqueue:
        raise HTTPException(status_code=429, detail="a training task is already running (enqueue=true queues)")
    result, detail = AsyncTask.run("train", request={"model": model}, params=params, enqueue=True)
    if result is None:
        raise HTTPException(status_code=429, detail=detail)
    return result


def install(fastapi_app, app) -> None:
    """Put the route in front of MONAI Label's `POST /train/{model}` (the first matching route serves)."""
    router = APIRouter(prefix=f"{settings.MONAI_LABEL_API_STR}/train", tags=["Train"])

    @router.post("/{model}", summary="Run a training task: checked first, queued when one runs")
    async def run_model(
        model: str,
        params: dict | None = None,
        run_sync: bool | None = False,
        enqueue: bool | None = True,
        user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN)),
    ):
        if run_sync:
            raise HTTPException(
                status_code=400,
                detail="run_sync is not supported: training runs in MONAI Label's "
                "training process so that the server keeps answering",
            )
        return submit_training(app, model, params, enqueue=bool(enqueue))

    fastapi_app.router.routes[0:0] = router.routes
    logger.info(f"sam3d: POST {settings.MONAI_LABEL_API_STR}/train/{{model}} is checked and queued by sam3d")
