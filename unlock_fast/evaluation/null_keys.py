"""Null keys: keys that look like the transferred key but should not carry the capability.

Two families, both with the transferred key's per-layer norms (so only the direction
differs, as for the random control):

- **random keys**: Gaussian directions in the Target space (``random_key_like``, seeded);
- **null-contrast keys**: the Source direction rebuilt with the contrast shuffled, then sent
  through the *same* alignment. The Source direction is the mean per-item difference
  v = (1/N) Σ_i d_i with d_i = h(unlocked form of item i) - h(locked form of item i); a null
  contrast swaps the two forms of each item independently with probability 1/2 (a random
  sign s_i ∈ {-1, +1}): v_null = (1/N) Σ_i s_i d_i. If the two forms are exchangeable
  within an item (no consistent locked→unlocked shift), v and v_null have the same
  distribution. Permuting which unlocked item pairs with which locked item would leave the
  mean difference unchanged, so the swap is the shuffle that makes a null for the ``mean``
  direction. Draw j uses the signs of row j of a Rademacher matrix [num, N] seeded by
  ``seed``, whatever the batching.

:func:`representational_null` then compares the key's per-layer cosine with the Target's own
direction against both families (:func:`~unlock_fast.evaluation.null.layer_test`).
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
from .runner import random_key_like

__all__ = [
    "RepresentationalNull",
    "SignFlipAccumulator",
    "cosine_matrix",
    "null_contrast_directions",
    "null_contrast_keys",
    "random_cosines",
    "random_keys",
    "representational_null",
    "transfer_vectors",
]


def _count(name: str, value: object, least: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
    return value


def random_keys(key: SteeringKey, num: int, *, seed: int = 0) -> list[SteeringKey]:
    """``num`` random keys of ``key``'s per-layer norms, seeds ``seed``, ``seed + 1``, ..."""
    _count("num", num, 0)
    return [random_key_like(key, seed=seed + i) for i in range(num)]


def rademacher(num: int, n: int, seed: int) -> torch.Tensor:
    """A [num, n] matrix of independent ±1 (float64), seeded."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (num, n), generator=gen).double() * 2 - 1


class SignFlipAccumulator:
    """Streams per-item differences d_i at some layers into ``num`` sign-flipped sums
    Σ_i s_ji d_i (float64), s = :func:`rademacher` (num, num_items, seed)."""

    def __init__(self, layers: Sequence[int], dim: int, num: int, num_items: int, seed: int):
        self.layers = list(layers)
        self.signs = rademacher(_count("num", num), _count("num_items", num_items), seed)
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
            diff = unlocked[layer].double().cpu() - locked[layer].double().cpu()
            self.sums[:, i] += s @ diff
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
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
) -> list[Direction]:
    """``num`` null-contrast directions of ``model`` (module docstring), one pass over the
    items' two forms. ``layers`` defaults to every decoder layer."""
    locked = check_prompts("prompts_locked", prompts_locked)
    unlocked = check_prompts("prompts_unlocked", prompts_unlocked)
    if len(locked) != len(unlocked):
        raise ValueError(
            f"prompts_locked and prompts_unlocked must pair up: got {len(locked)} and "
            f"{len(unlocked)} prompts"
        )
    info = ModelInfo.of(model, layer_path)
    sel = list(range(info.num_layers)) if layers is None else [int(x) for x in layers]
    bad = [x for x in sel if not 0 <= x < info.num_layers]
    if bad or not sel:
        raise ValueError(f"layers must be in [0, {info.num_layers}), got {sel}")
    acc = SignFlipAccumulator(sel, info.hidden_size, num, len(locked), seed)
    sides = [
        Side(model, tokenizer, locked, sel, layer_path),
        Side(model, tokenizer, unlocked, sel, layer_path),
    ]
    with lockstep(
        sides,
        desc="null contrasts",
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        progress=progress,
    ) as batches:
        for lo, hi in batches:
            acc.update(lo.rows, hi.rows, lo.indices)
    vecs = acc.vectors()
    return [Direction(vecs[j].clone(), sel, "sign_flip", acc.count, info) for j in range(num)]


def _apply(alignment: Alignment, i: int, v: torch.Tensor) -> torch.Tensor:
    """Rows v [n, d_s] mapped by layer pair i of the alignment: v E_s M E_tᵀ [n, d_t]."""
    return ((v @ alignment.source_basis[i]) @ alignment.core[i]) @ alignment.target_basis[i].T


def transfer_vectors(
    alignment: Alignment, vectors: torch.Tensor, source_layers: Sequence[int]
) -> torch.Tensor:
    """Send many Source directions through the alignment at once.

    vectors: [n, len(source_layers), d_s]; returns [n, P, d_t] for the alignment's P layer
    pairs (row p is v_s[s_p] @ T_p), the same map as :meth:`Alignment.transfer`.
    """
    if vectors.dim() != 3 or vectors.shape[2] != alignment.source.hidden_size:
        raise ValueError(
            f"vectors must be [n, layers, {alignment.source.hidden_size}], got "
            f"{list(vectors.shape)}"
        )
    pos = {int(s): i for i, s in enumerate(source_layers)}
    missing = sorted({s for s, _ in alignment.layer_map} - set(pos))
    if missing:
        raise ValueError(f"the vectors lack source layers {missing} that the layer map uses")
    rows = []
    for i, (s, _) in enumerate(alignment.layer_map):
        v = vectors[:, pos[s]].float()
        rows.append(_apply(alignment, i, v))
    return torch.stack(rows, dim=1)


def _like_norms(vectors: torch.Tensor, like: SteeringKey) -> torch.Tensor:
    """Rescale [n, L, d] so that every layer has ``like``'s norm there."""
    norms = like.vectors.double().norm(dim=-1)  # [L]
    v = vectors.double()
    return (v / v.norm(dim=-1, keepdim=True).clamp_min(1e-300) * norms[None, :, None]).float()


def null_contrast_keys(
    alignment: Alignment, directions: Sequence[Direction], like: SteeringKey
) -> list[SteeringKey]:
    """Transfer null-contrast directions through ``alignment`` and give each key ``like``'s
    per-layer norms (``like`` is the transferred key; same layers)."""
    if not directions:
        return []
    if list(like.layers) != alignment.target_layers:
        raise ValueError(
            f"like covers layers {like.layers}, the alignment {alignment.target_layers}"
        )
    layers = list(directions[0].layers)
    if any(list(d.layers) != layers for d in directions):
        raise ValueError("all null-contrast directions must cover the same layers")
    stacked = torch.stack([d.vectors for d in directions])
    mapped = _like_norms(transfer_vectors(alignment, stacked, layers), like)
    return [
        SteeringKey(
            mapped[j],
            alignment.target_layers,
            alignment.target,
            {"kind": "null_contrast", "index": j, "like": dict(like.origin)},
        )
        for j in range(len(directions))
    ]


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine of the rows of a [..., d] with b [d] (float64)."""
    a, b = a.double(), b.double()
    return (a @ b) / (a.norm(dim=-1) * b.norm()).clamp_min(1e-300)


def random_cosines(
    alignment: Alignment, own: Direction, layers: Sequence[int], *, num: int, seed: int = 0
) -> torch.Tensor:
    """[num, len(layers)]: cosine with ``own`` of Gaussian Source directions sent through
    the alignment, per Target layer; the same draws as :func:`key_cosines` with this seed."""
    _count("num", num)
    gen = torch.Generator().manual_seed(seed)
    cols = []
    for layer in layers:
        i = alignment.target_layers.index(layer)
        noise = torch.randn(num, alignment.source.hidden_size, generator=gen)
        cols.append(_cos(_apply(alignment, i, noise), own.vector(layer)))
    return torch.stack(cols, dim=1)


def cosine_matrix(
    keys: Sequence[SteeringKey], own: Direction, layers: Sequence[int]
) -> torch.Tensor:
    """[len(keys), len(layers)]: cosine of each key with ``own`` at each layer."""
    return torch.stack(
        [torch.stack([_cos(k.vector(layer), own.vector(layer)) for layer in layers]) for k in keys]
    )


@dataclass
class RepresentationalNull:
    """The key's per-layer cosine with the Target's own direction against each null family:
    ``tests`` maps "random" (random Source directions via the alignment) and, when given,
    "null_contrast" to a :class:`~unlock_fast.evaluation.null.LayerTest`."""

    layers: list[int]
    cosine: list[float]
    tests: dict[str, LayerTest]

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": self.layers,
            "cosine": self.cosine,
            "tests": {k: t.to_dict() for k, t in self.tests.items()},
        }


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
    """Cosine of ``key`` with ``own`` per common layer, tested against ``num_random`` random
    directions via ``alignment`` and against ``contrast_keys`` (:func:`null_contrast_keys`)."""
    if key.model.hidden_size != own.model.hidden_size:
        raise ValueError(
            f"the key (hidden size {key.model.hidden_size}) and the own direction (hidden "
            f"size {own.model.hidden_size}) belong to different models"
        )
    layers = [x for x in key.layers if x in own.layers and x in alignment.target_layers]
    if not layers:
        raise ValueError(f"no common layers: key {key.layers}, own direction {own.layers}")
    cos = cosine_matrix([key], own, layers)[0]
    tests = {
        "random": layer_test(
            cos,
            random_cosines(alignment, own, layers, num=num_random, seed=seed),
            layers=layers,
            level=level,
            name="random directions via the alignment",
        )
    }
    if contrast_keys:
        tests["null_contrast"] = layer_test(
            cos,
            cosine_matrix(contrast_keys, own, layers),
            layers=layers,
            level=level,
            name="null-contrast keys",
        )
    return RepresentationalNull(layers, cos.tolist(), tests)
