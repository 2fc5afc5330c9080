"""Evaluation items from local JSONL files, the Hugging Face hub, or the built-in generator.

JSONL field conventions understood (``format="auto"`` detects them from the first row):

- GSM8K: ``question``, ``answer`` = worked solution ending in ``#### 42``;
- MATH: ``problem``, ``solution`` with a final ``\\boxed{...}`` (or an ``answer`` field);
- SVAMP: ``Body``, ``Question``, ``Answer`` (a float such as ``8.0``);
- generic: ``question``/``problem``/``input`` and ``answer``/``target``/``output``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .grading import last_boxed
from .problem import Problem
from .problems import generate_problems

__all__ = [
    "Problem",
    "HUB_DATASETS",
    "DatasetError",
    "from_record",
    "load_dataset_spec",
    "load_hub",
    "load_jsonl",
    "save_jsonl",
]


class DatasetError(ValueError):
    """A dataset that cannot be read or understood."""


def _clean_number(text: str) -> str:
    t = text.strip().replace(",", "").rstrip(".")
    try:
        f = float(t)
    except ValueError:
        return text.strip()
    return str(int(f)) if f.is_integer() else t


def _detect(row: dict[str, Any]) -> str:
    if "Body" in row and "Question" in row and "Answer" in row:
        return "svamp"
    if "problem" in row and ("solution" in row or "answer" in row):
        return "math"
    if "question" in row and isinstance(row.get("answer"), str) and "####" in row["answer"]:
        return "gsm8k"
    return "generic"


_Q_KEYS = ("question", "problem", "input", "prompt")
_A_KEYS = ("answer", "target", "output", "final_answer")


def from_record(row: dict[str, Any], *, format: str = "auto", index: int = 0) -> Problem:
    """Turn one JSON record into a :class:`Problem` (see the module doc for formats)."""
    if not isinstance(row, dict):
        raise DatasetError(f"record {index} must be a JSON object, got {type(row).__name__}")
    fmt = _detect(row) if format == "auto" else format
    rid = str(row.get("id", row.get("ID", row.get("unique_id", index))))
    if fmt == "gsm8k":
        text = str(row["answer"])
        sol, _, final = text.rpartition("####")
        return Problem(
            rid, str(row["question"]), _clean_number(final), sol.strip() or None, "gsm8k"
        )
    if fmt == "math":
        solution = row.get("solution")
        ans = None if row.get("answer") is None else str(row["answer"])
        if ans is None and solution is not None:
            ans = last_boxed(str(solution))
        if ans is None:
            raise DatasetError(
                f"MATH record {index} has no answer field and no \\boxed{{}} solution"
            )
        return Problem(rid, str(row["problem"]), str(ans).strip(), solution, "math")
    if fmt == "svamp":
        body, q = str(row["Body"]).strip(), str(row["Question"]).strip()
        question = f"{body} {q}" if body else q
        return Problem(
            rid, question, _clean_number(str(row["Answer"])), row.get("Equation"), "svamp"
        )
    if fmt == "generic":
        qk = next((k for k in _Q_KEYS if k in row), None)
        ak = next((k for k in _A_KEYS if k in row), None)
        if qk is None or ak is None:
            raise DatasetError(
                f"record {index} needs a question field ({'/'.join(_Q_KEYS)}) and an answer "
                f"field ({'/'.join(_A_KEYS)}); it has {sorted(row)}"
            )
        return Problem(rid, str(row[qk]), _clean_number(str(row[ak])), row.get("solution"), "jsonl")
    raise DatasetError(f"format must be auto, gsm8k, math, svamp or generic, got {format!r}")


def load_jsonl(
    path: str | os.PathLike[str], *, format: str = "auto", limit: int | None = None
) -> list[Problem]:
    """Read problems from a JSONL file (one JSON object per line; blank lines skipped)."""
    p = Path(path)
    if not p.is_file():
        raise DatasetError(f"dataset file not found: {p}")
    out: list[Problem] = []
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{p}:{lineno}: not valid JSON ({e.msg})") from None
            try:
                out.append(from_record(row, format=format, index=len(out)))
            except KeyError as e:
                raise DatasetError(f"{p}:{lineno}: missing field {e}") from None
            if limit is not None and len(out) >= limit:
                break
    if not out:
        raise DatasetError(f"{p} holds no records")
    return out


def save_jsonl(problems: Iterable[Problem], path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", encoding="utf-8") as f:
        for item in problems:
            f.write(json.dumps(item.to_dict(), ensure_ascii=False) + "\n")
    return p


# name -> (hub repo, config, default split, format)
HUB_DATASETS: dict[str, tuple[str, str | None, str, str]] = {
    "gsm8k": ("openai/gsm8k", "main", "test", "gsm8k"),
    "math500": ("HuggingFaceH4/MATH-500", None, "test", "math"),
    "svamp": ("ChilleD/SVAMP", None, "test", "svamp"),
}


def load_hub(name: str, *, split: str | None = None, limit: int | None = None) -> list[Problem]:
    """Load a known benchmark (``gsm8k``, ``math500``, ``svamp``) or any ``owner/name`` hub
    dataset through the ``datasets`` library; needs it installed and the hub reachable."""
    try:
        import datasets
    except ImportError:
        raise DatasetError(
            f"loading {name!r} from the hub needs the datasets package (pip install datasets); "
            "offline, pass a local .jsonl file or 'builtin'"
        ) from None
    repo, config, default_split, fmt = HUB_DATASETS.get(name.lower(), (name, None, "test", "auto"))
    try:
        ds = datasets.load_dataset(repo, config, split=split or default_split)
    except Exception as e:  # network, auth, missing split: one message for the user
        raise DatasetError(
            f"could not load {repo!r} from the hub: {type(e).__name__}: {e}"
        ) from None
    out = []
    for i, row in enumerate(ds):
        out.append(from_record(dict(row), format=fmt, index=i))
        if limit is not None and len(out) >= limit:
            break
    return out


def load_dataset_spec(
    spec: str, *, limit: int | None = None, seed: int = 0, split: str | None = None
) -> list[Problem]:
    """Problems from a user's ``--dataset`` argument.

    ``builtin`` (generated word problems, ``limit`` of them, default 100), a path to a
    ``.jsonl`` file, or a hub dataset name.
    """
    if spec in ("builtin", "arith", "arithmetic"):
        return generate_problems(100 if limit is None else limit, seed=seed)
    if spec.endswith((".jsonl", ".json")) or Path(spec).exists():
        return load_jsonl(spec, limit=limit)
    return load_hub(spec, split=split, limit=limit)
