"""Thin adapters between sam3d and MONAI Label: the app's configuration, the infer and train tasks."""

from .app_config import AppConfig, AppConfigError, TaskSpec, load_app_config
from .infer_auto import Sam3DAutoInfer
from .infer_base import Sam3DInferTask
from .infer_point import Sam3DPointInfer
from .infer_tasks import TASKS, build_infer_tasks
from .infer_text import Sam3DTextClassPrompts, Sam3DTextInfer
from .train_task import Sam3DTrainTask, TrainRequestError

__all__ = [
    "TASKS",
    "AppConfig",
    "AppConfigError",
    "Sam3DAutoInfer",
    "Sam3DInferTask",
    "Sam3DPointInfer",
    "Sam3DTextClassPrompts",
    "Sam3DTextInfer",
    "Sam3DTrainTask",
    "TaskSpec",
    "TrainRequestError",
    "build_infer_tasks",
    "load_app_config",
]
