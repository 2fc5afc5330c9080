"""The capability direction ("master key") of a Source model, per decoder layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .key import SteeringKey, check_vectors, read_vectors
from .model_info import ModelInfo
from .store import PathLike, open_artifact, register_kind, save_artifact

__all__ = ["Direction"]


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
        self.layers = check_vectors(self.vectors, self.layers, self.model)
        if isinstance(self.num_prompts, bool) or not isinstance(self.num_prompts, int):
            raise TypeError(f"num_prompts must be an int, got {self.num_prompts!r}")
        if self.num_prompts < 0:
            raise ValueError(f"num_prompts must be >= 0, got {self.num_prompts}")

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

    def as_key(self) -> SteeringKey:
        """This direction as a SteeringKey for its own model (no transfer)."""
        return SteeringKey(
            vectors=self.vectors.clone(),
            layers=list(self.layers),
            model=self.model,
            origin={"kind": "direction", "method": self.method, "num_prompts": self.num_prompts},
        )

    def save_pretrained(self, path: PathLike) -> None:
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
        path: PathLike,
        model: nn.Module | None = None,
        *,
        layer_path: str | None = None,
        check_fingerprint: bool = True,
    ) -> Direction:
        """Load a direction; with ``model``, refuse it unless it was made for that model."""
        art = open_artifact(path, "direction")
        vectors, layers, info = read_vectors(art)
        unlocked = art.meta.optional_section("unlocked_model")
        out = cls(
            vectors=vectors,
            layers=layers,
            method=art.meta.string("method"),
            num_prompts=art.meta.integer("num_prompts", lo=0),
            model=info,
            unlocked_model=None if unlocked is None else ModelInfo.from_meta(unlocked),
        )
        if model is not None:
            info.check(
                model,
                what="this direction",
                layer_path=layer_path,
                check_fingerprint=check_fingerprint,
            )
        return out


register_kind("direction", Direction.from_pretrained)
