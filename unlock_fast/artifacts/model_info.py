"""What an artifact records about a model: its name, config fingerprint and shapes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import nn

from ..layers import (
    decoder_layers,
    hidden_size,
    legacy_model_fingerprint,
    model_fingerprint,
    model_name,
)
from .schema import Meta

__all__ = ["ModelInfo"]


@dataclass(frozen=True)
class ModelInfo:
    """What an artifact records about a model: name, config fingerprint and shapes."""

    name: str
    fingerprint: str
    hidden_size: int
    num_layers: int
    # The model's fingerprint in the first format, which keys saved with it carry; known
    # only for a ModelInfo taken from a model, never saved.
    legacy_fingerprint: str | None = field(default=None, compare=False, repr=False)

    @classmethod
    def of(cls, model: nn.Module, layer_path: str | None = None) -> ModelInfo:
        # The blocks first: a model whose blocks can't be found gets the layer_path= hint.
        num_layers = len(decoder_layers(model, layer_path))
        try:
            legacy: str | None = legacy_model_fingerprint(model)
        except ValueError:
            legacy = None
        return cls(
            name=model_name(model),
            fingerprint=model_fingerprint(model, layer_path),
            hidden_size=hidden_size(model, layer_path),
            num_layers=num_layers,
            legacy_fingerprint=legacy,
        )

    @classmethod
    def from_dict(cls, d: Mapping[str, object], source: str = "model entry") -> ModelInfo:
        """Read the entry :meth:`to_dict` wrote; ValueError (naming ``source``) when it is
        malformed."""
        if not isinstance(d, Mapping):
            raise ValueError(f"{source}: expected an object, got {type(d).__name__}")
        return cls.from_meta(Meta(d, source))

    @classmethod
    def from_meta(cls, meta: Meta) -> ModelInfo:
        """Read a model entry of an artifact's metadata; ValueError naming the file and
        the entry when it is malformed."""
        name, fingerprint = meta.string("name", empty=True), meta.string("fingerprint", empty=True)
        return cls(
            name, fingerprint, meta.integer("hidden_size", lo=1), meta.integer("num_layers", lo=1)
        )

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "fingerprint": self.fingerprint,
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
        }

    def check(
        self,
        model: nn.Module | ModelInfo,
        *,
        what: str,
        layer_path: str | None = None,
        check_fingerprint: bool = True,
        override: str = "pass check_fingerprint=False",
    ) -> None:
        """Raise ValueError unless ``model`` (or its ModelInfo) has these shapes (and this
        fingerprint, in either format). ``override`` tells the caller's user how to skip the
        fingerprint check (a CLI names its flag)."""
        got = model if isinstance(model, ModelInfo) else ModelInfo.of(model, layer_path)
        if got.hidden_size != self.hidden_size or got.num_layers != self.num_layers:
            raise ValueError(
                f"{what} was made for {self.name} (hidden size {self.hidden_size}, "
                f"{self.num_layers} layers) but the model given is {got.name} (hidden size "
                f"{got.hidden_size}, {got.num_layers} layers)"
            )
        # An artifact saved with the earlier fingerprint format carries that one.
        if check_fingerprint and self.fingerprint not in (got.fingerprint, got.legacy_fingerprint):
            raise ValueError(
                f"{what} was made for {self.name} (config fingerprint {self.fingerprint}) but "
                f"the model given is {got.name} (config fingerprint {got.fingerprint}); "
                f"{override} if the configs differ only in ways that do not matter"
            )
