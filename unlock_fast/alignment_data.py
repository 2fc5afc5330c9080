"""Which rows the alignment is fitted on: a choice of :data:`ALIGNMENT_DATA`, checked before
any forward pass, and a corpus streamed through both models in chunks.

The paper fits the map on the locked prompts. What the map is fitted on decides much of what
a transferred key does, so the collectors take the rows as a choice: the locked prompts, the
locked and the unlocked prompts (a prompt contrast only), a corpus of text that never shows
the capability (the same text for both models), or the locked prompts and a corpus. Every
row goes into the same float64 sums, so the statistics are exact whatever their number; a
corpus is read and run ``CHUNK`` texts at a time and its activations are never kept.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path
from typing import Any

from .artifacts.data import ALIGNMENT_DATA, check_alignment_data, data_record
from .capture import CapturedBatch
from .collect import Side, check_prompts, lockstep
from .corpus import GENERIC_SIZE, generic_corpus, read_corpus

__all__ = [
    "ALIGNMENT_DATA",
    "CHUNK",
    "AlignmentData",
    "CorpusLike",
    "CorpusSource",
    "plan_data",
    "resolve_corpus",
]

# A corpus: a list of texts, a file that read_corpus reads, or "generic" (generic_corpus).
CorpusLike = Sequence[str] | str | os.PathLike[str]
CHUNK = 4096  # corpus texts per lockstep pass
Update = Callable[[CapturedBatch, CapturedBatch], None]


@dataclass(frozen=True)
class CorpusSource:
    """A corpus to stream: ``texts()`` iterates over it afresh; ``name`` is what the
    artifacts record (the file's path, ``generic_corpus(n=..., seed=0)`` or ``list``)."""

    name: str
    texts: Callable[[], Iterable[str]]


def resolve_corpus(corpus: CorpusLike, limit: int | None = None) -> CorpusSource:
    """The corpus ``corpus`` names, at most ``limit`` texts of it: a list of texts, the path
    of a text or JSONL file (:func:`~unlock_fast.corpus.read_corpus`), or ``"generic"``:
    ``generic_corpus(limit or GENERIC_SIZE)`` (a file named so is ``Path("generic")``)."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"corpus_limit must be a positive int or None, got {limit!r}")
    if isinstance(corpus, str) and corpus == "generic":
        n = limit or GENERIC_SIZE
        texts = generic_corpus(n)
        return CorpusSource(f"generic_corpus(n={n}, seed=0)", lambda: texts)
    if isinstance(corpus, str | os.PathLike):
        path = Path(corpus)
        read_corpus(path, limit=limit)  # the file exists: say so now, not after the prompts
        return CorpusSource(str(corpus), lambda: read_corpus(path, limit=limit))
    if isinstance(corpus, Sequence):
        items = check_prompts("corpus", corpus)[:limit]
        return CorpusSource("list", lambda: items)
    raise TypeError(
        "corpus must be a list of str, the path of a text or .jsonl file, or 'generic'; "
        f"got {type(corpus).__name__}"
    )


@dataclass
class AlignmentData:
    """The rows of one collection: the prompts of each model (item i of both lists is the
    same item) and the corpus, if the choice has one."""

    choice: str
    source_prompts: list[str]
    target_prompts: list[str]
    locked: int
    unlocked: int
    corpus: CorpusSource | None

    def run_prompts(self, source: Side, target: Side, update: Update, **lockstep_kw: Any) -> None:
        """Run the chosen prompts through ``source`` and ``target`` (their models and layers)
        and feed each batch of paired rows to ``update``."""
        if not self.source_prompts:
            return
        sides = [
            replace(source, prompts=self.source_prompts),
            replace(target, prompts=self.target_prompts),
        ]
        with lockstep(sides, desc="alignment", **lockstep_kw) as batches:
            for a, b in batches:
                update(a, b)

    def run_corpus(
        self, source: Side, target: Side, update: Update, **lockstep_kw: Any
    ) -> dict[str, object]:
        """Stream the corpus (if any) through both models, ``CHUNK`` texts per pass, into
        ``update``; returns the record of the data (:func:`data_record`)."""
        count, digest = 0, hashlib.sha256()
        if self.corpus is not None:
            texts = _checked(self.corpus.texts(), digest)
            while chunk := list(islice(texts, CHUNK)):
                sides = [replace(source, prompts=chunk), replace(target, prompts=chunk)]
                with lockstep(sides, desc="alignment (corpus)", **lockstep_kw) as batches:
                    for a, b in batches:
                        update(a, b)
                count += len(chunk)
            if count == 0:
                raise ValueError(f"the corpus {self.corpus.name} holds no text")
        return data_record(
            self.choice,
            locked=self.locked,
            unlocked=self.unlocked,
            corpus=count,
            corpus_source=None if self.corpus is None else self.corpus.name,
            corpus_hash=None if self.corpus is None else digest.hexdigest()[:12],
        )


def _checked(texts: Iterable[str], digest: hashlib._Hash) -> Iterator[str]:
    """The texts, each checked to be a non-empty str and added to ``digest`` as
    :func:`~unlock_fast.corpus.corpus_hash` does."""
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"corpus item {i} is a {type(text).__name__}, not a str")
        if not text.strip():
            raise ValueError(f"corpus item {i} is empty")
        digest.update(text.encode("utf-8") + b"\n")
        yield text


def plan_data(
    alignment_data: str,
    corpus: CorpusLike | None,
    corpus_limit: int | None,
    prompts: Sequence[str],
    prompts_unlocked: Sequence[str] | None,
    target_prompts: Sequence[str] | None,
    target_prompts_unlocked: Sequence[str] | None,
    *,
    model_contrast: bool = False,
) -> AlignmentData:
    """Check a choice of alignment data against what was given, before any forward pass.

    ``corpus``/``locked+corpus`` need a corpus and the other choices refuse one (it would
    otherwise be ignored). ``locked+unlocked`` needs unlocked prompts and a prompt contrast:
    with a model contrast (``model_contrast``) the Target has no unlocked form.
    """
    choice = check_alignment_data(alignment_data)
    wants_corpus = choice in ("corpus", "locked+corpus")
    if wants_corpus and corpus is None:
        raise ValueError(f"alignment_data={choice!r} needs a corpus (corpus=...)")
    if not wants_corpus and corpus is not None:
        raise ValueError(
            f"a corpus was given but alignment_data={choice!r} does not use one; pass "
            "alignment_data='corpus' or 'locked+corpus', or leave corpus out"
        )
    if corpus is None and corpus_limit is not None:
        raise ValueError("corpus_limit was given without a corpus")
    source = None if corpus is None else resolve_corpus(corpus, corpus_limit)
    if choice == "corpus":  # the prompts are not run
        return AlignmentData(choice, [], [], 0, 0, source)
    locked = check_prompts("prompts", prompts)
    tlocked = locked if target_prompts is None else check_prompts("target_prompts", target_prompts)
    src, tgt, n_unlocked = locked, tlocked, 0
    if choice == "locked+unlocked":
        if model_contrast:
            raise ValueError(
                "alignment_data='locked+unlocked' needs a prompt contrast: with a model "
                "contrast (unlocked_model=) the Target has no unlocked form to pair with"
            )
        if prompts_unlocked is None:
            raise ValueError("alignment_data='locked+unlocked' needs the unlocked prompts")
        unlocked = check_prompts("prompts_unlocked", prompts_unlocked)
        tunlocked = (
            unlocked
            if target_prompts_unlocked is None
            else check_prompts("target_prompts_unlocked", target_prompts_unlocked)
        )
        if not len(unlocked) == len(tunlocked) == len(locked):
            raise ValueError(
                f"the unlocked prompts must pair with the locked ones: got {len(locked)} "
                f"locked, {len(unlocked)} unlocked and {len(tunlocked)} for the Target"
            )
        src, tgt, n_unlocked = locked + unlocked, tlocked + tunlocked, len(unlocked)
    return AlignmentData(choice, src, tgt, len(locked), n_unlocked, source)
