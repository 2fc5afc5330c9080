"""How a steered vLLM engine is started: its settings, flags and environment.

Every process of the engine (front end, engine core, workers) needs the same: vLLM's V1
model runner (``VLLM_USE_V2_MODEL_RUNNER=0``; ``vllm/config/vllm.py`` picks Model Runner V2
by default in vLLM 0.32 and 0.33 wherever Triton imports), the architectures whose steered
classes the plugin registers (:mod:`.model`), the worker extension (:mod:`.worker`), and the
``additional_config`` entry that sizes the key table.
"""

from __future__ import annotations

import json
import os

from transformers import AutoConfig

from unlock_fast_plugin import ARCHITECTURES_ENV  # the plugin reads it; defined there once

__all__ = [
    "ARCHITECTURES_ENV",
    "CONFIG_KEY",
    "DEFAULT_SLOTS",
    "EXTENSION",
    "RUNNER_ENV",
    "engine_config",
    "engine_environment",
    "engine_flags",
]

RUNNER_ENV = "VLLM_USE_V2_MODEL_RUNNER"
CONFIG_KEY = "unlock_fast"  # the entry of vLLM's additional_config
DEFAULT_SLOTS = 16
EXTENSION = "unlock_fast.serving.worker.UnlockWorkerExtension"


def engine_config(slots: int = DEFAULT_SLOTS) -> dict[str, dict[str, int]]:
    """The ``additional_config`` of a steered engine: room for ``slots`` keys at once."""
    if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
        raise ValueError(f"max_keys must be a positive int, got {slots!r}")
    return {CONFIG_KEY: {"slots": slots}}


def engine_environment(model: str) -> dict[str, str]:
    """The variables every process of a steered engine needs. ValueError when the user
    asked for Model Runner V2, or the model's config names no architecture."""
    if os.environ.get(RUNNER_ENV, "0").strip().lower() in ("1", "true"):
        raise ValueError(
            f"unlock-fast steers on vLLM's V1 model runner; unset {RUNNER_ENV}=1 (it selects "
            "Model Runner V2)"
        )
    archs = getattr(AutoConfig.from_pretrained(model), "architectures", None) or []
    if not archs:
        raise ValueError(f"{model}: its config names no architecture, so vLLM cannot load it")
    return {RUNNER_ENV: "0", ARCHITECTURES_ENV: ",".join(archs)}


def engine_flags(slots: int) -> list[str]:
    """vLLM command-line flags of a steered server (``unlock-fast serve``)."""
    return [
        "--worker-extension-cls",
        EXTENSION,
        "--additional-config",
        json.dumps(engine_config(slots)),
    ]
