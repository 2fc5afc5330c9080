"""One evaluation item: the type every dataset reader and generator returns."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["Problem"]


@dataclass(frozen=True)
class Problem:
    """One evaluation item. ``answer`` is the reference final answer as text (a number, or
    LaTeX for MATH); ``solution`` a worked solution when the source has one."""

    id: str
    question: str
    answer: str
    solution: str | None = None
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
