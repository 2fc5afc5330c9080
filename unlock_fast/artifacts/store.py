"""The on-disk format of every artifact, and the registry that maps a kind to its class.

An artifact is a folder with ``tensors.safetensors`` (the arrays) and ``unlock.json`` (what
they are: kind, format and library versions, and the kind's own metadata). Nothing is
pickled. Each artifact class registers a loader for its kind, so :func:`load_artifact` needs
to know none of them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from safetensors.torch import load_file, save_file

from .._version import __version__

__all__ = [
    "Artifact",
    "expect_shape",
    "load_artifact",
    "read_artifact",
    "register_kind",
    "registered_kinds",
    "save_artifact",
]

TENSORS_FILE = "tensors.safetensors"
META_FILE = "unlock.json"
FORMAT_VERSION = 1

PathLike = str | os.PathLike[str]


@runtime_checkable
class Artifact(Protocol):
    """Anything that saves itself as an artifact folder."""

    def save_pretrained(self, path: PathLike) -> None: ...


_LOADERS: dict[str, Callable[[PathLike], Artifact]] = {}


def register_kind(kind: str, loader: Callable[[PathLike], Artifact]) -> None:
    """Make :func:`load_artifact` open folders of ``kind`` with ``loader``."""
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"kind must be a non-empty str, got {kind!r}")
    if kind in _LOADERS and _LOADERS[kind] is not loader:
        raise ValueError(f"artifact kind {kind!r} is registered already")
    _LOADERS[kind] = loader


def registered_kinds() -> list[str]:
    """The artifact kinds :func:`load_artifact` can open."""
    return sorted(_LOADERS)


def save_artifact(
    path: PathLike, kind: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> Path:
    """Write ``tensors`` and ``meta`` into the folder ``path`` (created if missing)."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    save_file(flat, str(out / TENSORS_FILE), metadata={"kind": kind, "format": "unlock-fast"})
    doc = {"kind": kind, "format_version": FORMAT_VERSION, "library_version": __version__, **meta}
    (out / META_FILE).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return out


def read_artifact(
    path: PathLike, kind: str | None = None
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


def load_artifact(path: PathLike) -> Artifact:
    """Load whichever artifact ``path`` holds (direction, alignment, statistics or key)."""
    kind, _, _ = read_artifact(path)
    loader = _LOADERS.get(kind)
    if loader is None:
        raise ValueError(
            f"unknown artifact kind {kind!r} in {path}; known kinds: {registered_kinds()}"
        )
    return loader(path)


def expect_shape(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    """Refuse an artifact whose tensor ``name`` does not have ``shape``."""
    if tuple(t.shape) != shape:
        raise ValueError(
            f"artifact tensor {name!r} has shape {tuple(t.shape)}, its metadata says {shape}"
        )
