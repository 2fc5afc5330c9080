"""Export a steering key to a llama.cpp control vector (GGUF).

llama.cpp reads a GGUF file with ``general.architecture = "controlvector"``,
``controlvector.model_hint``, ``controlvector.layer_count`` and one F32 tensor
``direction.N`` of length n_embd per layer N ≥ 1, and adds tensor N to the output of decoder
block N at every token (``--control-vector`` / ``--control-vector-scaled FILE:SCALE``). It has
no rule that rotates the hidden state, no notion of "the last prompt token", and never steers
block 0. So the export writes the closest thing it can run: ``alpha * r_N``, which is exactly
unlock-fast's ``steer(key, alpha, mode="add", positions="all")`` on the layers N ≥ 1.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._optional import require
from .artifacts import KeyLike

__all__ = ["ControlVectorExport", "read_control_vector", "to_llamacpp"]

ARCHITECTURE = "controlvector"


@dataclass(frozen=True)
class ControlVectorExport:
    """What :func:`to_llamacpp` wrote: the file, the layers in it, and what it could not say."""

    path: Path
    layers: list[int]
    dropped_layers: list[int]
    alpha: float
    note: str


def to_llamacpp(
    key: KeyLike, path: str | os.PathLike[str], *, alpha: float, model_hint: str | None = None
) -> ControlVectorExport:
    """Write ``alpha * r`` of every key layer N ≥ 1 as ``direction.N`` into ``path``.

    ``model_hint`` (default: the key's model name) is informational for llama.cpp. The file is
    written beside ``path`` and renamed into place, so a failure leaves no partial file.
    """
    if not isinstance(key, KeyLike):
        raise TypeError(
            f"key must be a SteeringKey (anything with as_key()), got {type(key).__name__}"
        )
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite float, got {alpha!r}")
    k = key.as_key()
    vectors = k.vectors.detach().double().cpu().numpy() * float(alpha)
    if not np.isfinite(vectors).all():
        raise ValueError("the key holds non-finite values; it cannot be exported")
    hint = k.model.name if model_hint is None else model_hint
    if not isinstance(hint, str) or not hint:
        raise ValueError(f"model_hint must be a non-empty str, got {hint!r}")
    kept = [(layer, row) for layer, row in zip(k.layers, vectors, strict=True) if layer >= 1]
    dropped = [layer for layer in k.layers if layer < 1]
    if not kept:
        raise ValueError(f"the key steers only layer 0, which llama.cpp cannot steer: {k.layers}")
    gguf = require("gguf", "gguf", "Writing llama.cpp control vectors")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, ARCHITECTURE)
        writer.add_string(f"{ARCHITECTURE}.model_hint", hint)
        writer.add_uint32(f"{ARCHITECTURE}.layer_count", len(kept))
        for layer, row in sorted(kept, key=lambda p: p[0]):
            writer.add_tensor(f"direction.{layer}", row.astype(np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    note = (
        "llama.cpp adds a control vector at every token and has no rotate rule, no "
        "last-prompt-token position and no layer 0: wrote alpha*r at "
        f"{len(kept)} layers (= steer(mode='add', positions='all'))"
        + (f"; dropped layer {dropped[0]}" if dropped else "")
    )
    return ControlVectorExport(out, [layer for layer, _ in kept], dropped, float(alpha), note)


def read_control_vector(path: str | os.PathLike[str]) -> tuple[str, dict[int, np.ndarray]]:
    """(model hint, {layer N: vector}) of a llama.cpp control vector file."""
    gguf = require("gguf", "gguf", "Reading llama.cpp control vectors")
    try:
        reader = gguf.GGUFReader(str(path))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable GGUF file: {e}") from e
    arch = _string_field(reader, "general.architecture")
    if arch != ARCHITECTURE:
        raise ValueError(f"{path} is a {arch!r} GGUF file, not a llama.cpp control vector")
    hint = _string_field(reader, f"{ARCHITECTURE}.model_hint") or ""
    out: dict[int, np.ndarray] = {}
    for t in reader.tensors:
        prefix, _, index = t.name.partition(".")
        if prefix != "direction" or not index.isdigit():
            raise ValueError(f"{path} holds an unexpected tensor {t.name!r}")
        out[int(index)] = np.asarray(t.data, dtype=np.float32).reshape(-1).copy()
    return hint, out


def _string_field(reader: object, name: str) -> str | None:
    field = reader.fields.get(name)  # type: ignore[attr-defined]
    if field is None:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8")
