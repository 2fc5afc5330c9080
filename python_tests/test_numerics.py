"""Numerics of the pipeline: non-finite activations stop a collection and are named, the
alignment's default settings give the per-sample formula, a rank's map does not depend on the
other ranks fitted with it, float64 sums and pinv's floor, and the rank checks."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from tiny_models import PROMPTS, bpe_tokenizer, make_model, save_pair, word_tokenizer

from unlock_fast import (
    Alignment,
    AlignmentStats,
    ModelInfo,
    collect_alignment_stats,
    collect_transfer,
    extract_direction,
    fit_alignment,
)
from unlock_fast.capture import layer_output, plan_batches
from unlock_fast.cli import main
from unlock_fast.estimator import Factors, RankClampedWarning, eigen_floor, fit_factors
from unlock_fast.evaluation.conditions import Runner
from unlock_fast.evaluation.evidence import run_transfer
from unlock_fast.evaluation.problems import problem_splits
from unlock_fast.layers import decoder_layers
from unlock_fast.stats import Moments

pytestmark = pytest.mark.usefixtures("one_thread")

COT = [p + " Answer: Let's think step by step." for p in PROMPTS]
EPS64 = torch.finfo(torch.float64).eps


# ---------------------------------------------------------------------------- helpers


def per_sample_map(
    hs: torch.Tensor, ht: torch.Tensor, rank: int, centered: bool = False
) -> torch.Tensor:
    """METHOD.md §3 on explicit activations, float64: T = V_sᵀ pinv(H_s V_sᵀ) H_t V_tᵀ V_t."""
    hs, ht = hs.double(), ht.double()
    if centered:
        hs, ht = hs - hs.mean(0), ht - ht.mean(0)
    k = min(rank, hs.shape[0], hs.shape[1], ht.shape[1])
    vs = torch.linalg.svd(hs, full_matrices=False).Vh[:k]
    vt = torch.linalg.svd(ht, full_matrices=False).Vh[:k]
    return vs.T @ torch.linalg.pinv(hs @ vs.T) @ (ht @ vt.T) @ vt


def activations(n: int, d: int, seed: int, spectrum: str) -> torch.Tensor:
    """fp32 rows shaped like residual-stream activations.

    power: a large mean, a few large directions and a slowly decaying tail (σ_i ~ i^-1/2);
    lowrank: a large mean, 16 strong directions and isotropic noise.
    """
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    mean = 3.0 * torch.randn(d, generator=g, dtype=torch.float64)
    i = torch.arange(d, dtype=torch.float64)
    if spectrum == "power":
        scale = (1 + i) ** -0.5
        scale[:4] *= torch.tensor([20.0, 10.0, 6.0, 4.0], dtype=torch.float64)
    else:
        scale = torch.full((d,), 0.05, dtype=torch.float64)
        scale[:16] = torch.linspace(10, 1, 16, dtype=torch.float64)
    z = torch.randn(n, d, generator=g, dtype=torch.float64) * scale
    return (z @ basis.T + mean).float()


def paired(
    n: int, ds: int, dt: int, spectrum: str = "power", seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    hs = activations(n, ds, seed, spectrum)
    g = torch.Generator().manual_seed(seed + 100)
    w = torch.randn(ds, dt, generator=g, dtype=torch.float64) / ds**0.5
    ht = (hs.double() @ w).float() + 0.3 * activations(n, dt, seed + 1, spectrum)
    return hs, ht


def stats_from(
    hs: torch.Tensor, ht: torch.Tensor, dtype: torch.dtype = torch.float64, batches: int = 4
) -> AlignmentStats:
    m = Moments(hs.shape[1], ht.shape[1], dtype=dtype)
    for xs, ys in zip(hs.chunk(batches), ht.chunk(batches), strict=True):
        m.update(xs, ys)
    return AlignmentStats(
        layer_map=[(0, 0)],
        moments=[m],
        source=ModelInfo("src", "f0", hs.shape[1], 1),
        target=ModelInfo("tgt", "f1", ht.shape[1], 1),
        num_prompts=hs.shape[0],
    )


def dense_map(f: Factors) -> torch.Tensor:
    return f.source_basis[0].double() @ f.core[0].double() @ f.target_basis[0].double().T


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# ---------------------------------------------------------------------------- non-finite rows


@pytest.fixture
def pair() -> tuple[torch.nn.Module, object, torch.nn.Module, object]:
    """Fresh Source (llama) and Target (qwen2) models with names: the tests hook them."""
    stok, ttok = word_tokenizer(), bpe_tokenizer()
    src = make_model("llama", len(stok))
    tgt = make_model("qwen2", len(ttok), seed=1)
    src.config._name_or_path = "tiny/source"
    tgt.config._name_or_path = "tiny/target"
    return src, stok, tgt, ttok


def poison(model: torch.nn.Module, layer: int, call: int, row: int, value: float) -> None:
    """Write ``value`` into row ``row`` of decoder layer ``layer``'s output during the
    ``call``-th forward pass of ``model`` (0-based)."""
    calls = [-1]

    def count(*_: object) -> None:
        calls[0] += 1

    def hook(_module: torch.nn.Module, _args: object, output: object) -> None:
        if calls[0] == call:
            layer_output(output)[row] = value

    model.register_forward_pre_hook(count)
    decoder_layers(model)[layer].register_forward_hook(hook)


def test_extraction_names_model_layer_and_batch(pair):
    src, stok, _, _ = pair
    batches = plan_batches(stok, PROMPTS, 4)
    # Sides run in order on each batch: call 2 is the locked side of batch 1.
    poison(src, layer=1, call=2, row=0, value=float("nan"))
    with pytest.raises(ValueError, match="NaN or Inf") as err:
        extract_direction(src, stok, PROMPTS, COT, batch_size=4, progress=False)
    msg = str(err.value)
    assert msg.startswith("tiny/source: decoder layer 1 ")
    assert f"in batch 1 (prompts {batches[1][0]})" in msg


def test_alignment_names_the_target(pair):
    src, stok, tgt, ttok = pair
    batches = plan_batches(stok, PROMPTS, 4)  # planned on the Source's tokenizer
    poison(tgt, layer=2, call=0, row=1, value=float("inf"))
    forwards = _count_forwards(src)
    with pytest.raises(ValueError, match="NaN or Inf") as err:
        collect_alignment_stats(src, stok, tgt, ttok, PROMPTS, batch_size=4, progress=False)
    msg = str(err.value)
    assert msg.startswith("tiny/target: decoder layer 2 ")
    assert f"in batch 0 (prompts {batches[0][1]})" in msg
    assert len(forwards) == 1  # it stopped at the first batch


def test_transfer_names_the_unlocked_pass(pair):
    src, stok, tgt, ttok = pair
    batches = plan_batches(stok, PROMPTS, 5)
    poison(src, layer=0, call=1, row=2, value=float("nan"))  # batch 0, unlocked side
    with pytest.raises(ValueError, match="NaN or Inf") as err:
        collect_transfer(src, stok, tgt, ttok, PROMPTS, COT, batch_size=5, progress=False)
    msg = str(err.value)
    assert msg.startswith("tiny/source: decoder layer 0 ")
    assert f"in batch 0 (prompts {batches[0][2]})" in msg


def test_non_finite_statistics_are_refused_by_the_fit():
    hs, ht = paired(30, 16, 12)
    stats = stats_from(hs, ht)
    stats.moments[0].gram_xy_s[3, 4] = float("nan")
    with pytest.raises(ValueError, match="layer pair 0 hold NaN or Inf"):
        stats.fit(rank=4)


# ---------------------------------------------------------------------------- exact by default


CASES = [(64, 256, 256, 32), (400, 256, 256, 32), (120, 128, 128, 48), (90, 256, 192, 64)]


@pytest.mark.parametrize(("n", "ds", "dt", "k"), CASES)
@pytest.mark.parametrize("spectrum", ["power", "lowrank"])
@pytest.mark.parametrize("centered", [False, True])
def test_default_fit_is_the_per_sample_formula(n, ds, dt, k, spectrum, centered):
    hs, ht = paired(n, ds, dt, spectrum)
    stats, want = stats_from(hs, ht), per_sample_map(hs, ht, k, centered)
    assert rel(stats.fit(rank=k, centered=centered).matrix(0), want) <= 1e-4
    factors = fit_factors(stats.moments, [k], centered=centered, ridge=0.0)  # its defaults
    assert rel(dense_map(factors[k]), want) <= 1e-4


@pytest.mark.parametrize(("n", "d", "k"), [(300, 768, 256), (1100, 1024, 512), (600, 1024, 512)])
def test_default_fit_is_exact_at_large_rank(n, d, k):
    hs, ht = paired(n, d, d)
    got = stats_from(hs, ht, batches=8).fit(rank=k).matrix(0)
    assert rel(got, per_sample_map(hs, ht, k)) <= 1e-4


def test_the_old_sketch_settings_were_far_off():
    """What the defaults used to be: a sketch of width k + 10 with 4 power iterations."""
    hs, ht = paired(400, 256, 256)
    stats, want = stats_from(hs, ht), per_sample_map(hs, ht, 32)
    kw = {"centered": False, "ridge": 0.0}
    old = fit_factors(stats.moments, [32], solver="randomized", oversample=10, n_iter=4, **kw)
    assert rel(dense_map(old[32]), want) > 1e-3
    for solver in ("auto", "exact"):
        new = fit_factors(stats.moments, [32], solver=solver, **kw)
        assert rel(dense_map(new[32]), want) < 1e-6
    wide = fit_factors(stats.moments, [32], solver="randomized", **kw)  # oversample max(10, k)
    assert rel(dense_map(wide[32]), want) < 1e-4


def test_a_failed_ritz_check_falls_back_to_the_dense_solver():
    # fp32 sums leave a noise floor over all d directions, which a sketch exactly N wide
    # without power iterations does not get past: its residual check fails and the dense
    # solver answers (bit for bit what solver="exact" gives). The default sketch passes.
    hs, ht = paired(40, 256, 256)
    m = stats_from(hs, ht, torch.float32).moments
    kw = {"centered": False, "ridge": 0.0}
    exact = fit_factors(m, [8], solver="exact", **kw)[8]
    narrow = fit_factors(m, [8], oversample=0, n_iter=0, **kw)[8]
    assert torch.equal(narrow.source_basis, exact.source_basis)
    assert torch.equal(narrow.core, exact.core)
    default = fit_factors(m, [8], **kw)[8]
    assert not torch.equal(default.source_basis, exact.source_basis)
    assert rel(dense_map(default), dense_map(exact)) < 1e-5


# ---------------------------------------------------------------------------- fit == fit_ranks


@pytest.mark.parametrize("solver", ["auto", "exact"])
def test_a_rank_does_not_depend_on_the_other_ranks(solver):
    hs, ht = paired(60, 256, 200)  # N < d: the auto solver sketches
    stats = stats_from(hs, ht)
    kw = {"centered": False, "ridge": 0.0, "solver": solver, "n_iter": 1}
    together = fit_factors(stats.moments, [2, 8, 16, 32, 60], **kw)
    for r in (2, 16, 32, 60):
        alone = fit_factors(stats.moments, [r], **kw)[r]
        for name in ("source_basis", "core", "target_basis", "eigenvalues"):
            assert torch.equal(getattr(alone, name), getattr(together[r], name)), (r, name)


def test_fit_equals_fit_ranks_with_default_settings():
    hs, ht = paired(150, 96, 80)
    stats = stats_from(hs, ht)
    many = stats.fit_ranks([2, 8, 16, 48, 8])
    assert sorted(many) == [2, 8, 16, 48]
    for r, a in many.items():
        assert torch.equal(a.matrix(0), stats.fit(rank=r).matrix(0))


# ---------------------------------------------------------------------------- float64 sums


@pytest.mark.parametrize("centered", [False, True])
def test_float64_sums_beat_fp32_on_an_ill_conditioned_fit(centered):
    hs, ht = paired(120, 128, 128)
    want = per_sample_map(hs, ht, 48, centered)
    fp32 = stats_from(hs, ht, torch.float32).fit(rank=48, centered=centered).matrix(0)
    fp64 = stats_from(hs, ht, torch.float64).fit(rank=48, centered=centered).matrix(0)
    assert rel(fp32, want) > 2e-5  # fp32 sums square the conditioning
    assert rel(fp64, want) < 1e-6
    assert rel(fp64, want) < rel(fp32, want) / 100


def test_float64_moments_round_trip(tmp_path: Path):
    hs, ht = paired(40, 12, 10)
    stats = stats_from(hs, ht)
    m = stats.moments[0]
    state = m.state_dict()
    assert state["gram_xx"].dtype == torch.float64
    back = Moments.from_state_dict(state)
    assert back.dtype == torch.float64
    assert torch.equal(back.gram("xy"), m.gram("xy"))
    stats.save_pretrained(tmp_path / "stats")
    loaded = AlignmentStats.from_pretrained(tmp_path / "stats")
    assert loaded.moments[0].dtype == torch.float64
    assert torch.equal(loaded.moments[0].gram("xx"), m.gram("xx"))


def test_collectors_sum_in_float64_by_default(pair):
    src, stok, tgt, ttok = pair
    kw = {"batch_size": 6, "progress": False}
    stats = collect_alignment_stats(src, stok, tgt, ttok, PROMPTS, **kw)
    assert {m.dtype for m in stats.moments} == {torch.float64}
    low = collect_alignment_stats(src, stok, tgt, ttok, PROMPTS, accumulate=torch.float32, **kw)
    assert {m.dtype for m in low.moments} == {torch.float32}
    _, both = collect_transfer(src, stok, tgt, ttok, PROMPTS, COT, **kw)
    assert {m.dtype for m in both.moments} == {torch.float64}
    for a, b in zip(stats.moments, low.moments, strict=True):
        torch.testing.assert_close(a.gram("xy"), b.gram("xy"), rtol=1e-4, atol=1e-3)
    forwards = _count_forwards(src)
    with pytest.raises(TypeError, match="torch.float32 or torch.float64"):
        collect_alignment_stats(src, stok, tgt, ttok, PROMPTS, accumulate=torch.float16, **kw)
    with pytest.raises(TypeError, match="torch.float32 or torch.float64"):
        collect_transfer(src, stok, tgt, ttok, PROMPTS, COT, accumulate=torch.bfloat16, **kw)
    assert forwards == []


# ---------------------------------------------------------------------------- pinv's floor


def test_eigen_floor_is_pinvs_rule_bounded_by_the_grams_rounding():
    eps32 = torch.finfo(torch.float32).eps
    # float64 sums: the decomposition's rounding d·eps·λ_1 is above (max(N, d)·eps)²·λ_1
    assert eigen_floor(1.0, 2.0, 100, 50, EPS64) == pytest.approx(50 * EPS64)
    # fp32 sums, mean-dominated Gram: pinv's rule (max(N, d)·eps32)²·λ_1 decides
    assert eigen_floor(1e6, 1.0, 300, 64, eps32) == pytest.approx((300 * eps32) ** 2 * 1e6)
    # fp32 sums, centred: the rounding of the sums, 8·eps32·tr(C), decides
    assert eigen_floor(1.0, 10.0, 300, 64, eps32) == pytest.approx(8 * eps32 * 10.0)


def test_eigenvalues_below_the_floor_are_dropped_as_pinv_drops_them():
    n, ds, dt = 20, 6, 6
    g = torch.Generator().manual_seed(3)
    u = torch.linalg.qr(torch.randn(n, ds, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(ds, ds, generator=g, dtype=torch.float64))[0]
    sigma = torch.tensor([10.0, 5.0, 2.0, 1.0, 1e-4, 1e-9], dtype=torch.float64)
    hs = (u * sigma) @ v.T  # λ = σ²: 1e-8 is resolved in float64, 1e-18 is not
    ht = hs @ torch.randn(ds, dt, generator=g, dtype=torch.float64)
    ht = ht + 0.01 * torch.randn(n, dt, generator=g, dtype=torch.float64)
    kw = {"centered": False, "ridge": 0.0}

    m64 = Moments(ds, dt, dtype=torch.float64).update(hs, ht)
    f = fit_factors([m64], [6], **kw)[6]
    t = dense_map(f)
    assert f.core[0][5].abs().max() == 0  # 1/λ → 0 for the unresolvable direction
    assert f.core[0][4].abs().max() > 0  # σ = 1e-4 is kept
    assert float((v[:, 5] @ t).norm()) < 1e-6 * float(t.norm())
    vs = torch.linalg.svd(hs, full_matrices=False).Vh[:5]  # the per-sample map without it
    assert rel(t, vs.T @ torch.linalg.pinv(hs @ vs.T) @ ht) < 1e-5  # fp32 factors

    m32 = Moments(ds, dt).update(hs.float(), ht.float())
    f32 = fit_factors([m32], [6], **kw)[6]
    assert f32.core[0][4].abs().max() == 0  # fp32 sums cannot resolve λ = 1e-8 either

    strict = fit_factors([m64], [6], eig_rtol=0.1, **kw)[6]  # an extra floor, 0.1·tr(C_ss)
    kept = strict.eigenvalues[0] > 0.1 * m64.trace("xx", centered=True)
    assert 1 <= int(kept.sum()) < 4
    assert torch.equal(strict.core[0].abs().amax(1) > 0, kept)


# ---------------------------------------------------------------------------- rank checks


def test_a_lowered_rank_warns_once():
    hs, ht = paired(50, 64, 48)
    stats = stats_from(hs, ht)
    with pytest.warns(RankClampedWarning) as record:
        fitted = stats.fit_ranks([4, 60, 100])
    clamped = [w for w in record if issubclass(w.category, RankClampedWarning)]
    assert len(clamped) == 1
    assert str(clamped[0].message) == (
        "rank 60, 100 exceeds min(N, d_s, d_t) = 48 (d_t = 48); fitting rank 48 instead"
    )
    assert [fitted[r].k for r in (4, 60, 100)] == [4, 48, 48]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert stats.fit(rank=48).k == 48
    with pytest.warns(RankClampedWarning, match=r"\(N = 50 rows\)"):
        stats_from(hs, torch.cat([ht, ht], 1)).fit(rank=64)


def _count_forwards(model: torch.nn.Module) -> list[int]:
    """A list whose length counts the forward passes through the first decoder block."""
    calls: list[int] = []
    decoder_layers(model)[0].register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"rank": 0}, "rank must be a positive int, got 0"),
        ({"rank": -3}, "rank must be a positive int"),
        ({"rank": 2.5}, "rank must be a positive int, got 2.5"),
        ({"rank": True}, "rank must be a positive int, got True"),
        ({"rank": "8"}, "rank must be a positive int, got '8'"),
        ({"ridge": -1.0}, "ridge must be a finite float >= 0"),
        ({"solver": "lanczos"}, "solver must be one of auto, exact, randomized"),
        ({"oversample": -1}, "oversample must be an int >= 0"),
        ({"n_iter": 1.5}, "n_iter must be an int >= 0"),
    ],
)
def test_fit_settings_are_checked_before_any_forward_pass(pair, settings, message):
    src, stok, tgt, ttok = pair
    counts = _count_forwards(src), _count_forwards(tgt)
    with pytest.raises(ValueError, match=message):
        fit_alignment(src, stok, tgt, ttok, PROMPTS, progress=False, **settings)
    problems = problem_splits({"train": 4}, seed=0)["train"]
    with pytest.raises(ValueError, match=message):
        run_transfer(Runner(src, stok, progress=False), Runner(tgt, ttok), problems, **settings)
    assert counts == ([], [])


def test_fit_alignment_passes_solver_settings(pair):
    src, stok, tgt, ttok = pair
    kw = {"batch_size": 6, "progress": False}
    a = fit_alignment(src, stok, tgt, ttok, PROMPTS, rank=4, **kw)
    b = fit_alignment(src, stok, tgt, ttok, PROMPTS, rank=4, oversample=3, n_iter=2, **kw)
    torch.testing.assert_close(a.matrix(0), b.matrix(0), rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return save_pair(tmp_path_factory.mktemp("models"))


def test_cli_passes_accumulation_and_sketch_settings(saved, tmp_path, capsys):
    out = tmp_path / "a"
    argv = ["align", "-s", saved["src"], "-t", saved["tgt"], "-o", str(out), "-n", "6"]
    argv += ["--n-heldout", "0", "--rank", "3", "--no-progress"]
    argv += ["--accumulate", "float32", "--oversample", "4", "--power-iters", "2"]
    assert main(argv) == 0
    assert "rank 3" in capsys.readouterr().out
    assert Alignment.from_pretrained(out).k == 3


@pytest.mark.parametrize(
    "bad", [["--rank", "0"], ["--solver", "qr"], ["--power-iters", "-1"], ["--accumulate", "f16"]]
)
def test_cli_refuses_bad_solver_options(saved, bad, capsys):
    argv = ["align", "-s", saved["src"], "-t", saved["tgt"], "-o", "unused", *bad]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert bad[0] in capsys.readouterr().err
