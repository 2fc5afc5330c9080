"""The plain-value state of a :class:`~.moments.Moments`, checked before it is rebuilt.

Two forms: sums and full Grams (``shift_x``, ``sum_x``, ``gram_xx`` and, paired,
``shift_y``, ``sum_y``, ``gram_yy``, ``gram_xy``), or with ``form`` = "rows" the rows
themselves (``rows_x`` [held, d_x], ``rows_y``, ``weights`` [held]) and the shifts, plus the
scalars ``held`` and ``row_limit``. A state without ``form`` is the Gram form (every
statistics file written before the row form existed).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["GRAM_KEYS", "ROW_KEYS", "State", "check_state", "state_shapes"]

GRAM_KEYS = ("shift_x", "sum_x", "gram_xx", "shift_y", "sum_y", "gram_yy", "gram_xy")
ROW_KEYS = ("shift_x", "rows_x", "weights", "shift_y", "rows_y")


def state_shapes(
    dim_x: int, dim_y: int | None, form: str = "gram", held: int = 0
) -> dict[str, tuple[int, ...]]:
    """The tensors a state of this form holds, and their shapes."""
    dy = dim_y or 0
    if form == "rows":
        shapes = dict(
            zip(ROW_KEYS, [(dim_x,), (held, dim_x), (held,), (dy,), (held, dy)], strict=True)
        )
    else:
        both = [(dim_x,), (dim_x,), (dim_x, dim_x), (dy,), (dy,), (dy, dy), (dim_x, dy)]
        shapes = dict(zip(GRAM_KEYS, both, strict=True))
    keep = [k for k in shapes if dim_y is not None or "y" not in k.split("_")[-1]]
    return {k: shapes[k] for k in keep}


@dataclass
class State:
    """A checked state: dims, form, counts and its tensors by name."""

    dim_x: int
    dim_y: int | None
    form: str
    count: float
    rows: int
    row_limit: int
    tensors: dict[str, torch.Tensor]


def check_state(state: dict[str, object]) -> State:
    """The state as a :class:`State`; ValueError naming what is missing or misshapen."""
    missing = [k for k in ("dim_x", "count", "rows") if k not in state]
    if missing:
        raise ValueError(f"state is missing {', '.join(missing)}")
    dim_x = int(state["dim_x"])  # type: ignore[call-overload]
    dy = state.get("dim_y")
    dim_y = None if dy is None else int(dy)  # type: ignore[call-overload]
    form = str(state.get("form", "gram"))
    if form not in ("gram", "rows"):
        raise ValueError(f"state['form'] must be 'gram' or 'rows', got {form!r}")
    held = int(state.get("held", 0))  # type: ignore[call-overload]
    row_limit = int(state.get("row_limit", 0))  # type: ignore[call-overload]
    if form == "rows" and not 0 <= held <= max(row_limit, 0):
        raise ValueError(f"state holds {held} rows, over its row_limit of {row_limit}")
    want = state_shapes(dim_x, dim_y, form, held)
    missing = [k for k in want if k not in state]
    if missing:
        raise ValueError(f"state is missing {', '.join(missing)}")
    tensors = {}
    for k, shape in want.items():
        v = state[k]
        if not isinstance(v, torch.Tensor) or tuple(v.shape) != shape:
            got = list(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"state[{k!r}] must be a tensor of shape {list(shape)}, got {got}")
        tensors[k] = v
    if form == "rows" and bool((tensors["weights"] < 0).any()):
        raise ValueError("state['weights'] holds negative weights")
    count, rows = float(state["count"]), int(state["rows"])  # type: ignore[arg-type, call-overload]
    return State(dim_x, dim_y, form, count, rows, row_limit, tensors)
