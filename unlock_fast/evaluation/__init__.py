"""Evaluation: is a transferred key better than chance, and by how much.

By concept, each module importing only those before it: :mod:`.grading`, :mod:`.problems`,
:mod:`.conditions` (generation, the four conditions), :mod:`.selection`
(held-out choices), :mod:`.null` and :mod:`.null_keys`, :mod:`.correspondence` and
:mod:`.evidence`, :mod:`.report`.
"""

from __future__ import annotations

from .conditions import CONDITIONS, EvaluationResult, Runner
from .grading import accuracy, extract_answer, grade, is_equivalent, paired_comparison
from .problems import Problem, generate_problems, load_dataset_spec, load_jsonl, problem_splits

__all__ = [
    "CONDITIONS", "EvaluationResult", "Problem", "Runner", "accuracy", "extract_answer",
    "generate_problems", "grade", "is_equivalent", "load_dataset_spec",
    "load_jsonl", "paired_comparison", "problem_splits"
]  # fmt: skip
