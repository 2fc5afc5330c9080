"""unlock-fast's ``vllm.general_plugins`` entry point, which every vLLM process runs.

It does nothing unless ``$UNLOCK_FAST_ARCHITECTURES`` is set, as it is only for the engines
that ``unlock_fast.vllm.steered_llm`` and ``unlock-fast serve`` start; it then registers the
steered model classes (``unlock_fast.serving.model``) for those architectures. It lives
outside the ``unlock_fast`` package so that no other engine even imports the library.
"""

from __future__ import annotations

import os

ARCHITECTURES_ENV = "UNLOCK_FAST_ARCHITECTURES"  # comma-separated; set for steered engines only


def register() -> None:
    names = [a for a in os.environ.get(ARCHITECTURES_ENV, "").split(",") if a]
    if names:
        from unlock_fast.serving.model import register_architectures

        register_architectures(names)
