"""Evaluation harness: items, prompts, grading, metrics, the four conditions, grid, report.

The data flows: problems (:mod:`.datasets`, :mod:`.problems`) -> prompts (:mod:`.prompts`)
-> generation under each condition (:mod:`.runner`) -> grading (:mod:`.grading`) ->
metrics (:mod:`.metrics`) -> report (:mod:`.report`). :mod:`.experiment` builds the key and
its representational evidence; :mod:`.grid` selects settings on a held-out split.

The evidence against chance: :mod:`.null_keys` (random keys and sign-flip null-contrast
keys through the same alignment), :mod:`.null` (permutation p-values, bands, layer counts,
max-statistic), :mod:`.behaviour` and :mod:`.evidence` (the key within those nulls, per
measure and per layer), :mod:`.correspondence` (layer pairing by held-out R² or linear CKA),
:mod:`.layer_subset` (steer only the well-aligned layers), :mod:`.alphas` (the held-out alpha
sweep) and :mod:`.null_report` (their tables and plots).
"""

from __future__ import annotations

from .datasets import Problem, load_dataset_spec, load_jsonl
from .grading import extract_answer, grade, is_equivalent, shows_steps
from .metrics import Accuracy, PairedComparison, accuracy, paired_comparison, wilson_interval
from .problems import generate_problems, problem_splits
from .prompts import format_prompt, format_prompts

__all__ = [
    "Accuracy",
    "PairedComparison",
    "Problem",
    "accuracy",
    "extract_answer",
    "format_prompt",
    "format_prompts",
    "generate_problems",
    "grade",
    "is_equivalent",
    "load_dataset_spec",
    "load_jsonl",
    "paired_comparison",
    "problem_splits",
    "shows_steps",
    "wilson_interval",
]
