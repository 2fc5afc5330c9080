"""Layer correspondence and layer subsets: a planted shuffled pairing must be recovered, the
statistics must equal the alignment's own, and the subset rule must pick the good layers."""

from __future__ import annotations

import pytest
import torch
from tiny_models import PROMPTS, bpe_tokenizer, make_model, word_tokenizer

from unlock_fast import collect_alignment_stats, steer
from unlock_fast.artifacts import ModelInfo, SteeringKey
from unlock_fast.evaluation.correspondence import (
    CorrespondenceStats,
    collect_correspondence_stats,
    compare_layer_maps,
    select_layer_map,
    select_layer_subset,
)
from unlock_fast.evaluation.null_keys import null_contrast_directions

pytestmark = pytest.mark.usefixtures("one_thread")

LS, LT, DS, DT, Z = 5, 4, 16, 12, 4
PLANTED = {0: 3, 1: 0, 2: 4, 3: 1}  # target layer -> the source layer it is made from
SOURCE, TARGET = ModelInfo("src", "fs", DS, LS), ModelInfo("tgt", "ft", DT, LT)


def _mixing(seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    a = [torch.randn(Z, DS, generator=gen) for _ in range(LS)]
    b = [torch.randn(Z, DT, generator=gen) for _ in range(LT)]
    return a, b


def _synthetic(
    n: int, seed: int, pairs: list[tuple[int, int]] | None = None
) -> CorrespondenceStats:
    """Each Source layer s carries its own latent z_s; Target layer t reads z_PLANTED[t]."""
    a, b = _mixing(0)
    gen = torch.Generator().manual_seed(seed)
    pairs = pairs or [(s, t) for t in range(LT) for s in range(LS)]
    stats = CorrespondenceStats.empty(pairs, SOURCE, TARGET)
    for start in range(0, n, 16):
        m = min(16, n - start)
        z = [torch.randn(m, Z, generator=gen) for _ in range(LS)]
        x = {s: z[s] @ a[s] + 0.3 * torch.randn(m, DS, generator=gen) + 2.0 for s in range(LS)}
        y = {t: z[PLANTED[t]] @ b[t] + 0.3 * torch.randn(m, DT, generator=gen) for t in range(LT)}
        stats.update(x, y)
    return stats


@pytest.mark.parametrize("criterion", ["r2", "cka"])
def test_a_planted_shuffled_pairing_is_recovered(criterion: str) -> None:
    train, heldout = _synthetic(80, 1), _synthetic(60, 2)
    corr = select_layer_map(train, heldout, criterion=criterion, rank=Z)
    assert corr.layer_map == [(s, t) for t, s in sorted(PLANTED.items())]
    # proportional depth for 5 -> 4 layers: 0->0, 1->1, 2->2, 3->4
    assert corr.proportional == [(0, 0), (1, 1), (2, 2), (4, 3)]
    best = corr.score(PLANTED[0], 0)
    assert all(corr.score(s, 0) < best for s in range(LS) if s != PLANTED[0])


def test_the_chosen_map_beats_proportional_on_fresh_items() -> None:
    rank = Z + 1  # the uncentred map spends one rank on the Source mean
    train, heldout = _synthetic(80, 3), _synthetic(60, 4)
    corr = select_layer_map(train, heldout, rank=rank)
    test = _synthetic(60, 5, sorted(set(corr.layer_map) | set(corr.proportional)))
    r2 = compare_layer_maps(
        train, test, {"proportional": corr.proportional, "selected": corr.layer_map}, rank=rank
    )
    assert min(r2["selected"]) > 0.8
    assert max(r2["proportional"]) < 0.2
    # the same numbers through the alignment's own fit and diagnostics
    alignment = train.alignment_stats(corr.layer_map).fit(rank=rank)
    report = alignment.diagnose(test.alignment_stats(corr.layer_map))
    assert report.r2 == pytest.approx(r2["selected"], abs=1e-6)


def test_statistics_equal_the_alignments_own_on_a_model_pair() -> None:
    stok, ttok = bpe_tokenizer(), word_tokenizer()
    src, tgt = make_model("llama", len(stok)), make_model("qwen2", len(ttok), seed=1)
    prompts = PROMPTS[:10]
    ref = collect_alignment_stats(src, stok, tgt, ttok, prompts, batch_size=4, progress=False)
    mine = collect_correspondence_stats(
        src, stok, tgt, ttok, prompts, batch_size=4, progress=False, cross_dtype=torch.float64
    )
    assert len(mine.pairs) == 3 * 5
    for (s, t), m in zip(ref.layer_map, ref.moments, strict=True):
        got = mine.pair(s, t)
        for which in ("xx", "yy", "xy"):
            torch.testing.assert_close(
                got.gram(which, centered=True), m.gram(which, centered=True), rtol=1e-6, atol=1e-8
            )
    a = ref.fit(rank=4).diagnose(ref)
    b = (
        mine.alignment_stats(ref.layer_map)
        .fit(rank=4)
        .diagnose(mine.alignment_stats(ref.layer_map))
    )
    assert a.r2 == pytest.approx(b.r2, abs=1e-6)
    assert 0.0 <= mine.cka(0, 0) <= 1.0 + 1e-9


def test_null_contrast_directions_on_a_model() -> None:
    tok = bpe_tokenizer()
    model = make_model("llama", len(tok))
    locked, unlocked = PROMPTS[:6], [p + " Let's think." for p in PROMPTS[:6]]
    dirs = null_contrast_directions(model, tok, locked, unlocked, num=3, seed=1, progress=False)
    again = null_contrast_directions(
        model, tok, locked, unlocked, num=3, seed=1, batch_size=2, progress=False
    )
    assert len(dirs) == 3
    assert dirs[0].layers == [0, 1, 2]
    for x, y in zip(dirs, again, strict=True):
        torch.testing.assert_close(x.vectors, y.vectors, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(dirs[0].vectors, dirs[1].vectors)


def test_layer_subset_keeps_the_well_aligned_layers() -> None:
    layers = [0, 1, 2, 3, 4, 5]
    r2 = [0.9, 0.85, 0.05, 0.88, 0.1, 0.12]
    sub = select_layer_subset(layers, r2)
    assert sub.layers == [0, 1, 3]
    assert 0.12 < sub.threshold < 0.85
    assert select_layer_subset(layers, r2, threshold=0.86).layers == [0, 3]
    assert select_layer_subset(layers, r2, threshold=0.95, min_layers=2).layers == [0, 3]
    assert select_layer_subset(layers, [0.5] * 6).layers == layers  # nothing to split
    with pytest.raises(ValueError, match="equal in length"):
        select_layer_subset(layers, r2[:3])


def test_a_restricted_key_steers_like_steer_with_layers() -> None:
    tok = bpe_tokenizer()
    model = make_model("llama", len(tok))
    info = ModelInfo.of(model)
    key = SteeringKey(torch.randn(3, info.hidden_size), [0, 1, 2], info)
    enc = tok(PROMPTS[:2], return_tensors="pt", padding=True)
    with torch.no_grad():
        with steer(model, key, alpha=0.5, layers=[1, 2]):
            a = model(**enc).logits
        with steer(model, key.select([1, 2]), alpha=0.5):
            b = model(**enc).logits
        plain = model(**enc).logits
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, plain)
    with pytest.raises(ValueError, match="subset"):
        key.select([5])


def test_key_algebra() -> None:
    info = ModelInfo("m", "f", 4, 3)
    a = SteeringKey(torch.tensor([[3.0, 4, 0, 0], [0, 1, 0, 0]]), [0, 2], info, {"kind": "x"})
    b = SteeringKey(torch.tensor([[1.0, 0, 0, 0], [0, 0, 2, 0]]), [0, 2], info)
    torch.testing.assert_close((a + b).vectors, torch.tensor([[4.0, 4, 0, 0], [0, 1, 2, 0]]))
    torch.testing.assert_close((a - b).vectors, a.vectors - b.vectors)
    torch.testing.assert_close((2 * a).vectors, a.vectors * 2)
    torch.testing.assert_close((-a).vectors, -a.vectors)
    assert (a * 0.5).origin == {"kind": "x"}
    m = b.with_norms_of(a)  # b's directions, a's norms (5 and 1)
    torch.testing.assert_close(m.vectors, torch.tensor([[5.0, 0, 0, 0], [0, 0, 1, 0]]))
    sel = a.select([2])
    assert sel.layers == [2]
    assert sel.origin["layers_subset"] == [2]
    torch.testing.assert_close(sel.vectors, a.vectors[1:])
    r1, r2 = SteeringKey.random_like(a, seed=3), SteeringKey.random_like(a, seed=3)
    assert torch.equal(r1.vectors, r2.vectors)
    torch.testing.assert_close(r1.vectors.norm(dim=1), a.vectors.norm(dim=1))
    assert r1.origin == {"kind": "random_control", "seed": 3, "like": {"kind": "x"}}
    other = SteeringKey(torch.ones(1, 4), [0], info)
    with pytest.raises(ValueError, match="differ in model or layers"):
        a + other  # noqa: B018
    with pytest.raises(TypeError, match="factor"):
        a.scale("2")  # type: ignore[arg-type]
