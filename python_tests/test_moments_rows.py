"""Statistics that keep their rows (few wide rows) and fold them into Grams past a limit:
both forms and the switch give the per-sample formula, and every read, merge, all-reduce and
save/load works in either form."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from dist_rows_worker import DX, DY, N, local, rows, worker
from safetensors.torch import load_file
from test_numerics import dense_map, paired, per_sample_map, rel, stats_from

from unlock_fast import AlignmentStats, ModelInfo
from unlock_fast.direction import METHODS
from unlock_fast.estimator import fit_factors, heldout_errors
from unlock_fast.stats import Moments
from unlock_fast.stats.rows import fold_point

pytestmark = pytest.mark.usefixtures("one_thread")


def filled(hs: torch.Tensor, ht: torch.Tensor, limit: int | str, batches: int = 5, **kw) -> Moments:
    m = Moments(hs.shape[1], ht.shape[1], dtype=torch.float64, row_limit=limit, **kw)
    for a, b in zip(hs.chunk(batches), ht.chunk(batches), strict=True):
        m.update(a, b)
    return m


def as_stats(m: Moments) -> AlignmentStats:
    return AlignmentStats(
        layer_map=[(0, 0)],
        moments=[m],
        source=ModelInfo("src", "f0", m.dim_x, 1),
        target=ModelInfo("tgt", "f1", int(m.dim_y or 0), 1),
        num_prompts=m.rows,
    )


# ---------------------------------------------------------------------------- the fit

CASES = [(64, 256, 256, 32), (120, 128, 128, 48), (90, 256, 192, 64), (600, 1024, 768, 512)]


@pytest.mark.parametrize(("n", "ds", "dt", "k"), CASES)
@pytest.mark.parametrize("spectrum", ["power", "lowrank"])
@pytest.mark.parametrize("centered", [False, True])
def test_both_forms_and_the_switch_give_the_per_sample_map(n, ds, dt, k, spectrum, centered):
    hs, ht = paired(n, ds, dt, spectrum)
    want = per_sample_map(hs, ht, k, centered)
    # rows kept throughout; summed from the start; kept, then folded half way
    for limit, form in ((10**6, "rows"), (0, "gram"), (n // 2, "gram")):
        m = filled(hs, ht, limit)
        assert m.form == form
        got = fit_factors([m], [k], centered=centered, ridge=0.0)[k]
        assert rel(dense_map(got), want) <= 1e-7, (limit, form)


def test_statistics_keep_fold_and_fit_on_their_device(device):
    hs, ht = paired(90, 256, 192)
    want = per_sample_map(hs, ht, 64, centered=True)
    for limit, form in ((10**6, "rows"), (45, "gram")):
        m = filled(hs.to(device), ht.to(device), limit, device=device)
        assert m.form == form
        assert m.sum_x.device.type == device
        got = fit_factors([m], [64], centered=True, ridge=0.0)[64]
        assert rel(dense_map(got), want) <= 1e-7, form


def test_the_row_form_decomposes_the_kernel_when_rows_outnumber_a_width():
    hs, ht = paired(200, 48, 256)  # N > d_s: the Source side forms its Gram from the rows
    m = filled(hs, ht, 10**6)
    assert m.form == "rows"
    got = fit_factors([m], [40], centered=False, ridge=0.0)[40]
    assert rel(dense_map(got), per_sample_map(hs, ht, 40)) <= 1e-7


def test_a_rank_from_kept_rows_does_not_depend_on_the_other_ranks():
    # N = 600 rows: rank 8 alone forms one block of 256 columns, with rank 300 beside it two
    hs, ht = paired(600, 1024, 768)
    m = filled(hs, ht, 10**6)
    kw = {"centered": False, "ridge": 0.0}
    together = fit_factors([m], [8, 300], **kw)
    alone = fit_factors([m], [8], **kw)[8]
    for name in ("source_basis", "core", "target_basis", "eigenvalues"):
        assert torch.equal(getattr(alone, name), getattr(together[8], name)), name
    assert rel(dense_map(together[300]), per_sample_map(hs, ht, 300)) <= 1e-7


@pytest.mark.parametrize("centered", [False, True])
def test_ridge_floor_ranks_and_heldout_agree_across_forms(centered):
    hs, ht = paired(150, 96, 80)
    rows_, gram = filled(hs[:100], ht[:100], 10**6), filled(hs[:100], ht[:100], 0)
    kw = {"centered": centered, "ridge": 1e-2, "eig_rtol": 1e-6}
    a = fit_factors([rows_], [8, 48, 80], **kw)
    b = fit_factors([gram], [8, 48, 80], **kw)
    for r in (8, 48, 80):
        assert rel(dense_map(a[r]), dense_map(b[r])) <= 1e-6, r
        alone = fit_factors([rows_], [r], **kw)[r]  # a rank does not depend on the others
        assert torch.equal(alone.core, a[r].core)
    (e_rows,), (r2_rows,) = heldout_errors(a[48], [0], [filled(hs[100:], ht[100:], 10**6)])
    (e_gram,), (r2_gram,) = heldout_errors(a[48], [0], [filled(hs[100:], ht[100:], 0)])
    assert e_rows == pytest.approx(e_gram, rel=1e-9)
    assert r2_rows == pytest.approx(r2_gram, rel=1e-9)
    # and both are the per-sample residual of the same map
    f = a[48]
    xs, ys = hs[100:].double(), ht[100:].double()
    if centered:
        xs, ys = xs - f.source_mean[0].double(), ys - f.target_mean[0].double()
    resid = ys - xs @ dense_map(f)
    sse = float((resid**2).sum())
    assert e_rows == pytest.approx((sse / float((ht[100:].double() ** 2).sum())) ** 0.5, rel=1e-7)
    var = float(((ht[100:].double() - ht[100:].double().mean(0)) ** 2).sum())
    assert r2_rows == pytest.approx(1 - sse / var, rel=1e-7)


def test_non_finite_rows_are_refused_by_the_fit():
    hs, ht = paired(30, 16, 12)
    hs[3, 4] = float("nan")
    with pytest.raises(ValueError, match="layer pair 0 hold NaN or Inf"):
        fit_factors([filled(hs, ht, 10**6)], [4], centered=False, ridge=0.0)


# ---------------------------------------------------------------------------- reads


@pytest.mark.parametrize("centered", [False, True])
def test_every_read_of_kept_rows_equals_the_sums(centered):
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(40, 12, generator=g) + 3, torch.randn(40, 9, generator=g) - 1
    w = torch.rand(40, generator=g)
    kept, summed = (Moments(12, 9, dtype=torch.float64, row_limit=lim) for lim in (100, 0))
    for m in (kept, summed):  # mixed dtypes and weights
        m.update(x[:10].bfloat16(), y[:10].bfloat16())
        m.update(x[10:], y[10:], w[10:])
    assert kept.form == "rows"
    close = {"rtol": 1e-12, "atol": 1e-10}
    for which in ("xx", "yy", "xy"):
        torch.testing.assert_close(
            kept.gram(which, centered=centered), summed.gram(which, centered=centered), **close
        )
        u = torch.randn(12 if which[0] == "x" else 9, 3, generator=g, dtype=torch.float64)
        v = torch.randn(12 if which[1] == "x" else 9, 4, generator=g, dtype=torch.float64)
        want = u.T @ summed.gram(which, centered=centered) @ v
        torch.testing.assert_close(kept.bilinear(which, u, v, centered=centered), want, **close)
    for which in ("x", "y"):
        torch.testing.assert_close(kept.mean(which), summed.mean(which), **close)
        r = kept.row_factor(which, centered=centered)
        torch.testing.assert_close(r.T @ r, summed.gram(which * 2, centered=centered), **close)
        assert summed.row_factor(which) is None
    for which in ("xx", "yy"):
        assert kept.trace(which, centered=centered) == pytest.approx(
            summed.trace(which, centered=centered), rel=1e-12
        )
    assert (kept.count, kept.rows) == (summed.count, summed.rows)


def test_auto_keeps_rows_while_they_take_fewer_values_than_the_grams():
    ds, dt = 20, 12
    limit = fold_point(ds, dt)
    assert limit * (ds + dt) < ds * ds + dt * dt + ds * dt <= (limit + 1) * (ds + dt)
    assert fold_point(8, None) == 7
    m = Moments(ds, dt, dtype=torch.float64, row_limit="auto")
    assert m.row_limit == limit
    x, y = torch.randn(limit + 1, ds), torch.randn(limit + 1, dt)
    m.update(x[:limit], y[:limit])
    assert m.form == "rows"
    assert m.nbytes == limit * (ds + dt) * 4  # fp32 rows, as given
    m.update(x[limit:], y[limit:])
    assert m.form == "gram"
    assert m.nbytes >= (ds * ds + dt * dt + ds * dt) * 8
    want = Moments(ds, dt, dtype=torch.float64).update(x, y)
    torch.testing.assert_close(m.gram("xy", centered=True), want.gram("xy", centered=True))


def test_bad_row_input_is_refused():
    for bad in (-1, 1.5, True, "rows"):
        with pytest.raises(ValueError, match="row_limit must be an int >= 0 or 'auto'"):
            Moments(4, row_limit=bad)
    m = Moments(4, row_limit=10)  # fp32 sums: rows of fp32, fp16 or bf16
    with pytest.raises(TypeError, match="x"):
        m.update(torch.zeros(2, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="floating-point"):
        Moments(4, dtype=torch.float64, row_limit=10).update(torch.zeros(2, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="non-negative"):
        m.update(torch.zeros(2, 4), weight=torch.tensor([1.0, -1.0]))
    assert m.rows == 0


def test_a_view_is_copied_not_kept():
    big = torch.randn(8, 5, 6)
    m = Moments(6, row_limit=100).update(big[:, -1])
    big.zero_()
    assert m.trace("xx") > 0


# ---------------------------------------------------------------------------- merge


def _parts(limit_a: int, limit_b: int) -> tuple[Moments, Moments, Moments]:
    x, y, w = rows()
    a = Moments(DX, DY, dtype=torch.float64, row_limit=limit_a)
    b = Moments(DX, DY, dtype=torch.float64, row_limit=limit_b)
    a.update(x[:12], y[:12], w[:12])
    b.update(x[12:], y[12:], w[12:])
    return a, b, Moments(DX, DY, dtype=torch.float64).update(x, y, w)


@pytest.mark.parametrize(
    ("limit_a", "limit_b", "form"),
    [(100, 100, "rows"), (20, 100, "gram"), (100, 0, "gram"), (0, 100, "gram")],
)
def test_merge_in_either_form(limit_a, limit_b, form):
    a, b, want = _parts(limit_a, limit_b)
    before = b.state_dict()
    a.merge(b)
    assert a.form == form
    assert (a.rows, a.count) == (want.rows, pytest.approx(want.count))
    for which in ("xx", "yy", "xy"):
        for centered in (False, True):
            torch.testing.assert_close(
                a.gram(which, centered=centered), want.gram(which, centered=centered),
                rtol=1e-12, atol=1e-9,
            )  # fmt: skip
    after = b.state_dict()
    assert all(
        torch.equal(v, after[k]) if isinstance(v, torch.Tensor) else v == after[k]
        for k, v in before.items()
    )


def test_merge_into_an_empty_accumulator_keeps_rows():
    a, b, want = _parts(100, 100)
    empty = Moments(DX, DY, dtype=torch.float64, row_limit=100).merge(a).merge(b)
    assert empty.form == "rows"
    torch.testing.assert_close(empty.gram("xy", centered=True), want.gram("xy", centered=True))


# ---------------------------------------------------------------------------- save and load


def test_rows_save_and_load_exactly(tmp_path: Path):
    hs, ht = paired(40, 64, 48)
    m = filled(hs, ht, "auto")  # up to 84 rows
    m.update(hs[:3], ht[:3], torch.tensor([0.5, 2.0, 1.0]))
    assert m.form == "rows"
    stats = as_stats(m)
    stats.save_pretrained(tmp_path / "rows")
    tensors = load_file(tmp_path / "rows" / "tensors.safetensors")
    assert tensors["pair0.rows_x"].dtype == torch.float32  # as given: N·(d_s + d_t) values
    assert tensors["pair0.rows_x"].shape == (43, 64)
    back = AlignmentStats.from_pretrained(tmp_path / "rows")
    got = back.moments[0]
    assert (got.form, got.rows, got.row_limit) == ("rows", 43, m.row_limit)
    a, b = stats.fit(rank=12, centered=True), back.fit(rank=12, centered=True)
    assert torch.equal(a.matrix(0), b.matrix(0))
    back.moments[0].update(torch.cat([hs, hs]), torch.cat([ht, ht]))  # streaming on, past it
    assert back.moments[0].form == "gram"


def test_gram_form_files_still_load(tmp_path: Path):
    hs, ht = paired(40, 12, 10)
    stats = stats_from(hs, ht)  # summed from the start: the format of every older file
    stats.save_pretrained(tmp_path / "old")
    meta = (tmp_path / "old" / "unlock.json").read_text()
    assert '"form"' not in meta
    back = AlignmentStats.from_pretrained(tmp_path / "old")
    assert back.moments[0].form == "gram"
    assert torch.equal(back.fit(rank=6).matrix(0), stats.fit(rank=6).matrix(0))


DATA = Path(__file__).parent / "data"


def test_a_file_written_before_the_row_form_loads_and_merges_with_rows():
    """gram_stats_v0: statistics of 40 rows saved by the release before the row form
    (its rows beside it, to check against)."""
    old = AlignmentStats.from_pretrained(DATA / "gram_stats_v0")
    rows_ = load_file(DATA / "gram_stats_v0_rows.safetensors")
    hs, ht = rows_["hs"], rows_["ht"]
    assert old.moments[0].form == "gram"
    # at 12 x 10 the fp32 factors alone (eps 6e-8) leave ~1e-7: five eps of room
    assert rel(old.fit(rank=8).matrix(0), per_sample_map(hs, ht, 8)) <= 3e-7
    g = torch.Generator().manual_seed(1)
    more = Moments(12, 10, dtype=torch.float64, row_limit=100)
    more.update(hs[:20] + torch.randn(20, 12, generator=g), ht[:20])
    old.moments[0].merge(more)
    both_s = torch.cat([hs, more.row_factor("x")])
    both_t = torch.cat([ht, more.row_factor("y")])
    got = old.fit(rank=8, centered=True).matrix(0)
    assert rel(got, per_sample_map(both_s, both_t, 8, centered=True)) <= 3e-7


def test_damaged_row_state_is_refused():
    m = Moments(4, 3, dtype=torch.float64, row_limit=10).update(
        torch.randn(5, 4), torch.randn(5, 3)
    )
    state = m.state_dict()
    assert state["form"] == "rows"
    with pytest.raises(ValueError, match=r"state\['rows_x'\] must be a tensor of shape \[5, 4\]"):
        Moments.from_state_dict({**state, "rows_x": torch.zeros(4, 4)})
    with pytest.raises(ValueError, match="over its row_limit"):
        Moments.from_state_dict({**state, "row_limit": 3})
    with pytest.raises(ValueError, match="negative weights"):
        Moments.from_state_dict({**state, "weights": -state["weights"]})
    with pytest.raises(ValueError, match="state is missing weights"):
        Moments.from_state_dict({k: v for k, v in state.items() if k != "weights"})


# ---------------------------------------------------------------------------- distributed


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
@pytest.mark.parametrize(
    ("limit", "gram_on", "form"), [(100, -1, "rows"), (20, -1, "gram"), (100, 1, "gram")]
)
def test_two_processes_gather_rows_or_sum_grams(tmp_path, limit, gram_on, form):
    out_file = str(tmp_path / "out.safetensors")
    args = (2, str(tmp_path / "rendezvous"), out_file, limit, gram_on)
    mp.spawn(worker, args=args, nprocs=2, join=True)
    got = load_file(out_file)
    assert bool(got["form"][0]) == (form == "rows")
    x, y, w = rows()
    assert int(got["form"][1]) == N
    assert float(got["form"][2]) == pytest.approx(float(w.sum()))
    want = Moments(DX, DY, dtype=torch.float64).update(x, y, w)
    close = {"rtol": 1e-12, "atol": 1e-9}
    for which in ("xx", "yy", "xy"):
        torch.testing.assert_close(got[which], want.gram(which), **close)
    torch.testing.assert_close(got["cxy"], want.gram("xy", centered=True), **close)


def test_all_reduce_without_distributed_changes_nothing():
    m = local(0, 1, 100, None)
    before = m.gram("xy")
    assert m.all_reduce().form == "rows"
    assert torch.equal(m.gram("xy"), before)


# ---------------------------------------------------------------------------- direction


def test_pca_direction_from_kept_rows_equals_the_grams():
    g = torch.Generator().manual_seed(2)
    d = torch.randn(30, 40, generator=g) * torch.linspace(3, 0.1, 40) + 1.0
    mean = d.double().mean(0)
    kept, summed = Moments(40, row_limit="auto").update(d), Moments(40).update(d)
    assert kept.form == "rows"
    pca = METHODS["pca"].finalize
    torch.testing.assert_close(pca(mean, kept), pca(mean, summed), rtol=1e-5, atol=1e-6)
    top = torch.linalg.svd(d.double() - mean, full_matrices=False).Vh[0]
    assert abs(float(pca(mean, kept) @ top)) == pytest.approx(1.0, abs=1e-9)
