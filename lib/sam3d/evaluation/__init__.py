"""Evaluation: click protocols (sam3d.data.clicks), metrics, a baseline without weights, reports and plots.

Nothing here depends on MONAI Label except `ServerSegmenter`, which imports its client when it is built.
"""

from ..engine.model_config import load_model_config
from ..metrics import NOC_THRESHOLDS, noc, segmentation_metrics
from .baseline import RandomWalkerConfig, RandomWalkerSegmenter, random_walker_segment
from .report import write_report
from .runner import COLUMNS, EvalConfig, run_evaluation, run_target
from .segmenters import (
    ClicksOnlySegmenter,
    PredictorSegmenter,
    Segmenter,
    ServerSegmenter,
    segmenter_from_config,
)

__all__ = [
    "COLUMNS",
    "ClicksOnlySegmenter",
    "NOC_THRESHOLDS",
    "PredictorSegmenter",
    "EvalConfig",
    "RandomWalkerConfig",
    "RandomWalkerSegmenter",
    "Segmenter",
    "segmenter_from_config",
    "ServerSegmenter",
    "load_model_config",
    "noc",
    "random_walker_segment",
    "run_evaluation",
    "run_target",
    "segmentation_metrics",
    "write_report",
]
