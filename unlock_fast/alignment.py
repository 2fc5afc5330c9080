"""Collect the alignment's statistics from paired Source and Target passes, and fit it.

Each prompt goes through both models; the rows of each (source, target) layer pair stream
into a paired :class:`~unlock_fast.stats.Moments` (float64 sums by default). Layers pair by
proportional depth unless a ``layer_map`` says otherwise. The fit itself is
:mod:`unlock_fast.estimator`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed import ProcessGroup

from .alignment_data import CorpusLike, plan_data
from .artifacts import Alignment, AlignmentStats, ModelInfo
from .capture import CapturedBatch
from .collect import Side
from .estimator import check_fit_settings
from .stats import Moments, check_accumulate

__all__ = [
    "AlignmentAccumulator",
    "LayerMap",
    "collect_alignment_stats",
    "fit_alignment",
    "proportional_layer_map",
]

LayerMap = Sequence[tuple[int, int]] | Mapping[int, int]


def proportional_layer_map(num_source: int, num_target: int) -> list[tuple[int, int]]:
    """Pair each target layer t with source layer s = floor((Ls - 1) t / (Lt - 1))."""
    for name, v in (("num_source", num_source), ("num_target", num_target)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if num_target == 1:
        return [(num_source - 1, 0)]
    return [((num_source - 1) * t // (num_target - 1), t) for t in range(num_target)]


def _resolve_layer_map(
    layer_map: Sequence[tuple[int, int]] | Mapping[int, int] | None, ls: int, lt: int
) -> list[tuple[int, int]]:
    if layer_map is None:
        return proportional_layer_map(ls, lt)
    pairs = (
        [(s, t) for t, s in layer_map.items()]
        if isinstance(layer_map, Mapping)
        else [tuple(p) for p in layer_map]
    )
    out: list[tuple[int, int]] = []
    for p in pairs:
        if len(p) != 2 or not all(isinstance(i, int) and not isinstance(i, bool) for i in p):
            raise TypeError(f"layer_map entries must be (source, target) int pairs, got {p!r}")
        s, t = int(p[0]), int(p[1])
        s, t = s + ls if s < 0 else s, t + lt if t < 0 else t
        if not (0 <= s < ls and 0 <= t < lt):
            raise ValueError(
                f"layer pair {p} is out of range: the Source has {ls} layers, the Target {lt}"
            )
        out.append((s, t))
    targets = [t for _, t in out]
    if len(set(targets)) != len(targets):
        raise ValueError(f"each target layer may appear once in layer_map, got {out}")
    if not out:
        raise ValueError("layer_map must not be empty")
    return sorted(out, key=lambda p: p[1])


class AlignmentAccumulator:
    """Streams paired Source/Target rows of each layer pair into Moments of ``dtype``."""

    def __init__(
        self,
        pairs: list[tuple[int, int]],
        source: ModelInfo,
        target: ModelInfo,
        token_level: bool,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        self.pairs = pairs
        self.source, self.target = source, target
        self.token_level = token_level
        self.dtype = check_accumulate(dtype)
        self.moments: dict[tuple[int, int], Moments] = {}
        self.num_prompts = 0

    def update(self, a: CapturedBatch, b: CapturedBatch) -> None:
        """Add one batch of Source rows ``a`` and the Target rows ``b`` of the same items."""
        if self.token_level and not torch.equal(a.token_ids, b.token_ids):
            raise ValueError(
                "token_level=True: Source and Target tokenized a batch differently "
                f"(prompts {a.indices[:4]}...); the tokenizers are not identical"
            )
        for s, t in self.pairs:
            x, y = a.rows[s], b.rows[t]
            m = self.moments.get((s, t))
            if m is None:
                m = self.moments[(s, t)] = Moments(
                    self.source.hidden_size,
                    self.target.hidden_size,
                    device=x.device,
                    dtype=self.dtype,
                    row_limit="auto",
                )
            m.update(x, y)
        self.num_prompts += len(a.indices)

    def stats(self, device: torch.device | str | None = None) -> AlignmentStats:
        """The statistics so far (a pair with no rows gets empty Moments on ``device``)."""
        out = []
        for p in self.pairs:
            m = self.moments.get(p)
            if m is None:  # no rows here (an empty shard)
                m = Moments(
                    self.source.hidden_size,
                    self.target.hidden_size,
                    device=device or "cpu",
                    dtype=self.dtype,
                    row_limit="auto",
                )
            out.append(m)
        return AlignmentStats(
            layer_map=list(self.pairs),
            moments=out,
            source=self.source,
            target=self.target,
            token_level=self.token_level,
            num_prompts=self.num_prompts,
        )


@dataclass
class AlignmentPlan:
    """A checked collection: the two sides and the layer pairs."""

    source: Side
    target: Side
    pairs: list[tuple[int, int]]
    source_info: ModelInfo
    target_info: ModelInfo
    token_level: bool

    def accumulator(self, dtype: torch.dtype = torch.float64) -> AlignmentAccumulator:
        return AlignmentAccumulator(
            self.pairs, self.source_info, self.target_info, self.token_level, dtype
        )


def _same_tokenizer(a: Any, b: Any) -> bool:
    if a is b:
        return True
    try:
        return bool(a.get_vocab() == b.get_vocab())
    except (AttributeError, NotImplementedError):
        return False


def plan_alignment(
    source_model: nn.Module,
    source_tokenizer: Any,
    target_model: nn.Module,
    target_tokenizer: Any,
    prompts: Sequence[str],
    *,
    target_prompts: Sequence[str] | None = None,
    layer_map: LayerMap | None = None,
    token_level: bool = False,
    source_layer_path: str | None = None,
    target_layer_path: str | None = None,
    empty_prompts: bool = False,
) -> AlignmentPlan:
    """Check the arguments of :func:`collect_alignment_stats` before any forward pass;
    ``prompts`` may be empty only with ``empty_prompts=True`` (a corpus-only fit)."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise ValueError("prompts must be a list of str")
    if not prompts and not empty_prompts:
        raise ValueError("prompts must be a non-empty list of str")
    tprompts = list(prompts) if target_prompts is None else list(target_prompts)
    if len(tprompts) != len(prompts):
        raise ValueError(
            f"target_prompts must pair with prompts: got {len(tprompts)} and {len(prompts)}"
        )
    src = ModelInfo.of(source_model, source_layer_path)
    tgt = ModelInfo.of(target_model, target_layer_path)
    pairs = _resolve_layer_map(layer_map, src.num_layers, tgt.num_layers)
    if token_level:
        if target_prompts is not None and list(target_prompts) != list(prompts):
            raise ValueError("token_level=True needs the same prompts for Source and Target")
        if not _same_tokenizer(source_tokenizer, target_tokenizer):
            raise ValueError(
                "token_level=True needs Source and Target to share one tokenizer (identical "
                "vocabularies); these differ. Use token_level=False to pair last tokens only"
            )
    return AlignmentPlan(
        source=Side(
            source_model,
            source_tokenizer,
            list(prompts),
            sorted({s for s, _ in pairs}),
            source_layer_path,
        ),
        target=Side(
            target_model,
            target_tokenizer,
            tprompts,
            sorted({t for _, t in pairs}),
            target_layer_path,
        ),
        pairs=pairs,
        source_info=src,
        target_info=tgt,
        token_level=token_level,
    )


def collect_alignment_stats(
    source_model: nn.Module,
    source_tokenizer: Any,
    target_model: nn.Module,
    target_tokenizer: Any,
    prompts: Sequence[str],
    *,
    prompts_unlocked: Sequence[str] | None = None,
    target_prompts: Sequence[str] | None = None,
    target_prompts_unlocked: Sequence[str] | None = None,
    alignment_data: str = "locked",
    corpus: CorpusLike | None = None,
    corpus_limit: int | None = None,
    layer_map: LayerMap | None = None,
    token_level: bool = False,
    source_layer_path: str | None = None,
    target_layer_path: str | None = None,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    max_length: int | None = None,
    progress: bool = True,
    distributed: bool = False,
    group: ProcessGroup | None = None,
    accumulate: torch.dtype = torch.float64,
) -> AlignmentStats:
    """Stream paired Source/Target activations of ``prompts`` into Gram statistics.

    Each prompt goes through both models (``target_prompts`` gives the Target its own
    rendering of the same items, e.g. its chat template). ``alignment_data`` chooses the
    rows (:data:`~unlock_fast.alignment_data.ALIGNMENT_DATA`):

    - ``"locked"`` (the paper): ``prompts``.
    - ``"locked+unlocked"``: ``prompts`` and ``prompts_unlocked``, each through both models
      (the Target reads ``target_prompts_unlocked`` when given). This runs the Target on the
      unlocked prompts, so the map can learn the Source's contrast -> the Target's contrast:
      a ceiling and a diagnostic, not the paper's transfer, where the Target never sees
      the unlocked form.
    - ``"corpus"``: the texts of ``corpus``, the same text for both models (``prompts`` are
      not run and may be empty: a map fitted once per model pair, for any direction).
      ``corpus`` is a list of str, the path of a text or JSONL file
      (:func:`~unlock_fast.corpus.read_corpus`) or ``"generic"``
      (:func:`~unlock_fast.corpus.generic_corpus`); ``corpus_limit`` caps its texts. It is
      streamed ``CHUNK`` texts at a time.
    - ``"locked+corpus"``: ``prompts``, then the corpus.

    A corpus with another choice, or a corpus choice without one, is a ValueError. The
    choice, the items of each kind and the corpus's source and hash are recorded in the
    result's ``origin["alignment_data"]``. Rows are the last real prompt
    token, or with ``token_level=True`` every real token (the two tokenizers must then
    tokenize identically). ``layer_map``: (source, target) pairs or {target: source};
    default proportional depth. ``distributed=True`` shards the prompts over the
    processes of ``group`` and all-reduces the result. NaN or Inf in a captured row stops
    the collection with a ValueError naming the model, the layer and the prompts.

    ``accumulate``: the dtype of the sums. float64 (the default) keeps the fit equal to the
    per-sample formula: the fit inverts the Source Gram's eigenvalues, and fp32 sums square
    the conditioning of the data (at N = 120, rank 48 that is an error of about 1e-3 on T,
    against 1e-9 with float64). It costs 8·(d_s² + d_t² + d_s·d_t) bytes per layer pair on
    the rows' device and float64 products, small beside the forward passes for last-token
    rows; torch.float32 halves the memory and uses the compiled kernel, which can matter for
    ``token_level`` statistics on GPUs with slow float64.
    """
    check_accumulate(accumulate)
    plan = plan_alignment(
        source_model,
        source_tokenizer,
        target_model,
        target_tokenizer,
        prompts,
        target_prompts=target_prompts,
        layer_map=layer_map,
        token_level=token_level,
        source_layer_path=source_layer_path,
        target_layer_path=target_layer_path,
        empty_prompts=alignment_data == "corpus",
    )
    data = plan_data(
        alignment_data,
        corpus,
        corpus_limit,
        prompts,
        prompts_unlocked,
        target_prompts,
        target_prompts_unlocked,
    )
    acc = plan.accumulator(accumulate)
    kw: dict[str, Any] = dict(
        batch_size=batch_size,
        token_level=token_level,
        device=device,
        dtype=dtype,
        max_length=max_length,
        progress=progress,
        distributed=distributed,
        group=group,
    )
    data.run_prompts(plan.source, plan.target, acc.update, **kw)
    record = data.run_corpus(plan.source, plan.target, acc.update, **kw)
    stats = acc.stats(device)
    stats.origin["alignment_data"] = record
    if distributed:
        stats.all_reduce(group)
    return stats


def fit_alignment(
    source_model: nn.Module,
    source_tokenizer: Any,
    target_model: nn.Module,
    target_tokenizer: Any,
    prompts: Sequence[str],
    *,
    rank: int = 64,
    centered: bool = False,
    ridge: float = 0.0,
    solver: str = "auto",
    oversample: int | None = None,
    n_iter: int | None = None,
    **collect_kwargs: Any,  # any keyword of collect_alignment_stats
) -> Alignment:
    """collect_alignment_stats(...) then .fit(rank, centered, ridge, solver settings).

    ``solver`` ("auto", "exact" or "randomized"), ``oversample`` and ``n_iter`` choose the
    eigensolver (:mod:`unlock_fast.estimator`; None keeps its default). The rank and the
    settings are checked before any forward pass.
    """
    check_fit_settings([rank], ridge, solver=solver, oversample=oversample, n_iter=n_iter)
    stats = collect_alignment_stats(
        source_model,
        source_tokenizer,
        target_model,
        target_tokenizer,
        prompts,
        **collect_kwargs,
    )
    return stats.fit(rank, centered, ridge, solver=solver, oversample=oversample, n_iter=n_iter)
