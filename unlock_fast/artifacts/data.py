"""What an alignment was fitted on: the choice of rows, and its record in ``origin``.

The rows of the alignment's Gram statistics are the prompts one of :data:`ALIGNMENT_DATA`
names. ``AlignmentStats``, ``Alignment`` and the ``SteeringKey`` an alignment transfers carry
the choice as ``origin["alignment_data"]``: an object with the choice, the number of items
of each kind, and for a corpus where it came from and a short hash of its text, saved with
the artifact and checked when it is read back.
"""

from __future__ import annotations

from collections.abc import Mapping

from .schema import Meta

__all__ = [
    "ALIGNMENT_DATA",
    "check_alignment_data",
    "data_record",
    "merge_origins",
    "read_origin",
]

# The rows the alignment is fitted on:
#   locked           the locked prompts through both models (the paper)
#   locked+unlocked  the locked and the unlocked prompts through both models (a prompt
#                    contrast only: a ceiling, not the paper's transfer)
#   corpus           the texts of a corpus (the same text for both models)
#   locked+corpus    the locked prompts, then the corpus
ALIGNMENT_DATA = ("locked", "locked+unlocked", "corpus", "locked+corpus")
_COUNTS = ("items", "locked", "unlocked", "corpus")


def check_alignment_data(choice: object) -> str:
    """``choice`` if it is one of :data:`ALIGNMENT_DATA`, else ValueError naming them."""
    if not isinstance(choice, str) or choice not in ALIGNMENT_DATA:
        raise ValueError(
            f"alignment_data must be one of {', '.join(ALIGNMENT_DATA)}; got {choice!r}"
        )
    return choice


def data_record(
    choice: str,
    *,
    locked: int = 0,
    unlocked: int = 0,
    corpus: int = 0,
    corpus_source: str | None = None,
    corpus_hash: str | None = None,
) -> dict[str, object]:
    """The ``origin["alignment_data"]`` object: the choice, the items of each kind (and
    their sum, ``items``), and for a corpus its source and hash."""
    out: dict[str, object] = {
        "choice": check_alignment_data(choice),
        "items": locked + unlocked + corpus,
        "locked": locked,
        "unlocked": unlocked,
        "corpus": corpus,
    }
    if corpus_source is not None:
        out.update(corpus_source=corpus_source, corpus_hash=corpus_hash)
    return out


def read_origin(meta: Meta, key: str = "origin") -> dict[str, object]:
    """The free-form ``origin`` object of an artifact (empty when absent), its
    ``alignment_data`` record checked entry by entry."""
    origin = meta.mapping(key)
    if "alignment_data" in origin:
        data = meta.section(key).section("alignment_data")
        data.string("choice", choices=ALIGNMENT_DATA)
        for name in _COUNTS:
            data.integer(name, lo=0)
        if "corpus_source" in data:
            data.string("corpus_source")
            data.string("corpus_hash")
    return origin


def merge_origins(a: Mapping[str, object], b: Mapping[str, object]) -> dict[str, object]:
    """The origin of statistics made by merging two: ``a``'s, with the item counts of the
    two ``alignment_data`` records summed. Different choices are refused, and so is one
    corpus merged with itself (its rows would count twice); two parts of a corpus give a
    record naming both ("A + B" and both hashes). When one side has no record, the merged
    statistics have none (their data is not known)."""
    out = dict(a)
    da, db = a.get("alignment_data"), b.get("alignment_data")
    if not isinstance(da, Mapping) or not isinstance(db, Mapping):
        out.pop("alignment_data", None)
        return out
    if da.get("choice") != db.get("choice"):
        raise ValueError(
            "these statistics were fitted on different alignment data and cannot be merged: "
            f"{_describe(da)} and {_describe(db)}"
        )
    merged = dict(da)
    sources = [(d.get("corpus_source"), d.get("corpus_hash")) for d in (da, db)]
    if sources[0][0] is not None and sources[0] == sources[1]:
        raise ValueError(f"both statistics hold the corpus {_describe(da)}: merging them would "
                         "count its rows twice")  # fmt: skip
    if sources[0][0] is not None and sources[1][0] is not None:
        names = dict.fromkeys(str(s) for s, _ in sources)
        merged["corpus_source"] = " + ".join(names)
        merged["corpus_hash"] = "+".join(str(h) for _, h in sources)
    for name in _COUNTS:
        x, y = da.get(name, 0), db.get(name, 0)
        merged[name] = (x if isinstance(x, int) else 0) + (y if isinstance(y, int) else 0)
    out["alignment_data"] = merged
    return out


def _describe(record: Mapping[str, object]) -> str:
    source = record.get("corpus_source")
    return f"{record.get('choice')}" + (
        f" ({source}, {record.get('corpus_hash')})" if source else ""
    )
