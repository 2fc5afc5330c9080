"""bench/sweep_alignment_data.py on tiny random models: the structure and row counts of its
result, and the check that compares merged statistics with a one-pass collection."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from tiny_models import PROMPTS, SENTENCES, bpe_tokenizer, make_model, word_tokenizer

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def sweep_module():
    sys.path.insert(0, str(BENCH))
    try:
        path = BENCH / "sweep_alignment_data.py"
        spec = importlib.util.spec_from_file_location("sweep_alignment_data", path)
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up while defined
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def pair():
    stok, ttok = word_tokenizer("right"), bpe_tokenizer("left")
    return (make_model("llama", len(stok)), stok), (make_model("qwen2", len(ttok), seed=1), ttok)


def _behaviour(module, name: str, offset: int):
    locked = PROMPTS[offset : offset + 4]
    unlocked = [p + " Answer: Let's think step by step." for p in locked]
    held = PROMPTS[8:11]
    return module.Behaviour(name, locked, unlocked, locked, unlocked, held, held)


CORPUS = [f"{s} {w}" for w in ("one", "two", "the cat") for s in SENTENCES][:12]


@pytest.fixture(scope="module")
def result(sweep_module, pair):
    behaviours = [_behaviour(sweep_module, "a", 0), _behaviour(sweep_module, "b", 4)]
    return sweep_module.sweep(
        *pair, behaviours, CORPUS, sizes=[5, 12], ranks=[2, 8], num_random=20, batch_size=8,
        log=lambda _: None,
    )  # fmt: skip


def test_rows_and_counts(result):
    rows = result["rows"]
    got = {(r["behaviour"], r["data"], r["N"], r["rank"]) for r in rows}
    want = {(b, "locked", 4, 2) for b in "ab"} | {(b, "corpus", 5, 2) for b in "ab"}
    want |= {(b, d, n, r) for b in "ab" for d, n in (("locked+unlocked", 8), ("corpus", 12))
             for r in (2, 8)}  # fmt: skip
    assert got == want
    assert len(rows) == len(want)
    assert result["references"] == {b: {"locked": 4, "locked+unlocked": 8} for b in "ab"}
    assert result["cut"] == []
    assert set(result["corpus_seconds"]) == {"5", "12"}
    # The key's rank is capped by the rows and the hidden sizes (llama 32, qwen2 48).
    assert {(r["N"], r["rank"], r["k"]) for r in rows if r["data"] == "corpus"} == {
        (5, 2, 2), (12, 2, 2), (12, 8, 8)
    }  # fmt: skip
    for r in rows:
        assert r["num_layers"] == len(r["cosine"]) == len(r["layers"]) == len(r["heldout_r2"])
        assert 0 <= r["num_above"] <= r["num_layers"]
        assert 1 / 21 <= r["max_p"] <= 1
        assert 1 / 21 <= r["p_mean"] <= 1
        lo, hi = r["random_mean_band"]
        assert -1 <= lo <= hi <= 1
        assert abs(r["mean_cos"] - sum(r["cosine"]) / len(r["cosine"])) < 1e-12
    json.dumps(result)  # every number is plain JSON


def test_merged_statistics_match_one_pass(result):
    check = result["check"]
    assert check["N"] == 12
    assert check["max_gram_rel_diff"] < 1e-5
    assert set(check["min_key_cosine"]) == {"2", "8"}
    assert min(check["min_key_cosine"].values()) > 1 - 1e-4


def test_a_size_past_the_budget_is_cut(sweep_module, pair):
    out = sweep_module.sweep(
        *pair, [_behaviour(sweep_module, "a", 0)], CORPUS, sizes=[3, 12], ranks=[2],
        num_random=5, batch_size=8, budget_s=1e-3, log=lambda _: None,
    )  # fmt: skip
    # The first size sets the rate; the second would pass the budget.
    assert out["cut"] == [12]
    assert {r["N"] for r in out["rows"] if r["data"] == "corpus"} == {3}
    assert out["check"] is None


def test_compare_fits_refuses_other_rows(sweep_module, pair):
    import unlock_fast as uf

    models = (*pair[0], *pair[1])
    kw = dict(batch_size=4, progress=False)
    a = uf.collect_alignment_stats(*models, CORPUS[:6], **kw)
    b = uf.collect_alignment_stats(*models, CORPUS[6:12], **kw)
    d = uf.extract_direction(*pair[0], PROMPTS[:4], PROMPTS[4:8], **kw)
    with pytest.raises(RuntimeError, match="differ from a one-pass collection"):
        sweep_module.compare_fits(a, b, [2], d)


def test_plot_writes_a_png(sweep_module, result, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "sweep.png"
    sweep_module.plot(result, path)
    assert path.read_bytes()[:4] == b"\x89PNG"
