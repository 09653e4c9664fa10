"""sam3d: the MONAI Label app that serves 3D Segment-Anything models to Slicer and OHIF.

    monailabel start_server --app apps/sam3d --studies DATASET --host 127.0.0.1 [--conf KEY VALUE ...]

The app reads `configs/app.yaml` (the tasks, their model YAMLs in `configs/models/`, the labels) and registers one
infer task per entry; no model or image code lives here (see `sam3d.monailabel` and `sam3d.engine`).

`--conf` keys (MONAI Label passes them as strings; see `sam3d.monailabel.app_config`):

    model NAME_OR_YAML       model config of `sam3d_point`: clicknet (default) | sam3d_small | sam_med3d_turbo | a YAML
    checkpoint PATH          its weights (.safetensors, or SAM-Med3D's .pth loaded with weights_only=True)
    weights NAME             published weights installed by `bash scripts/setup.sh fetch NAME` (sam_med3d_turbo,
                             with `model sam_med3d_turbo`); /info names them and their licence
    device auto|cpu|cuda:N   where the models run (auto: cuda when available)
    preload true|false       load the weights in the background at start-up instead of on the first click
    strict_labels true|false the text task refuses names that configs/app.yaml does not declare (default true)
    config PATH              another app YAML instead of configs/app.yaml
    infers.TASK.KEY VALUE    any key of a task or of its model config, e.g. infers.sam3d_point.spacing "[2,2,2]";
                             a new TASK adds a task, `infers.TASK null` removes one
    labels.NAME VALUE        declare another label
    train.KEY VALUE          a default of the train task `sam3d` (epochs, steps, lr, trainable, promote, ...)
    retrain_every N          start training after every N new or changed final labels (0: never)
    lease_minutes M          an image handed out by /activelearning stays reserved for its client this long
    uncertainty.KEY VALUE    the uncertainty score (points, repeats, jitter_mm, threads)
    limits.KEY VALUE         what one /infer request may ask and how many are answered at once:
                             max_points (1000), max_request_mb (256), infer_threads (2), infer_queue (4 per CPU)
    auth_token_file PATH     a file holding the API token every request must carry (or env SAM3D_API_TOKEN)
    insecure_no_auth true    listen beyond loopback without authentication (refused otherwise)

Learning while annotating: `POST /train/sam3d` trains in MONAI Label's own training subprocess, which re-creates
this app (so the app builds no model at start-up); `/activelearning/{random,first,uncertainty}` hand out images
under leases; the uncertainty scores come from MONAI Label's scoring job. See README "Learning while annotating".

Relative paths in the YAML files resolve against the project root (the folder holding configs/); relative paths
given with --conf against the working directory. Example:

    monailabel start_server --app apps/sam3d --studies data --host 127.0.0.1 \\
        --conf model sam_med3d_turbo --conf checkpoint ~/weights/sam_med3d_turbo.pth --conf device cuda

The server starts without weights: a task whose checkpoint is missing stays listed in /info with a description
that says what to set, and its requests answer HTTP 503 until the file is there.

Security (README "Security", `sam3d.monailabel.security`): browsers may call the server only from its own origin
unless MONAI_LABEL_CORS_ORIGINS lists others; it refuses to start on a non-loopback --host without an API token
(or MONAI Label's auth). Task processes exit with the server that started them (`sam3d.monailabel.lifecycle`).

A local studies folder is served by `sam3d.monailabel.datastore`: ids, tags and extensions that stay inside it,
uploads checked before they are registered (3D NIfTI, finite, labels on their image's grid; at most
SAM3D_MAX_VOXELS voxels, default 512*512*1024, read from the header), every file written whole or not at all.
"""

import logging
import os
import sys
import tempfile
from pathlib import Path

from fastapi import HTTPException
from monailabel.config import settings
from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.interfaces.exception import ImageNotFoundException, MONAILabelError, MONAILabelException
from monailabel.tasks.activelearning.first import First

import sam3d  # installed by `pip install -e .` (scripts/setup.sh)
from sam3d.monailabel import (
    Sam3DTrainTask,
    build_infer_tasks,
    datastore_api,
    dicomweb_proxy,
    infer_api,
    lifecycle,
    load_app_config,
    ohif,
    security,
    train_api,
)
from sam3d.monailabel.activelearning import (
    RandomStrategy,
    ScoreCache,
    UncertaintyScoring,
    UncertaintyStrategy,
    start_scoring_once,
    why_unscorable,
)
from sam3d.monailabel.datastore import Sam3DDatastore, guard_dicomweb_lookups, max_voxels_setting
from sam3d.monailabel.leases import LeasedStrategy, LeaseStore
from sam3d.monailabel.retrain import RetrainPolicy

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # configs/ of this checkout


def in_task_process() -> bool:
    """True in the process MONAI Label starts for a train/scoring request (it re-creates the app there)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return getattr(spec, "name", None) == "monailabel.interfaces.utils.app"


def state_dir(studies: str, app_dir: str) -> Path:
    """Where the app keeps its own files (training runs, leases, scores): beside a local datastore's images."""
    if os.path.isdir(studies):
        return Path(studies) / ".sam3d"
    return Path(app_dir) / ".sam3d"  # a remote datastore (DICOMweb): no folder of ours there


class MyApp(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        server = sys.modules.get("monailabel.app")  # loaded (never imported here) in the process that answers HTTP
        self.fastapi_app = server.app if server is not None and not in_task_process() else None  # MONAI Label's
        if self.fastapi_app is not None:  # first: a server that must not start stops here (HTTP not yet open)
            try:
                security.install(self.fastapi_app, security.policy_for(conf, sys.argv))
            except security.InsecureServerError as e:
                logger.error(f"sam3d: not starting: {e}")
                raise
            ohif.install(self.fastapi_app)  # the bundled viewer's nested files (MONAI Label answers index.html)
        self.app_config = load_app_config(conf, config_dir=PROJECT_ROOT / "configs")  # skips the security keys
        self.state_dir = state_dir(studies, app_dir)
        if self.fastapi_app is not None:
            lifecycle.register_server(self.state_dir)
        else:
            lifecycle.exit_with_server()  # a task process: no-op unless a server started it
        self.leases = LeaseStore(self.state_dir / "leases.json", self.app_config.lease_minutes)
        self.scores = ScoreCache(self.state_dir / "uncertainty.json")
        self.retrain = RetrainPolicy(
            self.app_config.retrain_every,
            self.state_dir / "retrain.json",
            lambda: train_api.submit_training(self, "sam3d", None),
        )
        logger.info(f"sam3d: app config {self.app_config.source}; tasks {list(self.app_config.infers)}")
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name=self.app_config.name,
            description=self.app_config.description,
            version=sam3d.__version__,
        )
        if self.fastapi_app is None:
            # MONAI Label's scoring after a training run asks the server over HTTP, without the API token; the
            # uncertainty strategy starts scoring itself when the served checkpoint changed
            self._auto_update_scoring = False

    def init_infers(self):
        """One task per configured model (`sam3d.monailabel.TASKS`: its class by the task's kind), with companions."""
        preload = self.app_config.preload and not in_task_process()  # a training process never infers
        infers = build_infer_tasks(self.app_config, preload)
        if self.fastapi_app is not None:  # the server process: checked, queued requests off its event loop
            infer_api.install(self.fastapi_app, self)
        return infers

    def init_trainers(self):
        """`sam3d`: fine-tunes the model of the infer task `train.task` (default sam3d_point), if it is configured."""
        c = self.app_config
        name = c.train.get("task", "sam3d_point")
        spec = c.infers.get(name)
        if spec is None:
            logger.warning(f"sam3d: no train task: the infer task {name!r} (train.task) is not configured")
            return {}
        trainers = {"sam3d": Sam3DTrainTask(spec, c.train, self.state_dir, c.root)}
        if self.fastapi_app is not None:  # the server process: check train requests before they start
            train_api.install(self.fastapi_app, self)
        return trainers

    def _scored_task(self):
        return self.app_config.infers.get(self.app_config.train.get("task", "sam3d_point"))

    def init_strategies(self):
        """random, first and uncertainty, each behind the leases: an image handed out is not handed to another."""
        strategies = {"random": RandomStrategy(), "first": First()}
        spec = self._scored_task()
        if spec is not None:
            strategies["uncertainty"] = UncertaintyStrategy(spec, self.scores, lambda: start_scoring_once(self))
        return {name: LeasedStrategy(s, self.leases) for name, s in strategies.items()}

    def init_scoring_methods(self):
        """`uncertainty`, when the scored model has weights: MONAI Label starts a process for every registered
        method at start-up and after each Next Sample, and one without weights would score nothing each time."""
        spec = self._scored_task()
        if spec is None:
            return {}
        skipped = why_unscorable(spec)
        if skipped:
            if self.fastapi_app is not None:
                logger.info(
                    f"sam3d uncertainty: off ({skipped}); Next Sample hands out images at random until "
                    "the model can score (a restart registers the scoring method)"
                )
            return {}
        c = self.app_config
        return {"uncertainty": UncertaintyScoring(spec, self.scores, c.uncertainty, c.device)}

    def init_datastore(self):
        """The app's local datastore (`sam3d.monailabel.datastore`: checked uploads, names inside the studies folder,
        durable writes; a DICOMweb URL keeps MONAI Label's, its lookups of unknown ids 404), telling the app when a
        final label is saved (on_save_label has no tag)."""
        if self.studies.startswith(("http://", "https://")):
            ds = super().init_datastore()
            if isinstance(ds, DICOMWebDatastore):
                guard_dicomweb_lookups(ds)
        else:
            ds = Sam3DDatastore(
                self.studies,
                max_voxels=max_voxels_setting(),
                upload_dir=tempfile.gettempdir(),  # where MONAI Label's endpoints put uploads
                clean_partial_files=not in_task_process(),  # the server may be mid-save when a task process starts
                auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
                read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
            )
        save_label = ds.save_label

        def save_and_notify(image_id, label_filename, label_tag, label_info):
            label_id = save_label(image_id, label_filename, label_tag, label_info)
            if (label_tag or DefaultLabelTag.FINAL.value) == DefaultLabelTag.FINAL.value:
                self.on_final_label(image_id)
            return label_id

        ds.save_label = save_and_notify
        if self.fastapi_app is not None:  # the server process: uploads and info updates checked before they run
            datastore_api.install(self.fastapi_app)
            dicomweb_proxy.install(self.fastapi_app, dicomweb=isinstance(ds, DICOMWebDatastore))
        return ds

    def on_final_label(self, image_id):
        """A final label was saved: the image's lease ends, and it counts towards the next scheduled training."""
        self.leases.release(image_id)
        if not in_task_process():
            self.retrain.record(image_id)

    def infer(self, request, datastore=None):
        """MONAI Label's infer on an image id of the datastore, never a server path (infer_api's route has checked
        its request's image: an upload or session image is the server's file); unknown models and images are 404."""
        if not infer_api.image_checked_by_route():
            infer_api.check_image_id(request.get("image"), datastore or self.datastore())
        try:
            return super().infer(request, datastore)
        except MONAILabelException as e:
            unknown_model = e.error == MONAILabelError.INVALID_INPUT and "no model" in e.msg
            if isinstance(e, ImageNotFoundException) or unknown_model:
                raise HTTPException(status_code=404, detail=e.msg) from e
            if e.error == MONAILabelError.INVALID_INPUT:
                raise HTTPException(status_code=400, detail=e.msg) from e
            raise
