"""Evaluate a key with lm-evaluation-harness (the optional extra ``lm-eval``).

lm-eval's model ``unlock`` is its HF model with a key applied through ``steer()`` (the
paper's rule by default: a norm-preserving rotation at the last prompt token, in prefill
only), for every request type; see :mod:`unlock_fast.lm_eval.model` for what the positions
mean for each. From Python::

    from unlock_fast.lm_eval import evaluate
    run = evaluate("pretrained=smollm2-135m-instruct,key=keys/key,alpha=0.1",
                   ["gsm8k"], compare=True, limit=100)
    run.differences  # steered - unsteered, item by item, with a 95% CI

or, with lm-eval's own API, after ``register()``:
``lm_eval.simple_evaluate(model="unlock", model_args="pretrained=...,key=...")``.
The command line is ``unlock-fast lm-eval``. Importing this package does not import
lm-eval; the first use does (MissingDependency naming the extra when it is absent).
"""

from __future__ import annotations

from .compare import CI_METHOD, PairedDifference, format_differences, paired_differences
from .layout import last_context_index, split_forward
from .model import MODEL_NAME, SteeringArgs, UnlockSteering, model_class, steering_args
from .runner import LMEvalRun, evaluate, report, run_cli

__all__ = [
    "CI_METHOD",
    "MODEL_NAME",
    "LMEvalRun",
    "PairedDifference",
    "SteeringArgs",
    "UnlockSteering",
    "evaluate",
    "format_differences",
    "last_context_index",
    "model_class",
    "paired_differences",
    "register",
    "report",
    "run_cli",
    "split_forward",
    "steering_args",
]


def register() -> None:
    """Register the ``unlock`` model with lm-eval (idempotent), for ``lm_eval`` APIs that
    take a model name."""
    model_class()
