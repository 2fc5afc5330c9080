"""Layer subsets: steer only the layers where the alignment is good.

:func:`select_layer_subset` keeps the Target layers whose held-out centred R² is above a
threshold: a given one, or by default the cut that splits the held-out R² values into two
groups with the smallest total within-group variance (1-D two-means). The subset goes to
``steer(..., layers=...)``, or :func:`restrict_key` makes a key of those layers only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..artifacts import SteeringKey

__all__ = ["LayerSubset", "restrict_key", "select_layer_subset"]


@dataclass
class LayerSubset:
    """The layers to steer: those whose held-out R² is above ``threshold``."""

    layers: list[int]
    threshold: float
    rule: str
    all_layers: list[int]
    r2: list[float]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _two_group_split(values: list[float]) -> float:
    """The threshold between the two groups of ``values`` with the smallest total
    within-group variance (1-D two-means, exact over the sorted cut points)."""
    v = sorted(values)
    best, cut = math.inf, v[0] - 1.0
    for i in range(1, len(v)):
        lo, hi = v[:i], v[i:]
        cost = sum((x - sum(lo) / len(lo)) ** 2 for x in lo) + sum(
            (x - sum(hi) / len(hi)) ** 2 for x in hi
        )
        if cost < best - 1e-15:
            best, cut = cost, (v[i - 1] + v[i]) / 2
    return cut


def _descending(v: float) -> float:
    return -v if math.isfinite(v) else math.inf


def select_layer_subset(
    layers: Sequence[int],
    r2: Sequence[float],
    *,
    threshold: float | None = None,
    min_layers: int = 1,
) -> LayerSubset:
    """The layers with held-out R² > ``threshold``; with no threshold, the two-group split
    of the held-out R² values (module docstring). At least ``min_layers`` layers (the best
    ones) are kept."""
    names, vals = [int(x) for x in layers], [float(x) for x in r2]
    if len(names) != len(vals) or not names:
        raise ValueError(f"layers and r2 must be non-empty and equal in length, got "
                         f"{len(names)} and {len(vals)}")  # fmt: skip
    if isinstance(min_layers, bool) or not isinstance(min_layers, int) or min_layers < 1:
        raise ValueError(f"min_layers must be a positive int, got {min_layers!r}")
    finite = [v for v in vals if math.isfinite(v)]
    if threshold is not None:
        cut, rule = float(threshold), "given threshold"
    elif len(set(finite)) < 2:
        cut, rule = -math.inf, "all layers (the held-out R² values do not split)"
    else:
        cut, rule = _two_group_split(finite), "two-group split of the held-out R²"
    chosen = [n for n, v in zip(names, vals, strict=True) if math.isfinite(v) and v > cut]
    if len(chosen) < min_layers:
        ranked = sorted(zip(vals, names, strict=True), key=lambda p: _descending(p[0]))
        chosen = sorted(n for _, n in ranked[:min_layers])
    return LayerSubset(sorted(chosen), cut, rule, names, vals)


def restrict_key(key: SteeringKey, layers: Sequence[int]) -> SteeringKey:
    """The key's vectors at ``layers`` only (steering then leaves the other layers alone)."""
    chosen = [int(x) for x in layers]
    missing = [x for x in chosen if x not in key.layers]
    if missing or not chosen:
        raise ValueError(f"layers {chosen} must be a non-empty subset of the key's {key.layers}")
    rows = torch.stack([key.vector(x) for x in chosen])
    origin = {**key.origin, "layers_subset": chosen}
    return SteeringKey(rows.clone(), chosen, key.model, origin)
