"""``unlock-fast demo``: chain-of-thought transfer between two small shipped models, offline.

Source: SmolLM2-135M-Instruct (30 layers, d=576). Target: Gemma-3-270M base (18 layers,
d=640). Different families, tokenizers, depths and widths. Steps:

1. load both models (GGUF, converted once and cached);
2. draw disjoint train / held-out / test splits of built-in arithmetic word problems;
3. Source CoT direction (direct vs CoT prompt) and Source->Target alignment on train;
4. held-out alignment diagnostics, and the Target's own CoT direction on held-out items,
   compared per layer with the transferred key against random directions sent through the
   same alignment;
5. null tests: the key's cosine against random and null-contrast bands (every run), and
   its test-split measures against many random and null-contrast keys (``random_keys``,
   ``null_contrasts``); optional layer correspondence and layer subset;
6. optional alpha sweep on the held-out split (``select_alpha`` takes the best alpha from
   it, ``select_rank`` the rank with the best held-out R²), then the four conditions on
   the test split;
7. report.md / report.json / items.jsonl / plots / artifacts in the report folder.
"""

from __future__ import annotations

from .config import DEFAULTS, QUICK, DemoConfig, DemoResult
from .run import run_demo

__all__ = ["DEFAULTS", "QUICK", "DemoConfig", "DemoResult", "run_demo"]
