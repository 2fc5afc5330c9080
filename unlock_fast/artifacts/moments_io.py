"""How the alignment statistics store their :class:`~unlock_fast.stats.Moments`: tensors
``pair{i}.{name}`` in the safetensors file and the scalars in ``unlock.json``, and reading
them back, checked against what an empty accumulator of the same shapes holds."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..stats import Moments
from .schema import Meta, TensorSpec
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
    ``art``; ValueError naming the file and the entry when anything is off."""
    states = art.meta.sections("moments")
    if len(states) != pairs:
        raise art.meta.error(f"entry 'moments' has {len(states)} entries for {pairs} layer pairs")
    # What one pair's state holds, from an empty accumulator of these shapes.
    template = Moments(dim_x, dim_y, device="meta").state_dict()
    names = sorted(k for k, v in template.items() if isinstance(v, torch.Tensor))
    spec = {
        f"pair{i}.{k}": TensorSpec(tuple(template[k].shape)) for i in range(pairs) for k in names
    }
    tensors = art.check_tensors(spec)
    moments = []
    for i, small in enumerate(states):
        state = _scalars(small, template, dim_x, dim_y)
        state.update({k: tensors[f"pair{i}.{k}"] for k in names})
        try:
            moments.append(Moments.from_state_dict(state))
        except (TypeError, ValueError) as e:
            raise small.error(f"entry 'moments[{i}]': {e}") from None
    if len({m.rows for m in moments}) > 1:
        raise art.meta.error("the layer pairs hold different numbers of rows")
    return moments


def _scalars(small: Meta, template: dict[str, object], dim_x: int, dim_y: int) -> dict[str, object]:
    """The non-tensor entries of one Moments state, typed like ``template``'s."""
    scalars = {k: v for k, v in template.items() if not isinstance(v, torch.Tensor)}
    extra = sorted(set(small.keys()) - set(scalars))
    if extra:
        raise small.error(f"unexpected entries {[small.prefix + k for k in extra]}")
    out: dict[str, object] = {}
    for k, like in scalars.items():
        if k in ("dim_x", "dim_y"):
            want = dim_x if k == "dim_x" else dim_y
            out[k] = small.integer(k, lo=want, hi=want)
        elif isinstance(like, bool):
            out[k] = small.flag(k)
        elif isinstance(like, int):
            out[k] = small.integer(k, lo=0)
        elif isinstance(like, float):
            out[k] = small.number(k, lo=0.0)
        elif isinstance(like, str):
            out[k] = small.string(k, empty=True)
        else:
            out[k] = small.raw(k)
    return out
