"""Where a loglikelihood request's context ends, and a forward pass that steers there.

lm-evaluation-harness scores a continuation by running one row per request, the context and
the continuation without its last token (``(context + continuation)[-(max_length+1):][:-1]``),
right-padded with zeros to the longest row of the batch, with no attention mask. The
paper's "last prompt token" of such a row is the last token of the *context*, the one the
model sees just before the first scored token: index ``len(row) - len(continuation)``.

:func:`split_forward` runs a batch of such rows as a generation would see them: a prefill of
the contexts (left-padded, with their attention mask and position ids), then the
continuations on its KV cache. ``steer()`` then treats the context as the prompt and the
continuation as generated tokens, for every ``positions`` value, and the logits of each row
come back in lm-eval's layout. Unsteered, it gives the logits of the single forward pass up
to rounding.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["ContextIndex", "Request", "last_context_index", "plan_rounds", "split_forward"]

# (request string pair or None, context token ids, continuation token ids): lm-eval's form
Request = tuple[object, Sequence[int], Sequence[int]]
_PAD = 0  # lm-eval pads loglikelihood rows with zeros (lm_eval.models.utils.pad_and_concat)


def last_context_index(
    context: Sequence[int], continuation: Sequence[int], max_length: int
) -> tuple[tuple[int, ...], int]:
    """The row lm-eval feeds the model for this request and the index, in that row, of the
    last context token (it can be cut from the left when the request is too long; its last
    token is then still the last one kept)."""
    row = (list(context) + list(continuation))[-(max_length + 1) :][:-1]
    return tuple(row), len(row) - len(continuation)


def _strip(row: Sequence[int]) -> tuple[int, ...]:
    """A row without its trailing zeros: padded and unpadded rows give the same key."""
    n = len(row)
    while n and row[n - 1] == _PAD:
        n -= 1
    return tuple(row[:n])


@dataclass
class ContextIndex:
    """For the rows of one set of requests: the index of each row's last context token,
    keyed by the row's tokens (without trailing zeros, which lm-eval's padding adds)."""

    by_row: dict[tuple[int, ...], int] = field(default_factory=dict)

    def add(self, key: tuple[int, ...], index: int) -> bool:
        """Record ``index`` for ``key``; False when the key already has another index."""
        return self.by_row.setdefault(key, index) == index

    def lookup(self, rows: torch.Tensor) -> torch.Tensor | None:
        """[B] last context indices of a padded [B, S] batch of rows; None when none of the
        rows is a request (lm-eval's batch-size probe sends rows of ones)."""
        found = [self.by_row.get(_strip(r)) for r in rows.tolist()]
        if all(f is None for f in found):
            return None
        if any(f is None for f in found):
            missing = [i for i, f in enumerate(found) if f is None]
            raise RuntimeError(
                f"rows {missing} of a loglikelihood batch match no request; this version of "
                "lm-eval builds its batches in a way unlock-fast does not know"
            )
        return torch.tensor(found, dtype=torch.long, device=rows.device)


def plan_rounds(
    requests: Sequence[Request], max_length: int
) -> list[tuple[list[int], ContextIndex]]:
    """Split requests into rounds in which equal rows end their context at the same token.

    lm-eval computes equal rows once and shares their logits (one-token continuations of a
    shared context). Two requests can give the same row with contexts of different lengths
    (context ``a b`` + continuation ``c d``, and ``a b c`` + ``d``); steered, they need
    different forward passes, so they go to different rounds. Almost always one round."""
    rounds: list[tuple[list[int], ContextIndex]] = []
    for i, (_, context, continuation) in enumerate(requests):
        row, index = last_context_index(context, continuation, max_length)
        key = _strip(row)
        for items, table in rounds:
            if table.add(key, index):
                items.append(i)
                break
        else:
            table = ContextIndex()
            table.add(key, index)
            rounds.append(([i], table))
    return rounds


def _cache_of(out: object) -> object:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def _positions(mask: torch.Tensor, start: torch.Tensor | None = None) -> torch.Tensor:
    """Position ids of real tokens (counted from ``start`` per row), 0 on padding."""
    pos = mask.long().cumsum(1) - 1
    if start is not None:
        pos = pos + start[:, None]
    return pos.clamp(min=0).masked_fill(~mask, 0)


def _forward_arguments(model: nn.Module) -> tuple[str, str | None]:
    """The names under which the model's forward takes a KV cache (``cache`` since
    transformers 5 renamed it, ``past_key_values`` before) and the number of positions to
    compute logits for (``logits_to_keep``, earlier ``num_logits_to_keep``; None: all)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values", None
    cache = "cache" if "cache" in params else "past_key_values"
    keep = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)
    return cache, keep


def split_forward(model: nn.Module, rows: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """Logits [B, S, V] of ``rows`` [B, S] (lm-eval's right-padded loglikelihood batch),
    computed as a prefill of each row's context ``rows[i, :last[i] + 1]`` followed by the
    rest of the row on the prefill's KV cache. Padding after a row's real tokens is fed as
    lm-eval feeds it. Only the logits lm-eval reads are computed: from each row's last
    context token on (the prefill keeps its last column when the model can); the columns
    before a row's last context token repeat that token's logits."""
    b, s = rows.shape
    if last.shape != (b,) or bool((last < 0).any()) or bool((last >= s).any()):
        raise ValueError(f"last context indices must be [B] in [0, {s}), got {last.tolist()}")
    dev = rows.device
    ar = torch.arange(s, device=dev)
    width = int(last.max()) + 1  # the longest context
    # prefill: the contexts, left-padded so that all of them end in the last column
    shift = width - 1 - last  # [B] padding before each context
    ctx_mask = torch.arange(width, device=dev)[None, :] >= shift[:, None]
    src = (torch.arange(width, device=dev)[None, :] - shift[:, None]).clamp(min=0)
    ctx = torch.where(ctx_mask, rows.gather(1, src), torch.full_like(src, _PAD))
    cache_arg, keep_arg = _forward_arguments(model)
    out = model(
        input_ids=ctx,
        attention_mask=ctx_mask.long(),
        position_ids=_positions(ctx_mask),
        use_cache=True,
        **({} if keep_arg is None else {keep_arg: 1}),
    )
    logits = out.logits[:, -1:]  # each context's last token: the one lm-eval reads
    rest = s - 1 - int(last.min())  # the longest continuation part
    if rest > 0:
        # the continuations, right-padded, on the cache: positions go on from the context's
        cols = torch.arange(rest, device=dev)
        cont_mask = cols[None, :] < (s - 1 - last)[:, None]
        src2 = (last[:, None] + 1 + cols[None, :]).clamp(max=s - 1)
        cont = torch.where(cont_mask, rows.gather(1, src2), torch.full_like(src2, _PAD))
        out2 = model(
            input_ids=cont,
            attention_mask=torch.cat([ctx_mask, cont_mask], dim=1).long(),
            position_ids=_positions(cont_mask, last + 1),
            **{cache_arg: _cache_of(out)},
            use_cache=True,
        )
        logits = torch.cat([logits, out2.logits], dim=1)
    # back to lm-eval's layout: token j of row i is column 0 (the prefill's last) while
    # j <= last[i], else column 1 + (j - last[i] - 1) of the continuation call
    index = (ar[None, :] - last[:, None]).clamp(min=0, max=logits.shape[1] - 1)
    return logits.gather(1, index[:, :, None].expand(b, s, logits.shape[-1]))
