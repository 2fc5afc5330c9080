"""How the alignment statistics store their :class:`~unlock_fast.stats.Moments`: tensors
``pair{i}.{name}`` in the safetensors file and the scalars in ``unlock.json``, and reading
them back, checked against the tensors a state of that form holds
(:mod:`unlock_fast.stats.state`): sums and Grams, or the kept rows (any float dtype)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..stats import Moments
from ..stats.state import state_shapes
from .schema import FLOAT_DTYPES, FULL_DTYPES, Meta, TensorSpec
from .store import StoredArtifact

__all__ = ["read_moments", "store_moments"]


def store_moments(
    moments: Sequence[Moments],
) -> tuple[dict[str, torch.Tensor], list[dict[str, object]]]:
    """The tensors (``pair{i}.{name}``) and the per-pair scalar entries of ``moments``."""
    tensors: dict[str, torch.Tensor] = {}
    states: list[dict[str, object]] = []
    for i, m in enumerate(moments):
        small: dict[str, object] = {}
        for key, val in m.state_dict().items():
            if isinstance(val, torch.Tensor):
                tensors[f"pair{i}.{key}"] = val
            else:
                small[key] = val
        states.append(small)
    return tensors, states


def read_moments(art: StoredArtifact, pairs: int, dim_x: int, dim_y: int) -> list[Moments]:
    """The ``pairs`` accumulators of Source rows [*, dim_x] and Target rows [*, dim_y] in
    ``art``, each in the form it was saved in (sums and Grams, or kept rows); ValueError
    naming the file and the entry when anything is off."""
    states = art.meta.sections("moments")
    if len(states) != pairs:
        raise art.meta.error(f"entry 'moments' has {len(states)} entries for {pairs} layer pairs")
    shapes = [state_shapes(dim_x, dim_y, *_form(small)) for small in states]
    spec = {
        f"pair{i}.{k}": TensorSpec(shape, FLOAT_DTYPES if k.startswith("rows_") else FULL_DTYPES)
        for i, names in enumerate(shapes)
        for k, shape in names.items()
    }
    tensors = art.check_tensors(spec)
    moments = []
    for i, small in enumerate(states):
        state = _scalars(small, dim_x, dim_y)
        state.update({k: tensors[f"pair{i}.{k}"] for k in shapes[i]})
        try:
            moments.append(Moments.from_state_dict(state))
        except (TypeError, ValueError) as e:
            raise small.error(f"entry 'moments[{i}]': {e}") from None
    if len({m.rows for m in moments}) > 1:
        raise art.meta.error("the layer pairs hold different numbers of rows")
    return moments


def _form(small: Meta) -> tuple[str, int]:
    """The form of one state and the rows it keeps (0 for the Gram form)."""
    if "form" not in small:
        return "gram", 0
    form = small.string("form", choices=("gram", "rows"))
    return form, small.integer("held", lo=0) if form == "rows" else 0


def _scalars(small: Meta, dim_x: int, dim_y: int) -> dict[str, object]:
    """The non-tensor entries of one Moments state (a state without ``form`` is the Gram
    form, as every file written before the row form)."""
    form = small.string("form", choices=("gram", "rows")) if "form" in small else "gram"
    allowed = {"dim_x", "dim_y", "count", "rows"}
    if "form" in small:
        allowed |= {"form", "held", "row_limit"}
    extra = sorted(set(small.keys()) - allowed)
    if extra:
        raise small.error(f"unexpected entries {[small.prefix + k for k in extra]}")
    out: dict[str, object] = {
        "dim_x": small.integer("dim_x", lo=dim_x, hi=dim_x),
        "dim_y": small.integer("dim_y", lo=dim_y, hi=dim_y),
        "count": small.number("count", lo=0.0),
        "rows": small.integer("rows", lo=0),
    }
    if form == "rows":
        limit = small.integer("row_limit", lo=1)
        out.update(form=form, row_limit=limit, held=small.integer("held", lo=0, hi=limit))
    return out
