"""What an artifact records about a model: its name, config fingerprint and shapes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

from torch import nn

from ..layers import decoder_layers, hidden_size, model_fingerprint, model_name

__all__ = ["ModelInfo"]


@dataclass(frozen=True)
class ModelInfo:
    """What an artifact records about a model: name, config fingerprint and shapes."""

    name: str
    fingerprint: str
    hidden_size: int
    num_layers: int

    @classmethod
    def of(cls, model: nn.Module, layer_path: str | None = None) -> ModelInfo:
        return cls(
            name=model_name(model),
            fingerprint=model_fingerprint(model),
            hidden_size=hidden_size(model),
            num_layers=len(decoder_layers(model, layer_path)),
        )

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> ModelInfo:
        """Read the entry :meth:`to_dict` wrote; ValueError when it is malformed."""
        bad = ValueError(f"artifact metadata has a malformed model entry: {d!r}")
        try:
            name, fingerprint = d["name"], d["fingerprint"]
            width, depth = d["hidden_size"], d["num_layers"]
        except (KeyError, TypeError) as e:
            raise bad from e
        if not (isinstance(name, str) and isinstance(fingerprint, str)):
            raise bad
        if type(width) is not int or type(depth) is not int:  # bool is no size
            raise bad
        return cls(name, fingerprint, width, depth)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def check(
        self,
        model: nn.Module | ModelInfo,
        *,
        what: str,
        layer_path: str | None = None,
        check_fingerprint: bool = True,
    ) -> None:
        """Raise ValueError unless ``model`` (or its ModelInfo) has these shapes (and this
        fingerprint)."""
        got = model if isinstance(model, ModelInfo) else ModelInfo.of(model, layer_path)
        if got.hidden_size != self.hidden_size or got.num_layers != self.num_layers:
            raise ValueError(
                f"{what} was made for {self.name} (hidden size {self.hidden_size}, "
                f"{self.num_layers} layers) but the model given is {got.name} (hidden size "
                f"{got.hidden_size}, {got.num_layers} layers)"
            )
        if check_fingerprint and got.fingerprint != self.fingerprint:
            raise ValueError(
                f"{what} was made for {self.name} (config fingerprint {self.fingerprint}) but "
                f"the model given is {got.name} (config fingerprint {got.fingerprint}); pass "
                "check_fingerprint=False if the configs differ only in ways that do not matter"
            )
