"""The null tests: exact formulas, a planted effect that must be found, and nulls that must
not reject more often than their nominal rate over many seeds."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tiny_models import make_model, save_pair, word_tokenizer

from unlock_fast.artifacts import Alignment, AlignmentReport, Direction, ModelInfo, SteeringKey
from unlock_fast.cli import main
from unlock_fast.demo import QUICK, run_demo
from unlock_fast.demo.plots import key_cosines
from unlock_fast.evaluation.conditions import ConditionResult, ItemResult
from unlock_fast.evaluation.null import (
    behavioural_null,
    binomial_tail,
    holm,
    layer_test,
    metric_values,
    permutation_p_value,
    prediction_p_value,
    spread,
    student_t_sf,
)
from unlock_fast.evaluation.null_keys import (
    SignFlipAccumulator,
    cosines,
    null_contrast_keys,
    random_cosines,
    random_keys,
    representational_null,
)
from unlock_fast.evaluation.selection import choose_alpha, choose_rank

pytestmark = pytest.mark.usefixtures("one_thread")

SEEDS = 200
ALPHA = 0.05
# Rejection rate allowed for a valid level-0.05 test over SEEDS seeds: nominal + 3 SE.
MAX_RATE = ALPHA + 3 * math.sqrt(ALPHA * (1 - ALPHA) / SEEDS)


# -- exact formulas ----------------------------------------------------------------------


def test_permutation_p_value_formula() -> None:
    assert permutation_p_value(3.0, [1, 2, 3, 4, 5]) == pytest.approx(4 / 6)  # ties count
    assert permutation_p_value(9.0, [1, 2, 3]) == pytest.approx(1 / 4)
    assert permutation_p_value(0.0, [1, 2, 3]) == pytest.approx(1.0)
    assert permutation_p_value(1.0, []) == 1.0
    assert permutation_p_value(0.5, torch.tensor([0.1, 0.9])) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="finite"):
        permutation_p_value(float("nan"), [1.0])
    with pytest.raises(TypeError, match="sequence"):
        permutation_p_value(1.0, 3.0)  # type: ignore[arg-type]


def test_binomial_tail_matches_the_sum() -> None:
    # P(X >= 2) for Bin(18, 0.025) = 1 - P(0) - P(1)
    want = 1 - 0.975**18 - 18 * 0.025 * 0.975**17
    assert binomial_tail(2, 18, 0.025) == pytest.approx(want, rel=1e-12)
    assert binomial_tail(0, 5, 0.3) == 1.0
    assert binomial_tail(6, 5, 0.3) == 0.0
    assert binomial_tail(5, 5, 0.5) == pytest.approx(1 / 32)
    for k in range(0, 8):
        brute = sum(math.comb(7, i) * 0.2**i * 0.8 ** (7 - i) for i in range(k, 8))
        assert binomial_tail(k, 7, 0.2) == pytest.approx(brute, rel=1e-12)
    with pytest.raises(ValueError, match="p must be"):
        binomial_tail(1, 3, 1.5)


def test_student_t_tail_matches_tables() -> None:
    assert student_t_sf(2.262157, 9) == pytest.approx(0.025, abs=1e-6)
    assert student_t_sf(1.833113, 9) == pytest.approx(0.05, abs=1e-6)
    assert student_t_sf(1.0, 1) == pytest.approx(0.25, abs=1e-12)  # Cauchy
    assert student_t_sf(-1.0, 1) == pytest.approx(0.75, abs=1e-12)
    assert student_t_sf(1.959964, 1e7) == pytest.approx(0.025, abs=1e-6)  # the normal limit


def test_prediction_p_value_formula_and_level() -> None:
    null = [0.2, 0.3, 0.25, 0.35, 0.3]
    m, sd = 0.28, math.sqrt(sum((v - 0.28) ** 2 for v in null) / 4)
    want = student_t_sf((0.5 - m) / (sd * math.sqrt(1 + 1 / 5)), 4)
    assert prediction_p_value(0.5, null) == pytest.approx(want)
    assert math.isnan(prediction_p_value(0.5, [0.1]))
    assert prediction_p_value(0.1, [0.2, 0.2]) == 1.0
    gen = torch.Generator().manual_seed(13)
    rejected = 0
    for _ in range(SEEDS):
        draws = torch.randn(11, generator=gen)  # the key and 10 null keys, normal
        rejected += prediction_p_value(float(draws[0]), draws[1:]) <= ALPHA
    assert rejected / SEEDS <= MAX_RATE
    # a key 5 null standard deviations up: below the permutation floor of 1/11
    assert prediction_p_value(5.0, torch.randn(10, generator=gen)) < 0.01


def test_spread_and_holm() -> None:
    s = spread([4.0, 1.0, 3.0, 2.0, 5.0])
    assert (s.n, s.min, s.median, s.max, s.mean) == (5, 1.0, 3.0, 5.0, 3.0)
    assert s.q25 == pytest.approx(2.0)
    adj = holm({"a": 0.01, "b": 0.04, "c": 0.03})
    assert adj == pytest.approx({"a": 0.03, "b": 0.06, "c": 0.06})
    with pytest.raises(ValueError, match="at least one"):
        spread([])


def test_layer_test_counts_and_family_wise_p() -> None:
    gen = torch.Generator().manual_seed(0)
    null = torch.randn(99, 6, generator=gen)
    planted = null.mean(0) + 6 * null.std(0)
    res = layer_test(planted, null, layers=[10, 11, 12, 13, 14, 15], level=0.975)
    assert res.above == [10, 11, 12, 13, 14, 15]
    assert res.p_values == pytest.approx([0.01] * 6)
    assert res.max_p == pytest.approx(0.01)
    assert res.expected == pytest.approx(6 * 0.025)
    assert res.binomial_p == pytest.approx(0.025**6)
    assert "6/6 layers" in res.summary()
    low = layer_test(null.mean(0) - 6 * null.std(0), null)
    assert low.above == []
    assert low.max_p == pytest.approx(1.0)
    assert low.binomial_p == 1.0
    with pytest.raises(ValueError, match=r"null must be \[n >= 1, 6\]"):
        layer_test(planted, null[:, :3])


# -- nulls hold their level over seeds -----------------------------------------------------


def test_permutation_p_value_holds_its_level_on_exchangeable_draws() -> None:
    gen = torch.Generator().manual_seed(1)
    rejected = 0
    for _ in range(SEEDS):
        # 48 Bernoulli(0.3) items per condition: the key and 19 null keys alike
        rates = (torch.rand(20, 48, generator=gen) < 0.3).double().mean(1)
        rejected += permutation_p_value(float(rates[0]), rates[1:]) <= ALPHA
    assert rejected / SEEDS <= MAX_RATE


def test_layer_test_holds_its_level_on_pure_noise() -> None:
    gen = torch.Generator().manual_seed(2)
    by_max = by_binomial = 0
    for _ in range(SEEDS):
        draws = torch.randn(40, 10, generator=gen)  # independent layers; row 0 is "the key"
        res = layer_test(draws[0], draws[1:], level=0.95)
        by_max += res.max_p <= ALPHA
        by_binomial += res.binomial_p <= ALPHA
    assert by_max / SEEDS <= MAX_RATE
    assert by_binomial / SEEDS <= MAX_RATE


# -- synthetic alignment: random band and null-contrast keys ------------------------------

DS, DT, K, LS, LT = 24, 20, 8, 4, 5
SOURCE, TARGET = ModelInfo("src", "fs", DS, LS), ModelInfo("tgt", "ft", DT, LT)


def _alignment(seed: int) -> Alignment:
    gen = torch.Generator().manual_seed(seed)
    es = torch.linalg.qr(torch.randn(LT, DS, K, generator=gen))[0]
    et = torch.linalg.qr(torch.randn(LT, DT, K, generator=gen))[0]
    return Alignment(
        layer_map=[(min(t, LS - 1), t) for t in range(LT)],
        source_basis=es,
        core=torch.randn(LT, K, K, generator=gen),
        target_basis=et,
        eigenvalues=torch.ones(LT, K, dtype=torch.float64),
        source=SOURCE,
        target=TARGET,
        rank=K,
        num_rows=50,
    )


def _direction(vectors: torch.Tensor, info: ModelInfo) -> Direction:
    return Direction(vectors, list(range(info.num_layers)), "mean", 10, info)


def rademacher(num: int, n: int, seed: int) -> torch.Tensor:
    return SignFlipAccumulator([0], 1, num, n, seed).signs


def test_null_contrast_keys_are_transferred_directions_with_the_keys_norms() -> None:
    al = _alignment(0)
    v = torch.randn(3, LS, DS, generator=torch.Generator().manual_seed(1))
    like = SteeringKey(torch.randn(LT, DT), list(range(LT)), TARGET, {"kind": "transfer"})
    keys = null_contrast_keys(al, [_direction(v[j], SOURCE) for j in range(3)], like)
    for j, key in enumerate(keys):
        one = al.transfer(_direction(v[j], SOURCE)).vectors
        torch.testing.assert_close(key.vectors / key.vectors.norm(dim=1, keepdim=True),
                                   one / one.norm(dim=1, keepdim=True))  # fmt: skip
        torch.testing.assert_close(key.vectors.norm(dim=1), like.vectors.norm(dim=1))
        assert key.origin == {"kind": "null_contrast", "index": j, "like": {"kind": "transfer"}}
        for s, t in al.layer_map:  # one map for directions, whether one or many at once
            torch.testing.assert_close(al.map_directions(v[:, s], t)[j], one[t])


def test_planted_direction_beats_both_bands() -> None:
    al = _alignment(3)
    gen = torch.Generator().manual_seed(4)
    key = al.transfer(_direction(torch.randn(LS, DS, generator=gen), SOURCE))
    own = _direction(key.vectors + 0.3 * key.vectors.norm(dim=1, keepdim=True) / math.sqrt(DT)
                     * torch.randn(LT, DT, generator=gen), TARGET)  # fmt: skip
    contrast = null_contrast_keys(
        al, [_direction(torch.randn(LS, DS, generator=gen), SOURCE) for _ in range(60)], key
    )
    res = representational_null(key, own, alignment=al, num_random=199, contrast_keys=contrast)
    for name, t in res.tests.items():
        assert t.above == list(range(LT)), name
        assert t.max_p <= 0.02, name
        assert t.binomial_p < 1e-6, name
    # the null-contrast keys carry the key's per-layer norms
    torch.testing.assert_close(contrast[0].vectors.norm(dim=1), key.vectors.norm(dim=1))


def test_random_band_holds_its_level_when_the_key_is_a_random_direction() -> None:
    rejected = 0
    al = _alignment(5)
    own = _direction(torch.randn(LT, DT, generator=torch.Generator().manual_seed(6)), TARGET)
    layers = list(range(LT))
    for seed in range(SEEDS):
        # the "key" is one more Gaussian Source direction through the same map
        draws = random_cosines(al, own, layers, num=40, seed=1000 + seed)
        rejected += layer_test(draws[0], draws[1:]).max_p <= ALPHA
    assert rejected / SEEDS <= MAX_RATE


def test_the_reported_cosine_band_is_that_of_the_random_draws() -> None:
    al = _alignment(7)
    gen = torch.Generator().manual_seed(8)
    key = al.transfer(_direction(torch.randn(LS, DS, generator=gen), SOURCE))
    own = _direction(torch.randn(LT, DT, generator=gen), TARGET)
    res = representational_null(key, own, alignment=al, num_random=50, seed=3)
    band = key_cosines(res)
    draws = random_cosines(al, own, list(range(LT)), num=50, seed=3)
    cos = torch.nn.functional.cosine_similarity(key.vectors.double(), own.vectors.double())
    assert band["cosine"] == pytest.approx(cos.tolist(), abs=1e-12)
    assert cosines([key], own, list(range(LT)))[0].tolist() == pytest.approx(res.cosine)
    want_high = torch.quantile(draws, 0.975, dim=0).tolist()
    assert band["random_high"] == pytest.approx(want_high, abs=1e-12)
    assert band["exceed"] == pytest.approx((draws >= cos).double().mean(0).tolist())
    assert band["num_random"] == 50
    assert band["chance"] == pytest.approx(1.96 / math.sqrt(DT))


# -- sign flips ------------------------------------------------------------------------


def test_sign_flip_directions_are_the_flipped_means_whatever_the_batching() -> None:
    gen = torch.Generator().manual_seed(9)
    n, d = 10, 6
    lo, hi = torch.randn(n, d, generator=gen), torch.randn(n, d, generator=gen)
    signs = rademacher(5, n, seed=11)
    want = (signs @ (hi - lo).double()) / n
    for order in ([list(range(n))], [[7, 2, 9], [0, 1, 3, 4], [5, 6, 8]]):
        acc = SignFlipAccumulator([0], d, 5, n, seed=11)
        for idx in order:
            acc.update({0: lo[idx]}, {0: hi[idx]}, idx)
        torch.testing.assert_close(acc.vectors()[:, 0].double(), want, rtol=1e-6, atol=1e-7)


def test_sign_flip_null_holds_its_level_and_finds_a_planted_shift() -> None:
    n, d, layers, num = 30, 8, 3, 99
    u = torch.randn(layers, d, generator=torch.Generator().manual_seed(12))
    rejected, found = 0, 0
    for seed in range(SEEDS):
        gen = torch.Generator().manual_seed(2000 + seed)
        diffs = torch.randn(n, layers, d, generator=gen)  # symmetric about 0: no contrast
        for shift, counter in ((0.0, "null"), (0.8, "planted")):
            x = diffs + shift * u  # a consistent locked -> unlocked shift along u
            real = x.mean(0)
            flips = torch.einsum("jn,nld->jld", rademacher(num, n, seed), x.double()) / n
            stat = torch.nn.functional.cosine_similarity(real.double(), u.double(), dim=-1)
            null = torch.nn.functional.cosine_similarity(flips, u.double()[None], dim=-1)
            p = layer_test(stat, null).max_p
            if counter == "null":
                rejected += p <= ALPHA
            elif seed < 20:
                found += p <= ALPHA
    assert rejected / SEEDS <= MAX_RATE
    assert found == 20


# -- behaviour -----------------------------------------------------------------------------


def _cond(name: str, steps: list[bool], correct: list[bool] | None = None) -> ConditionResult:
    correct = correct or [False] * len(steps)
    items = [
        ItemResult(name, f"q{i}", "Q", "1", "p", "The final answer is 1" if s else "1", "1",
                   "final" if s else "number", c, 5, s)
        for i, (s, c) in enumerate(zip(steps, correct, strict=True))
    ]  # fmt: skip
    return ConditionResult(name, name, items, alpha=0.1)


def test_behavioural_null_p_values_follow_the_formula() -> None:
    key = _cond("unlock", [True] * 6 + [False] * 4)
    nulls = [_cond(f"random_{i}", [True] * i + [False] * (10 - i)) for i in range(9)]
    res = behavioural_null(key, {"random": nulls})
    t = res.test("random", "step_rate")
    assert t.key == pytest.approx(0.6)
    assert t.p_value == pytest.approx((1 + 3) / (1 + 9))  # nulls with rates 0.6, 0.7, 0.8
    assert t.spread.n == 9
    assert res.test("random", "final_rate").p_value == pytest.approx(t.p_value)
    assert t.normal_p == pytest.approx(prediction_p_value(0.6, [i / 10 for i in range(9)]))
    assert metric_values(key)["answer_words"] == pytest.approx((6 * 5 + 4) / 10)
    with pytest.raises(ValueError, match="other items"):
        behavioural_null(key, {"random": [_cond("r", [True] * 3)]})


def test_random_keys_are_seeded_and_keep_the_norms() -> None:
    key = SteeringKey(torch.randn(LT, DT), list(range(LT)), TARGET)
    a, b = random_keys(key, 3, seed=5), random_keys(key, 3, seed=5)
    assert all(torch.equal(x.vectors, y.vectors) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0].vectors, a[1].vectors)
    torch.testing.assert_close(a[2].vectors.norm(dim=1), key.vectors.norm(dim=1))


def test_choices_on_heldout() -> None:
    sweep = {
        r: AlignmentReport([(0, 0), (1, 1)], [0.5, 0.5], r2, 10, r, False)
        for r, r2 in {2: [0.1, 0.2], 4: [0.3, 0.3], 8: [0.3, 0.3]}.items()
    }
    assert choose_rank(sweep) == 4  # best mean R², the smaller rank on a tie
    steps = {
        "unlock": [(0.05, 0.2, 0, 1), (0.1, 0.5, 0, 1), (0.2, 0.9, 0, 1)],
        "random": [(0.05, 0.1, 0, 1), (0.1, 0.1, 0, 1), (0.2, 0.8, 0, 1)],
        "cot": [(0.0, 0.7, 0, 1)],
    }
    assert choose_alpha(steps) == 0.1


# -- wired into the demo and the evaluate command (tiny models) -----------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return save_pair(
        tmp_path_factory.mktemp("models"), target_arch="qwen2", target_hidden=48, target_seed=2
    )


def test_demo_reports_the_null_tests_and_where_to_steer(
    tiny: dict[str, str], tmp_path: Path
) -> None:
    cfg = replace(
        QUICK, source=tiny["src"], target=tiny["tgt"], n_train=6, n_heldout=4, n_test=3,
        max_new_tokens=2, rank=4, sweep_ranks=(2, 4), alphas=(0.1, 0.5), num_random=20,
        random_keys=3, null_contrasts=2, null_directions=15, correspondence="r2",
        layer_subset=True, select_rank=True, select_alpha=True,
    )  # fmt: skip
    result = run_demo(cfg, out=tmp_path, progress=False, echo=False)
    data = json.loads((tmp_path / "report.json").read_text())
    ev = data["evidence"]
    assert ev["selection"]["rank"] in (2, 4)
    assert ev["selection"]["alpha"] in (0.1, 0.5)
    fams = ev["behavioural_null"]["families"]
    assert [len(t["null"]) for t in fams["random"]] == [3] * 4
    assert [len(t["null"]) for t in fams["null_contrast"]] == [2] * 4
    tests = ev["representational_null"]["tests"]
    assert tests["random"]["num_null"] == 20
    assert tests["null_contrast"]["num_null"] == 15
    corr = ev["layer_correspondence"]
    assert len(corr["correspondence"]["layer_map"]) == 4
    assert set(corr["r2_test"]) == {"proportional", "selected"}
    assert ev["layer_subset"]["subset"]["layers"]
    for png in ("null_spread.png", "layer_correspondence.png", "key_cosine.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    md = (tmp_path / "report.md").read_text()
    assert "Is the key distinguishable from chance?" in md
    assert "Where to steer" in md
    # the extra random keys and the null-contrast keys (the random condition is in items)
    assert len((tmp_path / "null_items.jsonl").read_text().splitlines()) == (2 + 2) * 3
    assert len((tmp_path / "items.jsonl").read_text().splitlines()) == 4 * 3
    assert result.evidence.behaviour is not None


def test_evaluate_command_tests_the_key_against_null_keys(
    tiny: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    info = ModelInfo.of(make_model("qwen2", len(word_tokenizer()), hidden=48, layers=4, seed=2))
    gen = torch.Generator().manual_seed(0)
    for name in ("key", "null"):
        SteeringKey(torch.randn(4, 48, generator=gen), [0, 1, 2, 3], info).save_pretrained(
            tmp_path / name
        )
    argv = ["evaluate", "-t", tiny["tgt"], "--key", str(tmp_path / "key"), "-n", "3",
            "--max-new-tokens", "2", "--random-keys", "3", "--null-keys",
            str(tmp_path / "null"), "-o", str(tmp_path / "rep"), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    data = json.loads((tmp_path / "rep" / "report.json").read_text())
    fams = data["behavioural_null"]["families"]
    assert fams["random"][0]["spread"]["n"] == 3
    assert fams["null_contrast"][0]["spread"]["n"] == 1
    assert "p (one-sided)" in (tmp_path / "rep" / "report.md").read_text()
    assert len((tmp_path / "rep" / "items.jsonl").read_text().splitlines()) == 4 * 3
    assert "random vs baseline" in capsys.readouterr().out
