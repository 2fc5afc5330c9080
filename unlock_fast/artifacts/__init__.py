"""What the pipeline makes and saves: plain data types over one safetensors + JSON format.

Each kind registers its loader with :mod:`.store`, so :func:`load_artifact` opens any of
them without knowing their classes. Importing this package registers every kind. Every
kind reads its files through :func:`open_artifact` and :mod:`.schema`, so a damaged or
hostile folder is one ValueError that names the file.
"""

from .alignment import Alignment, AlignmentStats
from .direction import Direction
from .key import KeyLike, SteeringKey
from .model_info import ModelInfo
from .report import AlignmentReport
from .schema import Meta, TensorSpec
from .store import (
    Artifact,
    StoredArtifact,
    expect_shape,
    load_artifact,
    open_artifact,
    read_artifact,
    read_meta,
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
    "Meta",
    "ModelInfo",
    "SteeringKey",
    "StoredArtifact",
    "TensorSpec",
    "expect_shape",
    "load_artifact",
    "open_artifact",
    "read_artifact",
    "read_meta",
    "register_kind",
    "registered_kinds",
    "save_artifact",
]
