"""The steering key: per-layer vectors for one model, and the protocol ``steer()`` accepts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from .model_info import ModelInfo
from .store import PathLike, expect_shape, read_artifact, register_kind, save_artifact

__all__ = ["KeyLike", "SteeringKey"]


@dataclass(repr=False)
class SteeringKey:
    """Per-layer steering vectors for one model.

    vectors: [len(layers), hidden_size] float32; row i is applied after decoder layer
    layers[i]. origin: how the key was made (transfer settings, source model, ...).
    """

    vectors: torch.Tensor
    layers: list[int]
    model: ModelInfo
    origin: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        want = (len(self.layers), self.model.hidden_size)
        if self.vectors.dim() != 2 or tuple(self.vectors.shape) != want:
            raise ValueError(f"vectors must be {list(want)}, got {list(self.vectors.shape)}")
        bad = [i for i in self.layers if not 0 <= i < self.model.num_layers]
        if bad:
            raise ValueError(f"layers {bad} are out of range for {self.model.num_layers} layers")

    def __repr__(self) -> str:
        return (
            f"SteeringKey(model={self.model.name!r}, layers={len(self.layers)}, "
            f"hidden_size={self.model.hidden_size}, origin={self.origin.get('kind')!r})"
        )

    def as_key(self) -> SteeringKey:
        return self

    def vector(self, layer: int) -> torch.Tensor:
        if layer not in self.layers:
            raise KeyError(f"layer {layer} is not in this key (layers {self.layers})")
        return self.vectors[self.layers.index(layer)]

    def save_pretrained(self, path: PathLike) -> None:
        meta = {"layers": self.layers, "model": self.model.to_dict(), "origin": self.origin}
        save_artifact(path, "steering_key", {"vectors": self.vectors}, meta)

    @classmethod
    def from_pretrained(
        cls,
        path: PathLike,
        model: nn.Module | None = None,
        *,
        layer_path: str | None = None,
        check_fingerprint: bool = True,
    ) -> SteeringKey:
        """Load a key; with ``model``, refuse it unless it was made for that model."""
        _, tensors, meta = read_artifact(path, "steering_key")
        info = ModelInfo.from_dict(meta["model"])
        layers = [int(i) for i in meta["layers"]]
        expect_shape("vectors", tensors["vectors"], (len(layers), info.hidden_size))
        key = cls(tensors["vectors"].float(), layers, info, dict(meta.get("origin") or {}))
        if model is not None:
            info.check(
                model,
                what="this steering key",
                layer_path=layer_path,
                check_fingerprint=check_fingerprint,
            )
        return key


@runtime_checkable
class KeyLike(Protocol):
    """Anything that can steer a model: a SteeringKey, or a Direction on its own model."""

    def as_key(self) -> SteeringKey: ...


register_kind("steering_key", SteeringKey.from_pretrained)
