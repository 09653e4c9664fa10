"""Thin adapters between sam3d and MONAI Label: the app's configuration and the infer tasks."""

from .app_config import AppConfig, AppConfigError, TaskSpec, load_app_config
from .infer_point import Sam3DPointInfer

__all__ = ["AppConfig", "AppConfigError", "Sam3DPointInfer", "TaskSpec", "load_app_config"]
