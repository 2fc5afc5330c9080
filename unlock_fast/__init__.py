"""unlock-fast: training-free capability transfer between language models (UNLOCK).

The data flows one way: prompts → :mod:`capture` (hooks on the decoder blocks) →
:mod:`collect` (lockstep passes) → :mod:`stats` (streaming moments) → :mod:`direction` and
:mod:`alignment` (with :mod:`estimator`) → :mod:`artifacts` (keys, directions, alignments)
→ :mod:`steering` (hooks that apply a key during ``generate``).
"""

from __future__ import annotations

from ._version import __version__
from .alignment import collect_alignment_stats, fit_alignment, proportional_layer_map
from .alignment_data import ALIGNMENT_DATA
from .artifacts import (
    Alignment,
    AlignmentReport,
    AlignmentStats,
    Direction,
    KeyLike,
    ModelInfo,
    SteeringKey,
    load_artifact,
)
from .corpus import generic_corpus, read_corpus, write_corpus
from .direction import extract_direction
from .ops import backends
from .steering import SteeringHandle, steer
from .transfer import collect_transfer

__all__ = [
    "ALIGNMENT_DATA",
    "Alignment",
    "AlignmentReport",
    "AlignmentStats",
    "Direction",
    "KeyLike",
    "ModelInfo",
    "SteeringHandle",
    "SteeringKey",
    "__version__",
    "backends",
    "collect_alignment_stats",
    "collect_transfer",
    "extract_direction",
    "fit_alignment",
    "generic_corpus",
    "load_artifact",
    "proportional_layer_map",
    "read_corpus",
    "steer",
    "write_corpus",
]
