"""Typed, checked reads of an artifact's metadata and tensors.

Every artifact kind reads its ``unlock.json`` entries through :class:`Meta` and its
tensors through :func:`check_tensors`, so a malformed file is refused with one ValueError
that names the file, the entry (or tensor) and what was expected, never a KeyError or a
silent ``int()`` of something else.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from typing import TypeGuard

import torch

__all__ = [
    "FLOAT_DTYPES",
    "FULL_DTYPES",
    "Meta",
    "TensorSpec",
    "check_finite",
    "check_layers",
    "check_layer_map",
    "check_tensors",
]

# float32/float64: what the artifacts hold (the alignment and statistics compute in them).
FULL_DTYPES: frozenset[torch.dtype] = frozenset({torch.float32, torch.float64})
# Every floating dtype: vectors may be stored in half precision and are read as float32.
FLOAT_DTYPES: frozenset[torch.dtype] = FULL_DTYPES | {torch.float16, torch.bfloat16}

_MISSING = object()


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


class Meta:
    """Typed access to one JSON object of an artifact's metadata.

    ``source`` names the file in every error; ``prefix`` is the path of a nested entry
    (``model.hidden_size``).
    """

    def __init__(self, doc: Mapping[str, object], source: str, prefix: str = "") -> None:
        self.doc = doc
        self.source = source
        self.prefix = prefix

    def error(self, message: str) -> ValueError:
        return ValueError(f"{self.source}: {message}")

    def _name(self, key: str) -> str:
        return f"{self.prefix}{key}"

    def _bad(self, key: str, expected: str, got: object) -> ValueError:
        return self.error(f"entry {self._name(key)!r} must be {expected}, got {_show(got)}")

    def __contains__(self, key: str) -> bool:
        return key in self.doc

    def raw(self, key: str, default: object = _MISSING) -> object:
        """The entry ``key`` as it is; ValueError when it is missing and has no default."""
        if key in self.doc:
            return self.doc[key]
        if default is _MISSING:
            raise self.error(f"entry {self._name(key)!r} is missing")
        return default

    def string(
        self, key: str, *, choices: Collection[str] | None = None, empty: bool = False
    ) -> str:
        """A string (non-empty unless ``empty``), one of ``choices`` when given."""
        v = self.raw(key)
        if not isinstance(v, str) or (not v and not empty):
            raise self._bad(key, "a string" if empty else "a non-empty string", v)
        if choices is not None and v not in choices:
            raise self._bad(key, f"one of {sorted(choices)}", v)
        return v

    def integer(
        self, key: str, *, lo: int | None = None, hi: int | None = None, default: object = _MISSING
    ) -> int:
        """An int (not a bool) in [lo, hi]."""
        v = self.raw(key, default)
        if not _is_int(v):
            raise self._bad(key, "an integer", v)
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            if lo == hi:
                raise self._bad(key, f"{lo}", v)
            span = f">= {lo}" if hi is None else f"in [{lo if lo is not None else ''}, {hi}]"
            raise self._bad(key, f"an integer {span}", v)
        return v

    def number(self, key: str, *, lo: float | None = None, default: object = _MISSING) -> float:
        """A finite int or float (not a bool), at least ``lo``."""
        v = self.raw(key, default)
        if not (_is_int(v) or isinstance(v, float)):
            raise self._bad(key, "a number", v)
        x = float(v)
        if not math.isfinite(x) or (lo is not None and x < lo):
            raise self._bad(key, "a finite number" + (f" >= {lo:g}" if lo is not None else ""), v)
        return x

    def flag(self, key: str, *, default: object = _MISSING) -> bool:
        v = self.raw(key, default)
        if not isinstance(v, bool):
            raise self._bad(key, "true or false", v)
        return v

    def int_list(self, key: str) -> list[int]:
        v = self.raw(key)
        out = [i for i in v if _is_int(i)] if isinstance(v, list) else []
        if not isinstance(v, list) or len(out) != len(v):
            raise self._bad(key, "a list of integers", v)
        return out

    def pairs(self, key: str) -> list[tuple[int, int]]:
        """A list of [int, int] pairs (a layer map)."""
        v = self.raw(key)
        out: list[tuple[int, int]] = []
        for p in v if isinstance(v, list) else [None]:
            if not (isinstance(p, list) and len(p) == 2 and _is_int(p[0]) and _is_int(p[1])):
                raise self._bad(key, "a list of [source, target] integer pairs", v)
            out.append((p[0], p[1]))
        return out

    def layers(self, key: str, num_layers: int) -> list[int]:
        """Distinct decoder layer indices in [0, num_layers)."""
        out = self.int_list(key)
        try:
            check_layers(out, num_layers)
        except ValueError as e:
            raise self.error(f"entry {self._name(key)!r}: {e}") from None
        return out

    def layer_map(self, key: str, source_layers: int, target_layers: int) -> list[tuple[int, int]]:
        """(source, target) layer pairs in range, no target layer twice."""
        out = self.pairs(key)
        try:
            check_layer_map(out, source_layers, target_layers)
        except ValueError as e:
            raise self.error(f"entry {self._name(key)!r}: {e}") from None
        return out

    def section(self, key: str) -> Meta:
        """The nested object ``key`` as a Meta of its own."""
        v = self.raw(key)
        if not isinstance(v, dict):
            raise self._bad(key, "an object", v)
        return Meta(v, self.source, f"{self._name(key)}.")

    def optional_section(self, key: str) -> Meta | None:
        """Like :meth:`section`, but a missing entry or null is None."""
        if self.raw(key, None) is None:
            return None
        return self.section(key)

    def sections(self, key: str) -> list[Meta]:
        """A list of objects, each as a Meta."""
        v = self.raw(key)
        if not isinstance(v, list) or not all(isinstance(d, dict) for d in v):
            raise self._bad(key, "a list of objects", v)
        return [Meta(d, self.source, f"{self._name(key)}[{i}].") for i, d in enumerate(v)]

    def mapping(self, key: str) -> dict[str, object]:
        """A free-form object (missing or null: empty)."""
        v = self.raw(key, None)
        if v is None:
            return {}
        if not isinstance(v, dict):
            raise self._bad(key, "an object", v)
        return dict(v)

    def keys(self) -> Iterator[str]:
        return iter(self.doc)


@dataclass(frozen=True)
class TensorSpec:
    """What one stored tensor must be: its shape and the dtypes it may have."""

    shape: tuple[int, ...]
    dtypes: frozenset[torch.dtype] = FULL_DTYPES


def check_finite(name: str, t: torch.Tensor, where: str = "") -> None:
    """ValueError unless every value of ``t`` is finite (no NaN, no Inf)."""
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        lead = f"{where}: " if where else ""
        raise ValueError(f"{lead}{name} holds {bad} NaN or Inf values; only finite ones are valid")


def check_tensors(
    source: str,
    tensors: Mapping[str, torch.Tensor],
    spec: Mapping[str, TensorSpec],
) -> None:
    """Refuse unless ``tensors`` are exactly those of ``spec``, of its shapes and dtypes,
    and finite. ``source`` names the file in every error."""
    missing = sorted(set(spec) - set(tensors))
    if missing:
        raise ValueError(f"{source}: tensors {missing} are missing")
    extra = sorted(set(tensors) - set(spec))
    if extra:
        names = sorted(spec)
        shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
        raise ValueError(f"{source}: unexpected tensors {extra} (expected {shown})")
    for name in sorted(spec):
        t, want = tensors[name], spec[name]
        if t.dtype not in want.dtypes:
            names = sorted(str(d).removeprefix("torch.") for d in want.dtypes)
            raise ValueError(
                f"{source}: tensor {name!r} has dtype {str(t.dtype).removeprefix('torch.')}, "
                f"expected one of {names}"
            )
        if tuple(t.shape) != want.shape:
            raise ValueError(
                f"{source}: tensor {name!r} has shape {tuple(t.shape)}, its metadata says "
                f"{want.shape}"
            )
        check_finite(f"tensor {name!r}", t, source)


def check_layers(
    layers: list[int], num_layers: int, what: str = "layers", *, unique: bool = True
) -> None:
    """ValueError unless ``layers`` are decoder layer indices in [0, num_layers), each at
    most once when ``unique`` (steering a layer listed twice would steer it twice)."""
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"{what} {bad} are out of range for {num_layers} layers")
    repeated = sorted(i for i, n in Counter(layers).items() if n > 1)
    if unique and repeated:
        raise ValueError(f"{what} {repeated} appear more than once; each may appear once")


def check_layer_map(
    layer_map: list[tuple[int, int]], source_layers: int, target_layers: int
) -> None:
    """ValueError unless every (s, t) pair is in range and no target layer repeats (a
    source layer may feed several target layers)."""
    check_layers([s for s, _ in layer_map], source_layers, "source layers", unique=False)
    check_layers([t for _, t in layer_map], target_layers, "target layers")
