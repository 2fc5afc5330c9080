"""Null keys, with the transferred key's per-layer norms so only the direction differs.

Random keys: Gaussian Target directions. Null-contrast keys: the Source direction
v = (1/N) Σ d_i (d_i: unlocked minus locked form of item i) rebuilt with each item's forms
swapped at random, v_null = (1/N) Σ s_i d_i, s_i = ±1 (row j of a seeded Rademacher matrix),
then sent through the same alignment: exchangeable forms make v and v_null alike (permuting
pairs would leave the mean unchanged, so the swap is the shuffle that makes a null).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..artifacts import Alignment, Direction, ModelInfo, SteeringKey
from ..collect import Side, check_prompts, lockstep
from .null import LayerTest, layer_test

__all__ = [
    "RepresentationalNull", "SignFlipAccumulator", "cosines", "null_contrast_directions",
    "null_contrast_keys", "random_cosines", "random_keys", "representational_null"
]  # fmt: skip


def _count(name: str, value: object, least: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
    return value


def random_keys(key: SteeringKey, num: int, *, seed: int = 0) -> list[SteeringKey]:
    """``num`` random keys of ``key``'s per-layer norms, seeds ``seed``, ``seed + 1``, ..."""
    return [SteeringKey.random_like(key, seed=seed + i) for i in range(_count("num", num, 0))]


class SignFlipAccumulator:
    """Streams per-item differences d_i at some layers into ``num`` sign-flipped sums
    Σ_i s_ji d_i (float64), the signs a seeded Rademacher matrix [num, num_items]."""

    def __init__(self, layers: Sequence[int], dim: int, num: int, num_items: int, seed: int):
        self.layers = list(layers)
        gen = torch.Generator().manual_seed(seed)
        shape = (_count("num", num), _count("num_items", num_items))
        self.signs = torch.randint(0, 2, shape, generator=gen).double() * 2 - 1
        self.sums = torch.zeros(num, len(self.layers), dim, dtype=torch.float64)
        self.count = 0

    def update(
        self,
        locked: dict[int, torch.Tensor],
        unlocked: dict[int, torch.Tensor],
        indices: Sequence[int],
    ) -> None:
        """Add one batch: rows [b, d] per layer of both forms of the items ``indices``."""
        s = self.signs[:, list(indices)]  # [num, b]
        for i, layer in enumerate(self.layers):
            self.sums[:, i] += s @ (unlocked[layer].double().cpu() - locked[layer].double().cpu())
        self.count += len(indices)

    def vectors(self) -> torch.Tensor:
        """The null directions [num, len(layers), d] (float32)."""
        if self.count == 0:
            raise ValueError("no items were processed")
        return (self.sums / self.count).float()


def null_contrast_directions(
    model: nn.Module,
    tokenizer: Any,
    prompts_locked: Sequence[str],
    prompts_unlocked: Sequence[str],
    *,
    num: int,
    seed: int = 0,
    layers: Sequence[int] | None = None,
    layer_path: str | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> list[Direction]:
    """``num`` null-contrast directions of ``model`` (module doc), one pass over the items'
    two forms. ``layers`` defaults to every decoder layer."""
    locked = check_prompts("prompts_locked", prompts_locked)
    unlocked = check_prompts("prompts_unlocked", prompts_unlocked)
    if len(locked) != len(unlocked):
        raise ValueError(
            f"prompts_locked and prompts_unlocked must pair up: got {len(locked)} and "
            f"{len(unlocked)} prompts"
        )
    info = ModelInfo.of(model, layer_path)
    sel = list(range(info.num_layers)) if layers is None else [int(x) for x in layers]
    if not sel or any(not 0 <= x < info.num_layers for x in sel):
        raise ValueError(f"layers must be in [0, {info.num_layers}), got {sel}")
    acc = SignFlipAccumulator(sel, info.hidden_size, num, len(locked), seed)
    sides = [Side(model, tokenizer, p, sel, layer_path) for p in (locked, unlocked)]
    kw: dict[str, Any] = dict(desc="null contrasts", batch_size=batch_size, progress=progress)
    with lockstep(sides, **kw) as batches:
        for lo, hi in batches:
            acc.update(lo.rows, hi.rows, lo.indices)
    vecs = acc.vectors()
    return [Direction(vecs[j].clone(), sel, "sign_flip", acc.count, info) for j in range(num)]


def null_contrast_keys(
    alignment: Alignment, directions: Sequence[Direction], like: SteeringKey
) -> list[SteeringKey]:
    """Null-contrast directions sent through ``alignment``, each with ``like``'s per-layer
    norms (``like``: the transferred key, on the alignment's layers)."""
    if not directions:
        return []
    if list(like.layers) != alignment.target_layers:
        raise ValueError(
            f"like covers layers {like.layers}, the alignment {alignment.target_layers}"
        )
    layers = list(directions[0].layers)
    if any(list(d.layers) != layers for d in directions):
        raise ValueError("all null-contrast directions must cover the same layers")
    missing = sorted({s for s, _ in alignment.layer_map} - set(layers))
    if missing:
        raise ValueError(f"the directions lack source layers {missing} that the layer map uses")
    stacked = torch.stack([d.vectors for d in directions]).float()  # [n, L_s, d_s]
    mapped = [
        alignment.map_directions(stacked[:, layers.index(s)], t) for s, t in alignment.layer_map
    ]
    rows = torch.stack(mapped, dim=1)  # [n, P, d_t]
    return [
        SteeringKey(rows[j], alignment.target_layers, alignment.target, {
            "kind": "null_contrast", "index": j, "like": dict(like.origin)
        }).with_norms_of(like)
        for j in range(len(directions))
    ]  # fmt: skip


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine of the rows of a [..., d] with b [d] (float64)."""
    a, b = a.double(), b.double()
    return (a @ b) / (a.norm(dim=-1) * b.norm()).clamp_min(1e-300)


def cosines(keys: Sequence[SteeringKey], own: Direction, layers: Sequence[int]) -> torch.Tensor:
    """[len(keys), len(layers)]: cosine of each key with ``own`` at each layer."""
    return torch.stack(
        [torch.stack([_cos(k.vector(x), own.vector(x)) for x in layers]) for k in keys]
    )


def random_cosines(
    alignment: Alignment, own: Direction, layers: Sequence[int], *, num: int, seed: int = 0
) -> torch.Tensor:
    """[num, len(layers)]: cosine with ``own`` of Gaussian Source directions sent through
    the alignment, per Target layer (a fresh draw per layer from one seeded stream)."""
    gen = torch.Generator().manual_seed(seed)
    cols = []
    for x in layers:
        noise = torch.randn(_count("num", num), alignment.source.hidden_size, generator=gen)
        cols.append(_cos(alignment.map_directions(noise, x), own.vector(x)))
    return torch.stack(cols, dim=1)


@dataclass
class RepresentationalNull:
    """The key's per-layer cosine with the Target's own direction against each null family:
    "random" (random Source directions via the alignment) and, when given, "null_contrast"."""

    layers: list[int]
    cosine: list[float]
    tests: dict[str, LayerTest]
    chance: float  # 1.96/sqrt(d_t): the 95% band of a random direction in the Target space

    def to_dict(self) -> dict[str, Any]:
        return {"layers": self.layers, "cosine": self.cosine, "tests": self.tests}


def representational_null(
    key: SteeringKey,
    own: Direction,
    *,
    alignment: Alignment,
    num_random: int = 200,
    contrast_keys: Sequence[SteeringKey] = (),
    seed: int = 0,
    level: float = 0.975,
) -> RepresentationalNull:
    """Cosine of ``key`` with ``own`` per common layer, against ``num_random`` random
    directions via ``alignment`` and against ``contrast_keys`` (:func:`null_contrast_keys`)."""
    if key.model.hidden_size != own.model.hidden_size:
        raise ValueError(
            f"the key (hidden size {key.model.hidden_size}) and the own direction (hidden "
            f"size {own.model.hidden_size}) belong to different models"
        )
    layers = [x for x in key.layers if x in own.layers and x in alignment.target_layers]
    if not layers:
        raise ValueError(f"no common layers: key {key.layers}, own direction {own.layers}")
    cos = cosines([key], own, layers)[0]
    draws = {"random": random_cosines(alignment, own, layers, num=num_random, seed=seed)}
    if contrast_keys:
        draws["null_contrast"] = cosines(contrast_keys, own, layers)
    names = {"random": "random directions via the alignment", "null_contrast": "null-contrast keys"}
    tests = {
        k: layer_test(cos, v, layers=layers, level=level, name=names[k]) for k, v in draws.items()
    }
    return RepresentationalNull(layers, cos.tolist(), tests, 1.96 / key.model.hidden_size**0.5)
