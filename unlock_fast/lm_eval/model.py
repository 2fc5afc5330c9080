"""The ``unlock`` model of lm-evaluation-harness: HF models steered by a key, the paper's way.

``UnlockSteering`` holds the behaviour; :func:`model_class` puts it in front of lm-eval's
``HFLM`` and registers the result as ``unlock`` the first time it is asked for, so that
importing this module needs no lm-eval (it is the optional extra ``lm-eval``).

Model arguments, besides HFLM's: ``key`` (a saved key or direction folder; none: the
unsteered model), ``alpha`` (float, default 0.1), ``mode`` (``rotate``, the paper's rule, or
``add``), ``positions`` (as in ``steer()``: ``last_prompt``, ``prompt``, ``generated``,
``all``), ``gguf_file``. ``pretrained`` also takes what ``unlock-fast`` does: the shipped
names (``smollm2-135m-instruct``, ``gemma-3-270m``) and ``.gguf`` files, converted once.

What the positions mean per request type (the prompt is what the model reads before the
tokens it produces or scores):

- ``generate_until``: the prompt is the context; steering follows the attention mask, so
  the last prompt token is each row's own, whatever the padding;
- ``loglikelihood`` (multiple choice): the prompt is the context and the continuation is
  scored as if generated: ``last_prompt`` is the last context token of each row, the one
  that predicts the first scored token; ``generated`` steers the continuation;
- ``loglikelihood_rolling``: lm-eval cuts a document into windows, each scored after a
  context of the tokens before it (the prefix token alone for the first window); the
  last prompt token is the last token of that context, so each window is steered at the
  token just before its first scored token.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from .._optional import require
from ..artifacts import Direction, SteeringKey, load_artifact
from ..loading import resolve_model, weights_source
from ..steering import MODES, POSITIONS, SteeringHandle, steer
from .layout import ContextIndex, Request, plan_rounds, split_forward

__all__ = ["MODEL_NAME", "SteeringArgs", "UnlockSteering", "model_class", "steering_args"]

MODEL_NAME = "unlock"
PURPOSE = "Evaluating with lm-evaluation-harness"


@dataclass(frozen=True)
class SteeringArgs:
    """The steering model arguments, checked."""

    key: Path | None
    alpha: float
    mode: str
    positions: str


def steering_args(
    key: str | Path | None, alpha: float | int | str, mode: str, positions: str
) -> SteeringArgs:
    """Check the steering arguments as lm-eval passes them (strings it could not read as
    numbers stay strings): TypeError for a non-number alpha, ValueError for the rest."""
    if isinstance(alpha, str):
        try:
            alpha = float(alpha)
        except ValueError:
            raise TypeError(f"alpha must be a float, got {alpha!r}") from None
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha must be a float, got {alpha!r}")
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    if key is not None and not isinstance(key, (str, Path)):
        raise TypeError(f"key must be the path of a saved key, got {type(key).__name__}")
    path = Path(key).expanduser() if key not in (None, "") else None
    if path is not None and not path.exists():
        raise ValueError(f"key not found: {path}")
    return SteeringArgs(path, float(alpha), mode, positions)


def _load_key(path: Path) -> SteeringKey:
    obj = load_artifact(path)
    if isinstance(obj, Direction):
        obj = obj.as_key()
    if not isinstance(obj, SteeringKey):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a steering key or direction")
    return obj


if TYPE_CHECKING:  # the part of lm-eval's HFLM that the mixin uses
    from typing import Self

    class _HFLM:
        backend: str
        max_length: int
        device: torch.device
        mixed_precision_dtype: torch.dtype | None

        def __init__(self, pretrained: str | nn.Module, **kwargs: object) -> None: ...
        @classmethod
        def create_from_arg_obj(
            cls, arg_dict: dict[str, object], additional_config: dict[str, object] | None = None
        ) -> Self: ...
        @property
        def model(self) -> nn.Module: ...
        def _model_call(
            self,
            inps: torch.Tensor,
            attn_mask: torch.Tensor | None = None,
            labels: torch.Tensor | None = None,
        ) -> torch.Tensor: ...
        def _model_generate(
            self, context: torch.Tensor, max_length: int, stop: list[str], **kwargs: object
        ) -> torch.Tensor: ...
        def _loglikelihood_tokens(
            self,
            requests: Sequence[Request],
            disable_tqdm: bool = False,
            override_bs: int | None = None,
        ) -> list[tuple[float, bool]]: ...
else:
    _HFLM = object


class UnlockSteering(_HFLM):
    """lm-eval's HF model with a key applied through ``steer()`` (registered as ``unlock``).

    The key is checked against the model when it loads: a key made for another model is
    refused (ValueError) before any request runs. Without a key, or inside
    :meth:`unsteered`, every call is HFLM's own.
    """

    def __init__(
        self,
        pretrained: str | nn.Module,
        key: str | Path | None = None,
        alpha: float | int | str = 0.1,
        mode: str = "rotate",
        positions: str = "last_prompt",
        gguf_file: str | None = None,
        **kwargs: object,
    ) -> None:
        self.steering = steering_args(key, alpha, mode, positions)
        self.key = _load_key(self.steering.key) if self.steering.key is not None else None
        label = None
        if isinstance(pretrained, (str, Path)):  # shipped names and GGUF files, as the CLI
            resolved = resolve_model(pretrained, gguf_file=gguf_file)
            label = resolved.display_name
            pretrained = weights_source(resolved)
        elif gguf_file is not None:
            raise ValueError("gguf_file needs pretrained to be a name or path")
        super().__init__(pretrained=pretrained, **kwargs)
        config = getattr(self.model, "config", None)
        if label is not None and config is not None:
            config._name_or_path = label  # the name keys record, as load_model sets it
        self._enabled = True
        self._rows: ContextIndex | None = None
        if self.key is not None:
            if self.backend != "causal":
                raise ValueError(f"steering needs a decoder-only model, got a {self.backend} one")
            self._steer().remove()  # refuses a key made for another model, now

    @property
    def steered(self) -> bool:
        """Whether calls are steered now (a key is set and :meth:`unsteered` is not active)."""
        return self.key is not None and self._enabled

    @contextmanager
    def unsteered(self) -> Iterator[None]:
        """Within the block, the model runs without the key (``--compare``'s baseline)."""
        before, self._enabled = self._enabled, False
        try:
            yield
        finally:
            self._enabled = before

    def _steer(self) -> SteeringHandle:
        if self.key is None:
            raise RuntimeError("this model has no key to steer with")
        s = self.steering
        return steer(self.model, self.key, alpha=s.alpha, mode=s.mode, positions=s.positions)

    def _steering(self) -> AbstractContextManager[object]:
        return self._steer() if self.steered else nullcontext()

    # -- generate_until: steer() follows the attention mask lm-eval passes -------------------
    def _model_generate(
        self, context: torch.Tensor, max_length: int, stop: list[str], **kwargs: object
    ) -> torch.Tensor:
        with self._steering():
            return super()._model_generate(context, max_length, stop, **kwargs)

    # -- loglikelihood: the last context token of each row ----------------------------------
    def _loglikelihood_tokens(
        self,
        requests: Sequence[Request],
        disable_tqdm: bool = False,
        override_bs: int | None = None,
    ) -> list[tuple[float, bool]]:
        if not self.steered:
            return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        try:
            for items, rows in plan_rounds(requests, self.max_length):
                self._rows = rows
                batch = [requests[i] for i in items]
                res = super()._loglikelihood_tokens(batch, disable_tqdm, override_bs)
                for i, r in zip(items, res, strict=True):
                    out[i] = r
        finally:
            self._rows = None
        return [r for r in out if r is not None]

    def _model_call(
        self,
        inps: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        last = self._rows.lookup(inps) if self.steered and self._rows is not None else None
        if last is None or attn_mask is not None or labels is not None:
            return super()._model_call(inps, attn_mask, labels)
        autocast = torch.autocast(
            device_type=self.device.type,
            dtype=self.mixed_precision_dtype,
            enabled=self.mixed_precision_dtype is not None,
        )
        with torch.no_grad(), autocast, self._steer():
            return split_forward(self.model, inps, last)


@functools.cache
def model_class() -> type[UnlockSteering]:
    """The ``unlock`` model class (``UnlockSteering`` on lm-eval's ``HFLM``), registered with
    lm-eval under that name on the first call; MissingDependency without the extra."""
    hf = require("lm_eval.models.huggingface", "lm-eval", PURPOSE)
    registry = require("lm_eval.api.registry", "lm-eval", PURPOSE)
    cls: type[UnlockSteering] = type(
        "UnlockLM",
        (UnlockSteering, hf.HFLM),
        {"__module__": __name__, "__qualname__": "UnlockLM", "__doc__": UnlockSteering.__doc__},
    )
    registry.register_model(MODEL_NAME)(cls)
    return cls
