"""Which tokens of a forward call steering touches, following the prompt across calls.

A steered model sees three kinds of calls on the module that runs its decoder blocks:

- a prefill: a new prompt batch, with an empty or no cache;
- a decoding step: new tokens on top of a non-empty cache;
- a full re-run: ``generate(..., use_cache=False)`` runs the whole sequence again at every
  step. A call given no cache object at all is taken as a re-run of the remembered prompt
  when it passes ``input_ids`` with as many rows as the prompt, exactly one token more than
  the call before it, and begins with the prompt's token ids and attention mask; any other
  call with no or an empty cache is a new prompt (each ``generate`` with a cache starts
  from an empty one).

The prompt tokens of a row are its real tokens among the first prompt-length positions; the
rest are generated. So every call of a generation steers the same tokens whether it runs on
a cache or not, and greedy outputs do not depend on ``use_cache``.

Real tokens come from the 2-D attention mask, whichever side the padding is on. A call
without one takes every token as real; since it cannot tell padding from text, a prompt row
that starts or ends with the model's ``config.pad_token_id`` is refused (ValueError: pass the
attention mask). A prompt row with no real token is an error, not position 0.

Under ``torch.compile`` the tracker adds no graph break for an ordinary call: those two
refusals become asynchronous assertions (a RuntimeError with the same reason, raised by the
compiled graph, instead of a ValueError), and only a no-cache call shaped like a re-run
(one token more than the call before) compares token ids on the host, a graph break.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .capture import last_positions

__all__ = ["POSITIONS", "CallTracker", "Selection", "cache_length"]

POSITIONS = ("last_prompt", "prompt", "generated", "all")


def cache_length(cache: object) -> int:
    """Tokens held by a KV cache (a Cache object or the legacy tuple layout); 0 for none."""
    if cache is None:
        return 0
    get = getattr(cache, "get_seq_length", None)
    if callable(get):
        return int(get())
    if isinstance(cache, (tuple, list)):  # legacy ((k, v), ...) layout
        if not cache or cache[0] is None:
            return 0
        first = cache[0][0] if isinstance(cache[0], (tuple, list)) else cache[0]
        return int(first.shape[-2]) if isinstance(first, torch.Tensor) else 0
    return 0


@dataclass
class Selection:
    """What one call steers: one token per row (``per_row``: ``where`` is [B] positions,
    -1 = none) or a [B, S] bool mask."""

    where: torch.Tensor
    per_row: bool

    @property
    def positions(self) -> torch.Tensor | None:
        return self.where if self.per_row else None

    @property
    def mask(self) -> torch.Tensor | None:
        return None if self.per_row else self.where

    def only_rows(self, on: torch.Tensor) -> Selection:
        """The selection restricted to the rows where ``on`` [B] (bool) is set."""
        if self.per_row:
            return Selection(torch.where(on, self.where, torch.full_like(self.where, -1)), True)
        return Selection(self.where & on[:, None], False)


_EMPTY_ROW = "a row of the batch has no real token (its attention mask is all zeros)"
_UNMASKED_PAD = (
    "a row of input_ids starts or ends with the pad token id and no 2-D attention_mask was "
    "passed; pass the attention_mask (as the tokenizer returns it)"
)


@dataclass
class _Prompt:
    """The prompt batch of the last prefill."""

    ids: torch.Tensor | None  # [B, S0] token ids (None when it came as embeddings)
    real: torch.Tensor  # [B, S0] bool
    last: torch.Tensor  # [B] index of each row's last real prompt token

    @classmethod
    def of(cls, ids: torch.Tensor | None, real: torch.Tensor) -> _Prompt:
        if torch.compiler.is_compiling():  # no host sync, so no graph break
            torch._assert_async(real.any(dim=1).all(), _EMPTY_ROW)
            ar = torch.arange(real.shape[1], device=real.device)
            last = (real.long() * ar).argmax(dim=1)
        else:
            last = last_positions(real)  # ValueError naming a row with no real token
        return cls(None if ids is None else ids.clone(), real, last)

    @property
    def length(self) -> int:
        return int(self.real.shape[1])

    def continued_by(self, ids: torch.Tensor | None, real: torch.Tensor, before: int) -> bool:
        """Whether a no-cache call on ``ids`` re-runs this prompt plus the tokens generated
        so far (``before``: tokens of the previous call)."""
        if ids is None or self.ids is None or ids.device != self.ids.device:
            return False
        b, s, n = int(ids.shape[0]), int(ids.shape[1]), self.length
        if b != self.ids.shape[0] or s != before + 1 or s <= n:
            return False
        return torch.equal(ids[:, :n], self.ids) and torch.equal(real[:, :n], self.real)


def _pad_ids(model: nn.Module) -> list[int]:
    cfg = getattr(model, "config", None)
    out: list[int] = []
    for c in (cfg, getattr(cfg, "text_config", None)):
        v = getattr(c, "pad_token_id", None) if c is not None else None
        for i in v if isinstance(v, (list, tuple)) else [v]:
            if isinstance(i, int) and not isinstance(i, bool) and i not in out:
                out.append(i)
    return out


class CallTracker:
    """Follows the forward calls of one steered model and says what each one steers."""

    def __init__(self, model: nn.Module, positions: str) -> None:
        if positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
        self.model = model
        self.positions = positions
        self._prompt: _Prompt | None = None
        self._length = 0  # tokens (cache + new) of the last call

    def reset(self) -> None:
        self._prompt = None
        self._length = 0

    def select(self, args: Mapping[str, Any]) -> Selection | None:
        """What the call with these (named) arguments steers; None: nothing."""
        ids = args.get("input_ids")
        ids = ids if isinstance(ids, torch.Tensor) else None
        x = ids if ids is not None else args.get("inputs_embeds")
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            return None
        b, s = int(x.shape[0]), int(x.shape[1])
        cache = args.get("past_key_values")
        if cache is None:  # newer transformers name it ``cache``
            cache = args.get("cache")
        past = cache_length(cache)
        real = self._real_tokens(args.get("attention_mask"), ids, b, s, past, x.device)
        before, self._length = self._length, past + s
        if past > 0:  # decoding on a cache: every new token is generated
            return Selection(real, False) if self.positions in ("generated", "all") else None
        prompt = self._prompt
        if prompt is None or cache is not None or not prompt.continued_by(ids, real, before):
            prompt = self._prompt = _Prompt.of(ids, real)
        n = prompt.length
        if self.positions == "last_prompt":
            return Selection(prompt.last, True)
        if self.positions == "all" or (self.positions == "prompt" and s == n):
            return Selection(real, False)
        if s == n:  # generated, on a fresh prompt
            return None
        mask = real.clone()
        if self.positions == "prompt":
            mask[:, n:] = False
        else:
            mask[:, :n] = False
        return Selection(mask, False)

    def _real_tokens(
        self,
        attention_mask: object,
        ids: torch.Tensor | None,
        b: int,
        s: int,
        past: int,
        device: torch.device,
    ) -> torch.Tensor:
        am = attention_mask
        if isinstance(am, torch.Tensor) and am.dim() == 2 and am.shape[0] == b:
            if am.shape[1] < s:
                raise ValueError(
                    f"attention_mask has {am.shape[1]} columns but the call has {s} new tokens"
                )
            if am.dtype == torch.bool:
                return am if am.shape[1] == s else am.narrow(1, am.shape[1] - s, s)
            return (am if am.shape[1] == s else am.narrow(1, am.shape[1] - s, s)).ne(0)
        if past == 0 and ids is not None and ids.dim() == 2 and s > 0:
            self._refuse_unmasked_padding(ids)
        return torch.ones(b, s, dtype=torch.bool, device=device)

    def _refuse_unmasked_padding(self, ids: torch.Tensor) -> None:
        pad = _pad_ids(self.model)
        if not pad:
            return
        edges = ids[:, [0, -1]]
        hit = torch.isin(edges, torch.tensor(pad, device=ids.device, dtype=ids.dtype))
        if torch.compiler.is_compiling():  # no host sync, so no graph break
            torch._assert_async(~hit.any(), _UNMASKED_PAD)
            return
        if bool(hit.any()):
            row, side = (int(v) for v in hit.nonzero()[0])
            raise ValueError(
                f"row {row} of input_ids {'starts' if side == 0 else 'ends'} with the pad "
                f"token id {int(edges[row, side])} and no 2-D attention_mask was passed; "
                "without one every token is taken as real and padding would be steered. Pass "
                "the attention_mask (as the tokenizer returns it)"
            )
