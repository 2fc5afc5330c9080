"""What the pipeline makes and saves: plain data types over one safetensors + JSON format.

Each kind registers its loader with :mod:`.store`, so :func:`load_artifact` opens any of
them without knowing their classes. Importing this package registers every kind.
"""

from .alignment import Alignment, AlignmentStats
from .direction import Direction
from .key import KeyLike, SteeringKey
from .model_info import ModelInfo
from .report import AlignmentReport
from .store import (
    Artifact,
    expect_shape,
    load_artifact,
    read_artifact,
    register_kind,
    registered_kinds,
    save_artifact,
)

__all__ = [
    "Alignment",
    "AlignmentReport",
    "AlignmentStats",
    "Artifact",
    "Direction",
    "KeyLike",
    "ModelInfo",
    "SteeringKey",
    "expect_shape",
    "load_artifact",
    "read_artifact",
    "register_kind",
    "registered_kinds",
    "save_artifact",
]
