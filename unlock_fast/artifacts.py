"""Save and load directions, alignments and steering keys: safetensors plus JSON metadata.

An artifact is a folder with ``tensors.safetensors`` (the arrays) and ``unlock.json`` (what
they are: kind, library version, model names, config fingerprints, hidden sizes, layers,
rank, N, centring). Nothing is pickled. :func:`load_artifact` returns the right class.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .layers import decoder_layers, hidden_size, model_fingerprint, model_name

__all__ = ["ModelInfo", "save_artifact", "read_artifact", "load_artifact"]

TENSORS_FILE = "tensors.safetensors"
META_FILE = "unlock.json"
FORMAT_VERSION = 1


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
    def from_dict(cls, d: dict[str, Any]) -> ModelInfo:
        try:
            return cls(
                name=str(d["name"]),
                fingerprint=str(d["fingerprint"]),
                hidden_size=int(d["hidden_size"]),
                num_layers=int(d["num_layers"]),
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"artifact metadata has a malformed model entry: {d!r}") from e

    def to_dict(self) -> dict[str, Any]:
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


def _version() -> str:
    from . import __version__

    return __version__


def save_artifact(
    path: str | os.PathLike[str],
    kind: str,
    tensors: dict[str, torch.Tensor],
    meta: dict[str, Any],
) -> Path:
    """Write ``tensors`` and ``meta`` into the folder ``path`` (created if missing)."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    save_file(flat, str(out / TENSORS_FILE), metadata={"kind": kind, "format": "unlock-fast"})
    doc = {"kind": kind, "format_version": FORMAT_VERSION, "library_version": _version(), **meta}
    (out / META_FILE).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return out


def read_artifact(
    path: str | os.PathLike[str], kind: str | None = None
) -> tuple[str, dict[str, torch.Tensor], dict[str, Any]]:
    """Read an artifact folder; with ``kind``, refuse any other kind."""
    src = Path(path)
    meta_file, tensor_file = src / META_FILE, src / TENSORS_FILE
    if not meta_file.is_file() or not tensor_file.is_file():
        raise FileNotFoundError(
            f"{src} is not an unlock-fast artifact: expected {META_FILE} and {TENSORS_FILE}"
        )
    meta = json.loads(meta_file.read_text())
    if not isinstance(meta, dict) or "kind" not in meta:
        raise ValueError(f"{meta_file} has no 'kind' entry")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(
            f"{src} has format version {meta['format_version']}; this library reads up to "
            f"{FORMAT_VERSION}. Upgrade unlock-fast."
        )
    if kind is not None and meta["kind"] != kind:
        raise ValueError(f"{src} holds a {meta['kind']!r} artifact, expected {kind!r}")
    tensors = load_file(str(tensor_file))
    return str(meta["kind"]), tensors, meta


def load_artifact(path: str | os.PathLike[str]) -> Any:
    """Load a Direction, Alignment, AlignmentStats or SteeringKey, whichever ``path`` holds."""
    from .alignment import Alignment, AlignmentStats
    from .direction import Direction
    from .steering import SteeringKey

    kind, _, _ = read_artifact(path)
    classes: dict[str, Any] = {
        "direction": Direction,
        "alignment": Alignment,
        "alignment_stats": AlignmentStats,
        "steering_key": SteeringKey,
    }
    if kind not in classes:
        raise ValueError(f"unknown artifact kind {kind!r} in {path}")
    return classes[kind].from_pretrained(path)


def expect_shape(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    """Refuse an artifact whose tensor ``name`` does not have ``shape``."""
    if tuple(t.shape) != shape:
        raise ValueError(
            f"artifact tensor {name!r} has shape {tuple(t.shape)}, its metadata says {shape}"
        )
