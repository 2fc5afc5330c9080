"""The steering key: per-layer vectors for one model, and the protocol ``steer()`` accepts."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from .data import read_origin
from .model_info import ModelInfo
from .schema import FLOAT_DTYPES, TensorSpec, check_finite, check_layers
from .store import PathLike, StoredArtifact, open_artifact, register_kind, save_artifact

__all__ = ["KeyLike", "SteeringKey", "check_vectors", "read_vectors"]


def check_vectors(vectors: torch.Tensor, layers: Sequence[int], model: ModelInfo) -> list[int]:
    """Check per-layer vectors [len(layers), hidden_size] of ``model``: a finite
    floating-point tensor, the layers distinct and in range. Returns the layers as ints."""
    if not isinstance(vectors, torch.Tensor) or not vectors.is_floating_point():
        got = vectors.dtype if isinstance(vectors, torch.Tensor) else type(vectors).__name__
        raise TypeError(f"vectors must be a floating-point torch.Tensor, got {got}")
    out = []
    for i in layers:
        if isinstance(i, bool):
            raise TypeError(f"layers must be ints, got {i!r}")
        try:
            out.append(operator.index(i))
        except TypeError:
            raise TypeError(f"layers must be ints, got {i!r}") from None
    want = (len(out), model.hidden_size)
    if vectors.dim() != 2 or tuple(vectors.shape) != want:
        raise ValueError(f"vectors must be {list(want)}, got {list(vectors.shape)}")
    check_layers(out, model.num_layers)
    check_finite("vectors", vectors)
    return out


def read_vectors(art: StoredArtifact) -> tuple[torch.Tensor, list[int], ModelInfo]:
    """The vectors [len(layers), hidden_size] float32, layers and model of a stored key
    or direction, checked against each other."""
    info = ModelInfo.from_meta(art.meta.section("model"))
    layers = art.meta.layers("layers", info.num_layers)
    spec = {"vectors": TensorSpec((len(layers), info.hidden_size), FLOAT_DTYPES)}
    return art.check_tensors(spec)["vectors"].float(), layers, info


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
        self.layers = check_vectors(self.vectors, self.layers, self.model)
        if not isinstance(self.origin, dict):
            raise TypeError(f"origin must be a dict, got {type(self.origin).__name__}")

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

    # The algebra of keys: what repeng's ControlVector offers, per layer.

    def _like(self, vectors: torch.Tensor, layers: Sequence[int], **origin: object) -> SteeringKey:
        return SteeringKey(vectors, list(layers), self.model, {**self.origin, **origin})

    def _check_same(self, other: object) -> SteeringKey:
        if not isinstance(other, SteeringKey):
            raise TypeError(f"expected a SteeringKey, got {type(other).__name__}")
        if other.model.hidden_size != self.model.hidden_size or other.layers != self.layers:
            raise ValueError(
                f"the keys differ in model or layers: {self.model.name!r} {self.layers} and "
                f"{other.model.name!r} {other.layers}"
            )
        return other

    def scale(self, factor: float) -> SteeringKey:
        """The key times ``factor`` at every layer."""
        if isinstance(factor, bool) or not isinstance(factor, (int, float)):
            raise TypeError(f"factor must be a float, got {type(factor).__name__}")
        return self._like(self.vectors * float(factor), self.layers)

    def __mul__(self, factor: float) -> SteeringKey:
        return self.scale(factor)

    __rmul__ = __mul__

    def __neg__(self) -> SteeringKey:
        return self.scale(-1.0)

    def __add__(self, other: SteeringKey) -> SteeringKey:
        return self._like(self.vectors + self._check_same(other).vectors, self.layers)

    def __sub__(self, other: SteeringKey) -> SteeringKey:
        return self._like(self.vectors - self._check_same(other).vectors, self.layers)

    def select(self, layers: Sequence[int]) -> SteeringKey:
        """The key at ``layers`` only (steering leaves the other layers alone)."""
        chosen = [int(x) for x in layers]
        if not chosen or any(x not in self.layers for x in chosen):
            raise ValueError(
                f"layers {chosen} must be a non-empty subset of the key's {self.layers}"
            )
        rows = torch.stack([self.vector(x) for x in chosen]).clone()
        return self._like(rows, chosen, layers_subset=chosen)

    def with_norms_of(self, other: SteeringKey) -> SteeringKey:
        """This key's directions with ``other``'s per-layer norms (same model and layers)."""
        norms = self._check_same(other).vectors.double().norm(dim=-1)
        return SteeringKey(_with_norms(self.vectors, norms), self.layers, self.model, self.origin)

    @classmethod
    def random_like(cls, key: SteeringKey, *, seed: int = 0) -> SteeringKey:
        """Gaussian random directions with ``key``'s per-layer norms (a control key)."""
        if not isinstance(key, SteeringKey):
            raise TypeError(f"key must be a SteeringKey, got {type(key).__name__}")
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn(key.vectors.shape, generator=gen, dtype=torch.float64)
        vectors = _with_norms(noise, key.vectors.double().norm(dim=-1))
        origin = {"kind": "random_control", "seed": seed, "like": dict(key.origin)}
        return cls(vectors, list(key.layers), key.model, origin)

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
        art = open_artifact(path, "steering_key")
        vectors, layers, info = read_vectors(art)
        key = cls(vectors, layers, info, read_origin(art.meta))
        if model is not None:
            info.check(
                model,
                what="this steering key",
                layer_path=layer_path,
                check_fingerprint=check_fingerprint,
            )
        return key


def _with_norms(vectors: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """Rows of ``vectors`` [..., L, d] rescaled to ``norms`` [L] (float64 math, float32 out)."""
    v = vectors.double()
    return (v / v.norm(dim=-1, keepdim=True).clamp_min(1e-300) * norms[:, None]).float()


@runtime_checkable
class KeyLike(Protocol):
    """Anything that can steer a model: a SteeringKey, or a Direction on its own model."""

    def as_key(self) -> SteeringKey: ...


register_kind("steering_key", SteeringKey.from_pretrained)
