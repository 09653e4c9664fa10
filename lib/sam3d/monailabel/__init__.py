"""Thin adapters between sam3d and MONAI Label: the app's configuration, the infer and train tasks."""

from .app_config import AppConfig, AppConfigError, TaskSpec, load_app_config
from .infer_auto import Sam3DAutoInfer
from .infer_point import Sam3DPointInfer
from .infer_text import Sam3DTextClassPrompts, Sam3DTextInfer
from .train_task import Sam3DTrainTask, TrainRequestError

__all__ = ["AppConfig", "AppConfigError", "Sam3DAutoInfer", "Sam3DPointInfer", "Sam3DTextClassPrompts",
           "Sam3DTextInfer", "Sam3DTrainTask", "TaskSpec", "TrainRequestError", "load_app_config"]
