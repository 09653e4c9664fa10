"""`POST /infer/{model}`, `/activelearning/{strategy}`, `/scoring/{method}` and `/batch/infer/{model}` for sam3d:
checked, bounded, off the event loop.

MONAI Label's own `/infer/{model}` reads any server path given as `image`, answers a malformed `params`, an empty
image or an unknown strategy with HTTP 500, and computes on the server's event loop, so that one annotator's
click holds up every other request (`/info` included). These routes, put in front of MONAI Label's (same paths),
keep its request and response shapes (query `image`, `session_id`, `output`; form `params`, `file`, `label`) and:

- read images only through the datastore: `image` is an image id the datastore knows, never a path; a request's
  own upload (`file`) or session image is the server's file and is read as MONAI Label does;
- answer a malformed request with 4xx and the reason before anything is computed: `params` must be a JSON
  object (no NaN or Infinity) that does not set `image`, `model` or `session`; at most `limits.max_points`
  clicks; `output=dicom_seg` needs a DICOMweb datastore; a body over `limits.max_request_mb` is 413; an
  unknown model, image, session or strategy is 404;
- compute in `limits.infer_threads` threads of their own with at most `limits.infer_queue` more requests
  waiting; one more is answered 429 at once, with Retry-After.

The whole-slide routes (`/infer/wsi/...`, `/infer/wsi_v2/...`) read server paths too and sam3d has no
whole-slide model: they answer 404. MONAI Label starts a scoring or batch-inference process for any name and
answers 200 (the process then fails in its log): here an unknown method or model is 404, and `run_sync=true`
(which would compute on the event loop) is 400.
"""

import asyncio
import contextvars
import json
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor

from fastapi import APIRouter, BackgroundTasks, Depends, File, Form, HTTPException, UploadFile
from monailabel.config import RBAC_ADMIN, RBAC_ANNOTATOR, RBAC_USER, settings
from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.endpoints import activelearning, batch_infer, scoring
from monailabel.endpoints.infer import ResultType, run_inference
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.tasks.batch_infer import BatchInferImageType

from .app_config import RequestLimits

logger = logging.getLogger(__name__)

SERVER_SET_KEYS = ("image", "model", "session")  # MONAI Label merges params last: these would override the route's
MAX_FILES = 2  # `file` and `label`
ACTIVELEARNING_MAX_BODY = 64 << 10  # a strategy's params: a client id and a few options
NO_IMAGE = (
    "no image: give an image id of the datastore (`image`), upload a file (`file`) or name a session (`session_id`)"
)

# True while a route of this module runs a request: its `image` is checked, and an upload or session image
# in its place is the server's own file (apps/sam3d/main.py's infer checks every other caller's image)
_checked_here = contextvars.ContextVar("sam3d_infer_checked_here", default=False)


def image_checked_by_route() -> bool:
    return _checked_here.get()


def _plain_name(name: str) -> bool:
    """A name that cannot lead out of a folder it is joined to (datastores join ids to their image folder)."""
    return bool(name) and name not in (".", "..") and not any(c in name for c in "/\\\0")


def check_image_id(image, datastore) -> None:
    """HTTPException unless `image` is an image id the datastore knows (422 for none, 404 for a path or unknown)."""
    if not isinstance(image, str):  # an array given in Python (MONAI Label's in-process API), never over HTTP
        return
    if not image:
        raise HTTPException(status_code=422, detail=NO_IMAGE)
    if not _plain_name(image) or not datastore.get_image_uri(image):
        raise HTTPException(
            status_code=404,
            detail=f"image {image!r} is not in the datastore: give an image id "
            "(GET /datastore/ lists them), not a path",
        )


def json_object(field: str, text: str | None) -> dict:
    """A JSON form field (`params`, `info`) as a dict, empty when not given; HTTPException 422 with the reason when
    it is not a JSON object (broken, nested too deep, NaN or Infinity, a list, null), where MONAI Label's routes
    would answer 500."""

    def no_constant(name):
        raise ValueError(f"{name} is not a number in JSON")

    try:
        parsed = json.loads(text or "{}", parse_constant=no_constant)
    except (ValueError, RecursionError) as e:
        raise HTTPException(status_code=422, detail=f"{field} must be a JSON object: {e}") from None
    if not isinstance(parsed, dict):
        raise HTTPException(status_code=422, detail=f"{field} must be a JSON object, got {type(parsed).__name__}")
    return parsed


def parse_params(params: str, max_points: int) -> dict:
    """The form field `params` as a dict; HTTPException 422 with the reason when it is not a usable request."""
    parsed = json_object("params", params)
    overriding = [k for k in SERVER_SET_KEYS if k in parsed]
    if overriding:
        raise HTTPException(
            status_code=422,
            detail=f"params may not set {', '.join(overriding)}: the image is the "
            "`image` query parameter, the model the path",
        )
    points = sum(len(parsed[k]) for k in ("foreground", "background") if isinstance(parsed.get(k), list))
    if points > max_points:
        raise HTTPException(
            status_code=422,
            detail=f"{points} points: a request may hold at most {max_points} foreground and background points",
        )
    return parsed


class InferQueue:
    """`threads` requests computed at once in threads of their own, `depth` more waiting in order; one more is
    answered 429 at once. Admission is counted on the event loop, which is one thread: no lock is needed."""

    def __init__(self, threads: int, depth: int):
        self.threads, self.capacity = threads, threads + depth
        self.admitted = 0
        self.seconds = 1.0  # a running mean of one request's compute time, for Retry-After
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="sam3d-infer")

    def retry_after(self) -> int:
        return max(1, math.ceil(self.seconds * self.admitted / self.threads))

    def _timed(self, fn):
        t = time.perf_counter()
        try:
            return fn()
        finally:
            self.seconds = 0.8 * self.seconds + 0.2 * (time.perf_counter() - t)

    async def run(self, fn):
        """`fn()`'s result, computed in a worker thread; HTTPException 429 when every place is taken."""
        if self.admitted >= self.capacity:
            raise HTTPException(
                status_code=429,
                headers={"Retry-After": str(self.retry_after())},
                detail=f"the server is busy: {self.admitted} requests are being answered or "
                "waiting; try again in a moment",
            )
        self.admitted += 1
        try:
            return await asyncio.wrap_future(self._executor.submit(contextvars.copy_context().run, self._timed, fn))
        finally:
            self.admitted -= 1


def _check_session(app, session_id: str) -> None:
    sessions = app.sessions()
    if sessions is None or not _plain_name(session_id) or sessions.get_session(session_id) is None:
        raise HTTPException(status_code=404, detail=f"session {session_id!r} is unknown or has expired")


def _no_sync(run_sync) -> None:
    if run_sync:
        raise HTTPException(
            status_code=400,
            detail="run_sync is not supported: the task runs in its own process so that the server keeps answering",
        )


def put_in_front(fastapi_app, router: APIRouter, module: str) -> None:
    """`router`'s routes before MONAI Label's (the first matching route serves), in place of those that the routes
    of `module` put there before (POST /reload re-creates the app)."""
    routes = fastapi_app.router.routes
    earlier = [r for r in routes if getattr(getattr(r, "endpoint", None), "__module__", "") == module]
    routes[:] = router.routes + [r for r in routes if r not in earlier]


def install(fastapi_app, app) -> None:
    """Put the routes in front of MONAI Label's (the first matching route serves), in place of earlier ones."""
    limits: RequestLimits = app.app_config.limits
    queue = InferQueue(limits.infer_threads, limits.infer_queue)
    user_role = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))
    router = APIRouter(prefix=settings.MONAI_LABEL_API_STR)

    def answer(background_tasks, model, image, session_id, params, file, label, output):
        """MONAI Label's inference (upload, session, response shapes) once the image is known to be allowed."""
        _checked_here.set(True)  # this thread's copy of the request's context
        if image:
            check_image_id(image, app.datastore())
        if session_id:
            _check_session(app, session_id)
        return run_inference(background_tasks, model, image, session_id, params, file, label, output)

    @router.post(
        "/infer/{model}",
        summary=f"{RBAC_USER}Run Inference for supported model (checked, queued)",
        tags=["Infer"],
        max_body_size=int(limits.max_request_mb * (1 << 20)),
        form_limits={"max_files": MAX_FILES},
    )
    async def infer(
        background_tasks: BackgroundTasks,
        model: str,
        image: str = "",
        session_id: str = "",
        params: str = Form("{}"),
        file: UploadFile = File(None),
        label: UploadFile = File(None),
        output: ResultType | None = None,
        user: User = user_role,
    ):
        if model not in app._infers:
            raise HTTPException(status_code=404, detail=f"no model {model!r}; known: {', '.join(app._infers)}")
        parse_params(params, limits.max_points)
        if not (image or file or session_id):
            raise HTTPException(status_code=422, detail=NO_IMAGE)
        if output == ResultType.dicom_seg and not isinstance(app.datastore(), DICOMWebDatastore):
            raise HTTPException(
                status_code=422, detail="output=dicom_seg needs a DICOMweb datastore: ask for image, json or all"
            )
        try:
            return await queue.run(
                lambda: answer(background_tasks, model, image, session_id, params, file, label, output)
            )
        except Exception:
            await background_tasks()  # no response will run them: remove the upload's temporary files now
            raise

    @router.post("/infer/wsi/{model}", include_in_schema=False)
    @router.post("/infer/wsi_v2/{model}", include_in_schema=False)
    async def no_whole_slide(model: str):
        raise HTTPException(
            status_code=404, detail="sam3d serves 3D volumes and has no whole-slide model: use POST /infer/{model}"
        )

    @router.post(
        "/activelearning/{strategy}",
        summary=f"{RBAC_USER}Next image to annotate (known strategies only)",
        tags=["ActiveLearning"],
        max_body_size=ACTIVELEARNING_MAX_BODY,
    )
    def next_sample(strategy: str, params: dict | None = None, user: User = user_role):
        if strategy not in app._strategies:
            raise HTTPException(
                status_code=404, detail=f"no strategy {strategy!r}; known: {', '.join(app._strategies)}"
            )
        return activelearning.sample(strategy, params, user.username)

    @router.post(
        "/scoring/{method}", summary=f"{RBAC_ANNOTATOR}Run a scoring method (known methods only)", tags=["Scoring"]
    )
    async def run_scoring(
        method: str,
        params: dict | None = None,
        run_sync: bool | None = False,
        user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR)),
    ):
        if method not in app._scoring_methods:
            known = ", ".join(app._scoring_methods) or "none (the scored model has no weights yet)"
            raise HTTPException(status_code=404, detail=f"no scoring method {method!r}; known: {known}")
        _no_sync(run_sync)
        return scoring.run_method(method, params, False)

    @router.post("/batch/infer/{model}", summary=f"{RBAC_ADMIN}Run batch inference (known models only)", tags=["Infer"])
    async def run_batch(
        model: str,
        images: BatchInferImageType = BatchInferImageType.IMAGES_ALL,
        params: dict | None = None,
        run_sync: bool | None = False,
        user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN)),
    ):
        if model not in app._infers:
            raise HTTPException(status_code=404, detail=f"no model {model!r}; known: {', '.join(app._infers)}")
        _no_sync(run_sync)
        return batch_infer.run(model, images, params or {}, False)

    put_in_front(fastapi_app, router, __name__)
    logger.info(
        f"sam3d: /infer/{{model}} checked and queued ({limits.infer_threads} threads, {limits.infer_queue} "
        f"waiting, at most {limits.max_points} points, {limits.max_request_mb:g} MB); /activelearning checked"
    )
