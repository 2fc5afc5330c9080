"""Extract the capability direction ("master key") of a Source model, per decoder layer.

Two contrasts, as in the paper:

- prompt contrast: one model, a locked and an unlocked template of the same items
  (e.g. direct vs chain-of-thought prompts);
- model contrast: a locked and an unlocked model (e.g. base vs post-trained), usually the
  same prompts.

The methods are small functions in :data:`METHODS`: ``mean`` gives
v_l = mean_i [h_l(unlocked, i) - h_l(locked, i)] (not normalised); ``pca`` the top principal
axis of the centred differences, signed so that v . mean > 0, unit norm.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed import ProcessGroup

from . import ops
from .artifacts import Direction, ModelInfo
from .collect import Side, check_prompts, lockstep
from .distributed import all_reduce_sum_
from .layers import decoder_layers, resolve_layer_indices
from .stats import Moments

__all__ = ["METHODS", "DirectionAccumulator", "DirectionMethod", "extract_direction"]


@dataclass(frozen=True)
class DirectionMethod:
    """How a direction is made from the mean difference and, if needed, the covariance of
    the per-item differences (centred Moments)."""

    name: str
    finalize: Callable[[torch.Tensor, Moments | None], torch.Tensor]
    needs_covariance: bool = False
    min_prompts: int = 1


def _mean_direction(mean: torch.Tensor, _: Moments | None) -> torch.Tensor:
    return mean


def _pca_direction(mean: torch.Tensor, diffs: Moments | None) -> torch.Tensor:
    if diffs is None:
        raise ValueError("the pca method needs the covariance of the differences")
    r = diffs.row_factor("x", centered=True)
    if r is not None and r.shape[0] < r.shape[1]:  # kept rows: the N×N kernel's top vector
        _, u = ops.eigh_topk(r @ r.T, 1)
        v = r.T @ u[:, 0].to(r)
    else:
        _, vec = ops.eigh_topk(diffs.gram("xx", centered=True), 1)
        v = vec[:, 0].to(torch.float64)
    v = v / v.norm().clamp_min(1e-300)
    return -v if float(v @ mean.to(v.device)) < 0 else v


METHODS: dict[str, DirectionMethod] = {
    "mean": DirectionMethod("mean", _mean_direction),
    "pca": DirectionMethod("pca", _pca_direction, needs_covariance=True, min_prompts=2),
}


class DirectionAccumulator:
    """Streams locked/unlocked row pairs of some layers into per-layer difference sums
    (and their Moments for methods that need a covariance)."""

    def __init__(self, layers: Sequence[int], dim: int, method: str) -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {tuple(METHODS)}, got {method!r}")
        self.layers = list(layers)
        self.dim = dim
        self.method = METHODS[method]
        self.count = 0
        self.sums: dict[int, torch.Tensor] = {}
        self.moments: dict[int, Moments] = {}

    def update(self, locked: dict[int, torch.Tensor], unlocked: dict[int, torch.Tensor]) -> None:
        """Add one batch: rows [n, d] per layer of the locked and the unlocked side."""
        n = 0
        for layer in self.layers:
            diff = unlocked[layer].float() - locked[layer].float()
            n = diff.shape[0]
            if layer not in self.sums:
                self.sums[layer] = torch.zeros(self.dim, dtype=torch.float64, device=diff.device)
            self.sums[layer] += diff.sum(0, dtype=torch.float64)
            if self.method.needs_covariance:
                if layer not in self.moments:
                    self.moments[layer] = Moments(self.dim, device=diff.device, row_limit="auto")
                self.moments[layer].update(diff)
        self.count += n

    def all_reduce(self, group: ProcessGroup | None, device: torch.device | None) -> None:
        """Sum over the processes of ``group`` (a process with no prompts takes part too)."""
        dev = device or next(iter(self.sums.values()), torch.zeros(0)).device
        packed = torch.zeros(len(self.layers) + 1, self.dim, dtype=torch.float64, device=dev)
        for i, layer in enumerate(self.layers):
            if layer in self.sums:
                packed[i] = self.sums[layer].to(dev)
        packed[-1, 0] = self.count
        all_reduce_sum_(packed, group)
        self.sums = {layer: packed[i] for i, layer in enumerate(self.layers)}
        self.count = int(round(float(packed[-1, 0])))
        if self.method.needs_covariance:
            for layer in self.layers:
                m = self.moments.get(layer)
                if m is None:  # this process had no prompts
                    m = self.moments[layer] = Moments(self.dim, device=dev, row_limit="auto")
                m.all_reduce(group)

    def vectors(self) -> torch.Tensor:
        """The direction of every layer [len(layers), d] (float32, CPU)."""
        if self.count == 0:
            raise ValueError("no prompts were processed")
        rows = []
        for layer in self.layers:
            mean = self.sums[layer] / self.count
            rows.append(self.method.finalize(mean, self.moments.get(layer)).float().cpu())
        return torch.stack(rows)


@dataclass
class DirectionPlan:
    """A checked extraction: the two sides, the layers and the models' shapes."""

    locked: Side
    unlocked: Side
    layers: list[int]
    info: ModelInfo
    unlocked_info: ModelInfo | None


def plan_direction(
    model: nn.Module,
    tokenizer: Any,
    prompts_locked: Sequence[str],
    prompts_unlocked: Sequence[str] | None,
    *,
    unlocked_model: nn.Module | None,
    unlocked_tokenizer: Any,
    method: str,
    layers: Sequence[int] | None,
    layer_path: str | None,
    unlocked_layer_path: str | None,
) -> DirectionPlan:
    """Check the arguments of :func:`extract_direction` before any forward pass."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {tuple(METHODS)}, got {method!r}")
    locked = check_prompts("prompts_locked", prompts_locked)
    if prompts_unlocked is None:
        if unlocked_model is None:
            raise ValueError(
                "give prompts_unlocked (prompt contrast) or unlocked_model (model contrast)"
            )
        unlocked = locked
    else:
        unlocked = check_prompts("prompts_unlocked", prompts_unlocked)
    if len(unlocked) != len(locked):
        raise ValueError(
            f"prompts_locked and prompts_unlocked must pair up: got {len(locked)} and "
            f"{len(unlocked)} prompts"
        )
    other = model if unlocked_model is None else unlocked_model
    other_tok = unlocked_tokenizer if unlocked_tokenizer is not None else tokenizer
    other_path = unlocked_layer_path if unlocked_model is not None else layer_path
    info = ModelInfo.of(model, layer_path)
    other_info = ModelInfo.of(other, other_path)
    if (other_info.hidden_size, other_info.num_layers) != (info.hidden_size, info.num_layers):
        raise ValueError(
            "the locked and unlocked models must have the same shape: hidden size "
            f"{info.hidden_size} vs {other_info.hidden_size}, layers {info.num_layers} vs "
            f"{other_info.num_layers}"
        )
    sel = resolve_layer_indices(len(decoder_layers(model, layer_path)), layers)
    need = METHODS[method].min_prompts
    if len(locked) < need:
        raise ValueError(f"method={method!r} needs at least {need} prompts, got {len(locked)}")
    return DirectionPlan(
        locked=Side(model, tokenizer, locked, sel, layer_path),
        unlocked=Side(other, other_tok, unlocked, sel, other_path),
        layers=sel,
        info=info,
        unlocked_info=None if unlocked_model is None else other_info,
    )


def extract_direction(
    model: nn.Module,
    tokenizer: Any,
    prompts_locked: Sequence[str],
    prompts_unlocked: Sequence[str] | None = None,
    *,
    unlocked_model: nn.Module | None = None,
    unlocked_tokenizer: Any = None,
    method: str = "mean",
    layers: Sequence[int] | None = None,
    layer_path: str | None = None,
    unlocked_layer_path: str | None = None,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    max_length: int | None = None,
    progress: bool = True,
    distributed: bool = False,
    group: ProcessGroup | None = None,
) -> Direction:
    """Mean (or PCA) difference of last-prompt-token activations, per decoder layer.

    Prompt contrast: ``prompts_locked[i]`` and ``prompts_unlocked[i]`` are the locked and
    unlocked forms of item i, both run through ``model``. Model contrast: pass
    ``unlocked_model`` (and ``unlocked_tokenizer`` if it differs); ``prompts_unlocked``
    defaults to ``prompts_locked``. ``layers`` selects decoder layers (default: all);
    ``layer_path`` names the decoder block list when it is not found automatically.
    With ``distributed=True`` each process reads a shard of the prompts and the sums are
    all-reduced over ``group``.
    """
    plan = plan_direction(
        model,
        tokenizer,
        prompts_locked,
        prompts_unlocked,
        unlocked_model=unlocked_model,
        unlocked_tokenizer=unlocked_tokenizer,
        method=method,
        layers=layers,
        layer_path=layer_path,
        unlocked_layer_path=unlocked_layer_path,
    )
    acc = DirectionAccumulator(plan.layers, plan.info.hidden_size, method)
    with lockstep(
        [plan.locked, plan.unlocked],
        desc="direction",
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        max_length=max_length,
        progress=progress,
        distributed=distributed,
        group=group,
    ) as batches:
        for lo, hi in batches:
            acc.update(lo.rows, hi.rows)
    if distributed:
        acc.all_reduce(group, torch.device(device) if device is not None else None)
    return finish_direction(plan, acc)


def finish_direction(plan: DirectionPlan, acc: DirectionAccumulator) -> Direction:
    """The Direction artifact of a finished accumulation."""
    return Direction(
        vectors=acc.vectors(),
        layers=plan.layers,
        method=acc.method.name,
        num_prompts=acc.count,
        model=plan.info,
        unlocked_model=plan.unlocked_info,
    )
