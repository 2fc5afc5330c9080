"""unlock-fast: training-free capability transfer between language models (UNLOCK)."""

from __future__ import annotations

__version__ = "0.1.0"

# The pipeline: direction -> alignment -> transfer -> steering (imports stay below __version__).
from .alignment import (  # noqa: E402
    Alignment,
    AlignmentReport,
    AlignmentStats,
    collect_alignment_stats,
    fit_alignment,
)
from .artifacts import ModelInfo, load_artifact  # noqa: E402
from .direction import Direction, extract_direction  # noqa: E402
from .ops import backends  # noqa: E402
from .steering import SteeringHandle, SteeringKey, steer  # noqa: E402

__all__ = [
    "Alignment",
    "AlignmentReport",
    "AlignmentStats",
    "Direction",
    "ModelInfo",
    "SteeringHandle",
    "SteeringKey",
    "backends",
    "collect_alignment_stats",
    "extract_direction",
    "fit_alignment",
    "load_artifact",
    "steer",
]
