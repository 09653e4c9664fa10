"""The app's infer tasks: one class per model kind, built from the app config."""

import logging

from .app_config import AppConfig
from .infer_auto import Sam3DAutoInfer
from .infer_base import Sam3DInferTask
from .infer_point import Sam3DPointInfer
from .infer_text import Sam3DTextInfer

logger = logging.getLogger(__name__)

TASKS: dict[str, type[Sam3DInferTask]] = {"point": Sam3DPointInfer, "text": Sam3DTextInfer, "auto": Sam3DAutoInfer}


def build_infer_tasks(config: AppConfig, preload: bool | None = None) -> dict[str, Sam3DInferTask]:
    """name -> task for every configured task (a misconfigured one too: /info says what is wrong), their
    companions (the text task's OHIF class prompts), each told of the others (a click may refine an automatic
    task's class)."""
    preload = config.preload if preload is None else preload
    tasks: dict[str, Sam3DInferTask] = {}
    for name, spec in config.infers.items():
        task_class = TASKS.get(spec.kind, Sam3DPointInfer)  # an unknown kind is in spec.error already
        task = task_class(spec, device=config.device, strict_labels=config.strict_labels, preload=preload)
        state, message = task.status()
        (logger.info if state in ("not_loaded", "ready") else logger.warning)(f"sam3d: task {name}: {message}")
        tasks[name] = task
    for task in list(tasks.values()):
        for companion in task.companions():
            tasks.setdefault(companion.name, companion)
    for task in tasks.values():
        task.connect(tasks)
    return tasks
