"""The capability direction ("master key") of a Source model, per decoder layer.

Two contrasts, as in the paper:

- prompt contrast: one model, a locked and an unlocked template of the same items
  (e.g. direct vs chain-of-thought prompts);
- model contrast: a locked and an unlocked model (e.g. base vs post-trained), usually the
  same prompts.

``mean``: v_l = mean_i [h_l(unlocked, i) - h_l(locked, i)] (not normalised).
``pca``: the top principal axis of the centred differences, signed so that v . mean > 0,
unit norm.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import ops
from .artifacts import ModelInfo, expect_shape, read_artifact, save_artifact
from .capture import paired_activations, plan_batches, progress_bar
from .distributed import all_reduce_sum_, rank_and_world, require_distributed, shard
from .layers import decoder_layers, resolve_layer_indices
from .stats import Moments

__all__ = ["Direction", "extract_direction"]

METHODS = ("mean", "pca")


@dataclass(repr=False)
class Direction:
    """Per-layer capability direction of one model.

    vectors: [len(layers), hidden_size] float32, row i belongs to decoder layer layers[i].
    model: the locked model (whose activations the vectors live in).
    unlocked_model: the unlocked model for a model contrast, None for a prompt contrast.
    """

    vectors: torch.Tensor
    layers: list[int]
    method: str
    num_prompts: int
    model: ModelInfo
    unlocked_model: ModelInfo | None = None

    def __post_init__(self) -> None:
        want = (len(self.layers), self.model.hidden_size)
        if self.vectors.dim() != 2 or tuple(self.vectors.shape) != want:
            raise ValueError(f"vectors must be {list(want)}, got {list(self.vectors.shape)}")

    def __repr__(self) -> str:
        return (
            f"Direction(model={self.model.name!r}, method={self.method!r}, "
            f"contrast={self.contrast!r}, layers={len(self.layers)}, "
            f"hidden_size={self.model.hidden_size}, num_prompts={self.num_prompts})"
        )

    @property
    def contrast(self) -> str:
        """'prompt' (one model, two templates) or 'model' (two models)."""
        return "prompt" if self.unlocked_model is None else "model"

    def vector(self, layer: int) -> torch.Tensor:
        """The direction at decoder layer ``layer`` [hidden_size]."""
        if layer not in self.layers:
            raise KeyError(f"layer {layer} is not in this direction (layers {self.layers})")
        return self.vectors[self.layers.index(layer)]

    def as_key(self) -> Any:
        """This direction as a SteeringKey for its own model (no transfer)."""
        from .steering import SteeringKey

        return SteeringKey(
            vectors=self.vectors.clone(),
            layers=list(self.layers),
            model=self.model,
            origin={"kind": "direction", "method": self.method, "num_prompts": self.num_prompts},
        )

    def save_pretrained(self, path: str | os.PathLike[str]) -> None:
        meta = {
            "layers": self.layers,
            "method": self.method,
            "num_prompts": self.num_prompts,
            "model": self.model.to_dict(),
            "unlocked_model": None
            if self.unlocked_model is None
            else self.unlocked_model.to_dict(),
        }
        save_artifact(path, "direction", {"vectors": self.vectors}, meta)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        model: nn.Module | None = None,
        *,
        layer_path: str | None = None,
        check_fingerprint: bool = True,
    ) -> Direction:
        """Load a direction; with ``model``, refuse it unless it was made for that model."""
        _, tensors, meta = read_artifact(path, "direction")
        info = ModelInfo.from_dict(meta["model"])
        layers = [int(i) for i in meta["layers"]]
        expect_shape("vectors", tensors["vectors"], (len(layers), info.hidden_size))
        unl = meta.get("unlocked_model")
        out = cls(
            vectors=tensors["vectors"].float(),
            layers=layers,
            method=str(meta["method"]),
            num_prompts=int(meta["num_prompts"]),
            model=info,
            unlocked_model=None if unl is None else ModelInfo.from_dict(unl),
        )
        if model is not None:
            info.check(
                model,
                what="this direction",
                layer_path=layer_path,
                check_fingerprint=check_fingerprint,
            )
        return out


def _check_prompts(name: str, prompts: Any) -> list[str]:
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise TypeError(f"{name} must be a list of str, got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise ValueError(f"{name} must not be empty")
    return list(prompts)


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
    group: Any = None,
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
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    locked = _check_prompts("prompts_locked", prompts_locked)
    if prompts_unlocked is None:
        if unlocked_model is None:
            raise ValueError(
                "give prompts_unlocked (prompt contrast) or unlocked_model (model contrast)"
            )
        unlocked = locked
    else:
        unlocked = _check_prompts("prompts_unlocked", prompts_unlocked)
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
    if method == "pca" and len(locked) < 2:
        raise ValueError(f"method='pca' needs at least 2 prompts, got {len(locked)}")
    if distributed:
        require_distributed(group)
    idx = shard(list(range(len(locked))), group) if distributed else list(range(len(locked)))
    rank, _ = rank_and_world(group if distributed else None)

    local_locked = [locked[i] for i in idx]
    local_unlocked = [unlocked[i] for i in idx]
    d = info.hidden_size
    acc_dev = torch.device(device) if device is not None else None
    sums: dict[int, torch.Tensor] = {}
    moments: dict[int, Moments] = {}
    count = 0
    batches = plan_batches(tokenizer, local_locked, batch_size, max_length) if idx else []
    first = dict(
        model=model, tokenizer=tokenizer, prompts=local_locked, layers=sel, layer_path=layer_path
    )
    second = dict(
        model=other, tokenizer=other_tok, prompts=local_unlocked, layers=sel, layer_path=other_path
    )
    bar = progress_bar(len(idx), "direction", progress and rank == 0)
    try:
        with paired_activations(
            first, second, batches, device=device, dtype=dtype, max_length=max_length
        ) as pairs:
            for lo, hi in pairs:
                for layer in sel:
                    diff = hi.rows[layer].float() - lo.rows[layer].float()
                    if layer not in sums:
                        sums[layer] = torch.zeros(d, dtype=torch.float64, device=diff.device)
                    sums[layer] += diff.sum(0, dtype=torch.float64)
                    if method == "pca":
                        if layer not in moments:
                            moments[layer] = Moments(d, device=diff.device)
                        moments[layer].update(diff)
                count += len(lo.indices)
                bar.update(len(lo.indices))
    finally:
        bar.close()

    if distributed:
        dev = acc_dev or next(iter(sums.values()), torch.zeros(0)).device
        packed = torch.zeros(len(sel) + 1, d, dtype=torch.float64, device=dev)
        for i, layer in enumerate(sel):
            if layer in sums:
                packed[i] = sums[layer].to(dev)
        packed[-1, 0] = count
        all_reduce_sum_(packed, group)
        sums = {layer: packed[i] for i, layer in enumerate(sel)}
        count = int(round(float(packed[-1, 0])))
        if method == "pca":
            moments = _all_reduce_moments(moments, sel, d, dev, group)
    if count == 0:
        raise ValueError("no prompts were processed")

    rows = []
    for layer in sel:
        mean = sums[layer] / count
        if method == "mean":
            rows.append(mean.float().cpu())
            continue
        cov = moments[layer].gram("xx", centered=True)
        _, vec = ops.eigh_topk(cov, 1)
        v = vec[:, 0].to(torch.float64)
        v = v / v.norm().clamp_min(1e-300)
        if float(v @ mean.to(v.device)) < 0:
            v = -v
        rows.append(v.float().cpu())
    return Direction(
        vectors=torch.stack(rows),
        layers=sel,
        method=method,
        num_prompts=count,
        model=info,
        unlocked_model=None if unlocked_model is None else other_info,
    )


def _all_reduce_moments(
    moments: dict[int, Moments], sel: list[int], d: int, dev: torch.device, group: Any
) -> dict[int, Moments]:
    out = {}
    for layer in sel:
        m = moments.get(layer)
        if m is None:  # this process had no prompts
            m = Moments(d, device=dev)
        m.all_reduce(group)
        out[layer] = m
    return out
