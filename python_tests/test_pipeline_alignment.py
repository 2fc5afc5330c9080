"""The streaming Gram estimator against the paper's per-sample formula, in float64."""

from __future__ import annotations

import pytest
import test_numerics as numerics
import torch
from test_numerics import per_sample_map
from tiny_models import PROMPTS, bpe_tokenizer, make_model, word_tokenizer

from unlock_fast import (
    AlignmentStats,
    collect_alignment_stats,
    extract_direction,
    fit_alignment,
)
from unlock_fast.alignment import proportional_layer_map
from unlock_fast.capture import iter_activations

pytestmark = pytest.mark.usefixtures("one_thread")


def activations(n: int, d: int, seed: int, mean: float = 3.0, draw: int = 0) -> torch.Tensor:
    """Rows with a decaying spectrum and a large mean, like residual-stream activations.

    ``seed`` fixes the distribution, ``draw`` the sample.
    """
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    mu = mean * torch.randn(d, generator=g, dtype=torch.float64)
    scale = 0.8 ** torch.arange(d, dtype=torch.float64)
    g.manual_seed(seed * 1000 + draw + 1)
    z = torch.randn(n, d, generator=g, dtype=torch.float64) * scale
    return (z @ basis.T + mu).float()


def paired_data(n: int, ds: int, dt: int, seed: int = 0, draw: int = 0):
    hs = activations(n, ds, seed, draw=draw)
    g = torch.Generator().manual_seed(seed + 100)
    w = torch.randn(ds, dt, generator=g) / ds**0.5
    ht = hs @ w + 0.05 * activations(n, dt, seed + 1, mean=1.0, draw=draw)
    return hs, ht


def stats_from(hs: torch.Tensor, ht: torch.Tensor, batches: int = 1) -> AlignmentStats:
    return numerics.stats_from(hs, ht, torch.float32, batches)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.filterwarnings("ignore::unlock_fast.estimator.RankClampedWarning")
@pytest.mark.parametrize(
    ("n", "rank", "batches"),
    [(12, 64, 1), (12, 5, 1), (200, 8, 1), (200, 8, 13), (300, 32, 7), (2, 4, 1)],
)
@pytest.mark.parametrize("centered", [False, True])
def test_streaming_gram_equals_per_sample_formula(n, rank, batches, centered):
    ds, dt = 24, 40
    hs, ht = paired_data(n, ds, dt)
    alignment = stats_from(hs, ht, batches).fit(rank=rank, centered=centered)
    want = per_sample_map(hs, ht, rank, centered)
    assert alignment.k == min(rank, n, ds)
    assert rel(alignment.matrix(0), want) < 1e-3
    # the factored map applies like the dense one
    x = hs[:5]
    pred = x.double() @ want
    if centered:
        pred = pred + ht.double().mean(0) - hs.double().mean(0) @ want
    assert rel(alignment.map(x, 0), pred) < 1e-3


@pytest.mark.filterwarnings("ignore::unlock_fast.estimator.RankClampedWarning")
def test_single_row():
    hs, ht = paired_data(1, 24, 40)
    a = stats_from(hs, ht).fit(rank=4)
    assert a.k == 1
    assert rel(a.matrix(0), per_sample_map(hs, ht, 4)) < 1e-5
    torch.testing.assert_close(a.map(hs, 0), ht, atol=1e-4, rtol=1e-4)


def test_fit_ranks_share_one_decomposition():
    hs, ht = paired_data(150, 24, 40)
    stats = stats_from(hs, ht, 4)
    many = stats.fit_ranks([2, 8, 16])
    for r, a in many.items():
        assert a.rank == r
        assert a.k == r
        assert rel(a.matrix(0), per_sample_map(hs, ht, r)) < 2e-4
        assert rel(a.matrix(0), stats.fit(rank=r).matrix(0)) < 1e-5


def test_ridge_shrinks_toward_zero():
    hs, ht = paired_data(60, 24, 40)
    stats = stats_from(hs, ht)
    plain = stats.fit(rank=16).matrix(0)
    lam = stats.moments[0].gram("xx")
    small = stats.fit(rank=16, ridge=1e-9).matrix(0)
    big = stats.fit(rank=16, ridge=float(torch.linalg.eigvalsh(lam)[-1])).matrix(0)
    assert rel(small, plain) < 1e-5
    assert big.norm() < 0.7 * plain.norm()


def test_diagnose_matches_explicit_residuals():
    hs, ht = paired_data(120, 24, 40, seed=0)
    hs2, ht2 = paired_data(50, 24, 40, seed=0, draw=1)
    heldout = stats_from(hs2, ht2, 3)
    for centered in (False, True):
        a = stats_from(hs, ht).fit(rank=10, centered=centered)
        report = a.diagnose(heldout)
        pred = a.map(hs2, 0).double()
        resid = ht2.double() - pred
        err = float(resid.norm() / ht2.double().norm())
        r2 = 1 - float(resid.pow(2).sum() / (ht2.double() - ht2.double().mean(0)).pow(2).sum())
        assert report.rel_error[0] == pytest.approx(err, rel=1e-3)
        assert report.r2[0] == pytest.approx(r2, abs=1e-3)
        assert 0 < report.rel_error[0] < 0.5
        assert report.r2[0] > 0.5
        assert "R2" in str(report)
        assert report.to_dict()["rank"] == 10


def test_merge_equals_single_pass():
    hs, ht = paired_data(90, 24, 40)
    whole = stats_from(hs, ht)
    a, b = stats_from(hs[:31], ht[:31]), stats_from(hs[31:], ht[31:], 3)
    merged = a.merge(b)
    assert merged.num_rows == 90
    assert merged.num_prompts == 90
    assert rel(merged.fit(rank=8).matrix(0), whole.fit(rank=8).matrix(0)) < 1e-5
    other = stats_from(hs, ht)
    other.layer_map = [(0, 1)]
    with pytest.raises(ValueError, match="cannot be merged"):
        a.merge(other)


def test_fit_rejects_bad_arguments():
    stats = stats_from(*paired_data(20, 8, 8))
    with pytest.raises(ValueError, match="rank"):
        stats.fit(rank=0)
    with pytest.raises(ValueError, match="ridge"):
        stats.fit(rank=2, ridge=-1.0)


def test_proportional_layer_map():
    assert proportional_layer_map(3, 5) == [(0, 0), (0, 1), (1, 2), (1, 3), (2, 4)]
    assert proportional_layer_map(5, 3) == [(0, 0), (2, 1), (4, 2)]
    assert proportional_layer_map(4, 1) == [(3, 0)]
    assert [s for s, _ in proportional_layer_map(28, 36)][-1] == 27


# -- on models -----------------------------------------------------------------------------


def _rows(model, tok, prompts, layers, token_level=False):
    out = {layer: [] for layer in layers}
    order = []
    for b in iter_activations(
        model, tok, prompts, layers, token_level=token_level, batch_size=len(prompts)
    ):
        order += b.indices
        for layer in layers:
            out[layer].append(b.rows[layer])
    return {k: torch.cat(v) for k, v in out.items()}, order


def test_collect_on_models_with_different_tokenizers_and_shapes():
    stok, ttok = word_tokenizer("right"), bpe_tokenizer("left")
    src, tgt = make_model("llama", len(stok)), make_model("qwen2", len(ttok), seed=1)
    stats = collect_alignment_stats(src, stok, tgt, ttok, PROMPTS, batch_size=5, progress=False)
    assert stats.layer_map == proportional_layer_map(3, 5)
    assert stats.num_rows == len(PROMPTS) == stats.num_prompts
    xs, xo = _rows(src, stok, PROMPTS, [0, 1, 2])
    ys, yo = _rows(tgt, ttok, PROMPTS, list(range(5)))
    xs = {k: v[torch.argsort(torch.tensor(xo))] for k, v in xs.items()}
    ys = {k: v[torch.argsort(torch.tensor(yo))] for k, v in ys.items()}
    a = stats.fit(rank=6)
    for s, t in stats.layer_map:
        assert rel(a.matrix(t), per_sample_map(xs[s], ys[t], 6)) < 1e-3
    # the one-call form gives the same map
    b = fit_alignment(src, stok, tgt, ttok, PROMPTS, rank=6, batch_size=4, progress=False)
    assert rel(b.matrix(4), a.matrix(4)) < 1e-4


def test_token_level_pairs_every_token():
    tok = word_tokenizer("left")
    src, tgt = make_model("gemma3", len(tok)), make_model("gpt_neox", len(tok), seed=2)
    stats = collect_alignment_stats(
        src,
        tok,
        tgt,
        word_tokenizer("right"),
        PROMPTS[:6],
        token_level=True,
        layer_map={2: 3},
        progress=False,
    )
    n_tokens = sum(len(tok(p)["input_ids"]) for p in PROMPTS[:6])
    assert stats.layer_map == [(3, 2)]
    assert stats.num_rows == n_tokens
    xs, _ = _rows(src, tok, PROMPTS[:6], [3], token_level=True)
    ys, _ = _rows(tgt, tok, PROMPTS[:6], [2], token_level=True)
    assert rel(stats.fit(rank=8).matrix(2), per_sample_map(xs[3], ys[2], 8)) < 1e-3
    with pytest.raises(ValueError, match="share one tokenizer"):
        collect_alignment_stats(
            src, tok, tgt, bpe_tokenizer(), PROMPTS[:3], token_level=True, progress=False
        )


def test_collect_rejects_bad_layer_maps():
    tok = word_tokenizer()
    src, tgt = make_model("llama", len(tok)), make_model("gpt2", len(tok))
    with pytest.raises(ValueError, match="out of range"):
        collect_alignment_stats(src, tok, tgt, tok, PROMPTS[:2], layer_map=[(5, 0)], progress=False)
    with pytest.raises(ValueError, match="once"):
        collect_alignment_stats(
            src, tok, tgt, tok, PROMPTS[:2], layer_map=[(0, 1), (1, 1)], progress=False
        )
    with pytest.raises(ValueError, match="pair with prompts"):
        collect_alignment_stats(
            src, tok, tgt, tok, PROMPTS[:2], target_prompts=PROMPTS[:3], progress=False
        )


def test_transfer_maps_each_source_vector():
    stok, ttok = word_tokenizer(), bpe_tokenizer()
    src, tgt = make_model("llama", len(stok)), make_model("qwen2", len(ttok), seed=1)
    a = fit_alignment(src, stok, tgt, ttok, PROMPTS, rank=4, progress=False)
    d = extract_direction(
        src,
        stok,
        PROMPTS,
        [p + " Answer: Let's think step by step." for p in PROMPTS],
        progress=False,
    )
    key = a.transfer(d)
    assert key.layers == list(range(5))
    assert key.vectors.shape == (5, 48)
    for s, t in a.layer_map:
        torch.testing.assert_close(key.vector(t), d.vector(s) @ a.matrix(t), atol=1e-5, rtol=1e-4)
    assert key.origin["rank"] == 4
    assert key.model.hidden_size == 48
    other = extract_direction(tgt, ttok, PROMPTS[:3], PROMPTS[3:6], progress=False)
    with pytest.raises(ValueError, match="hidden size"):
        a.transfer(other)
    partial = extract_direction(src, stok, PROMPTS[:3], PROMPTS[3:6], layers=[0], progress=False)
    with pytest.raises(ValueError, match="lacks source layers"):
        a.transfer(partial)
