"""Features behind an extra name that extra when its package is missing."""

from __future__ import annotations

import sys

import pytest

from unlock_fast._optional import MissingDependency, require
from unlock_fast.demo.plots import plot_accuracy_vs_alpha
from unlock_fast.evaluation.grading import is_equivalent


def test_require_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "not_a_module_here", None)
    with pytest.raises(MissingDependency, match=r"pip install 'unlock-fast\[gguf\]'"):
        require("not_a_module_here", "gguf", "Loading GGUF files")
    assert require("json", "x", "y").dumps([1]) == "[1]"


def test_plots_name_the_plots_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    curves = {"baseline": [(0.0, 0.5, 0.4, 0.6)]}
    with pytest.raises(MissingDependency, match=r"unlock-fast\[plots\]"):
        plot_accuracy_vs_alpha(curves, tmp_path / "a.png")
    assert not (tmp_path / "a.png").exists()


def test_latex_grading_names_the_eval_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)
    assert is_equivalent("42", "42.0")  # numbers need no extra
    with pytest.raises(MissingDependency, match=r"unlock-fast\[eval\]"):
        is_equivalent(r"\sqrt{2}", r"2^{1/2}")
