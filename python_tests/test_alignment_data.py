"""The alignment's rows as a choice: locked prompts, locked + unlocked, a corpus, or locked +
corpus; exact float64 statistics of exactly the named rows, the refusals, and the record
in the artifacts' origin."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_numerics import per_sample_map
from tiny_models import PROMPTS, bpe_tokenizer, make_model, save_pair, word_tokenizer

import unlock_fast.alignment_data as alignment_data
from unlock_fast import (
    Alignment,
    AlignmentStats,
    Direction,
    SteeringKey,
    collect_alignment_stats,
    collect_transfer,
    extract_direction,
    generic_corpus,
    write_corpus,
)
from unlock_fast.artifacts.data import ALIGNMENT_DATA
from unlock_fast.capture import iter_activations
from unlock_fast.cli import demo as cli_demo
from unlock_fast.cli import main
from unlock_fast.corpus import corpus_hash

pytestmark = pytest.mark.usefixtures("one_thread")

LOCKED = PROMPTS[:5]
UNLOCKED = [p + " Let's think step by step." for p in LOCKED]
TARGET_LOCKED = ["Q. " + p for p in LOCKED]
TARGET_UNLOCKED = ["Q. " + p for p in UNLOCKED]
CORPUS = ["the cat sat on the mat", "one two three four", "the dog slept near the door"] * 2
CORPUS = [f"{t} {i}" for i, t in enumerate(CORPUS)]  # distinct texts, some tokens unknown

# The rows each choice names: (Source texts, Target texts).
ROWS = {
    "locked": (LOCKED, TARGET_LOCKED),
    "locked+unlocked": (LOCKED + UNLOCKED, TARGET_LOCKED + TARGET_UNLOCKED),
    "corpus": (CORPUS, CORPUS),
    "locked+corpus": (LOCKED + CORPUS, TARGET_LOCKED + CORPUS),
}


@pytest.fixture(scope="module")
def models():
    stok, ttok = word_tokenizer("right"), bpe_tokenizer("left")
    src, tgt = make_model("llama", len(stok)), make_model("qwen2", len(ttok), seed=1)
    return src, stok, tgt, ttok


def rows(model, tok, texts: list[str], layers: list[int]) -> dict[int, torch.Tensor]:
    """Last-token rows of ``texts`` in their order, one forward pass each (no batching)."""
    out: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for text in texts:
        for b in iter_activations(model, tok, [text], layers, batch_size=1):
            for layer in layers:
                out[layer].append(b.rows[layer].double())
    return {k: torch.cat(v) for k, v in out.items()}


def corpus_kwargs(choice: str) -> dict[str, object]:
    return {"corpus": CORPUS} if "corpus" in choice else {}


def check_exact(stats: AlignmentStats, models, choice: str) -> None:
    """The Grams are the float64 sums over exactly the rows ``choice`` names, and the fit
    equals the per-sample formula on them."""
    src, stok, tgt, ttok = models
    sx, tx = ROWS[choice]
    xs = rows(src, stok, sx, sorted({s for s, _ in stats.layer_map}))
    ys = rows(tgt, ttok, tx, sorted({t for _, t in stats.layer_map}))
    assert stats.num_rows == len(sx) == stats.num_prompts
    fit = stats.fit(rank=4)
    for i, (s, t) in enumerate(stats.layer_map):
        m = stats.moments[i]
        for which, want in (
            ("xx", xs[s].T @ xs[s]),
            ("yy", ys[t].T @ ys[t]),
            ("xy", xs[s].T @ ys[t]),
        ):
            torch.testing.assert_close(m.gram(which), want, rtol=1e-9, atol=1e-9)
        got, ref = fit.matrix(t).double(), per_sample_map(xs[s], ys[t], 4)
        assert float((got - ref).norm() / ref.norm()) < 1e-3


@pytest.mark.parametrize("choice", ALIGNMENT_DATA)
def test_collect_alignment_stats_fits_the_named_rows(choice, models, monkeypatch):
    monkeypatch.setattr(alignment_data, "CHUNK", 4)  # the corpus in two passes
    stats = collect_alignment_stats(
        *models, LOCKED, prompts_unlocked=UNLOCKED, target_prompts=TARGET_LOCKED,
        target_prompts_unlocked=TARGET_UNLOCKED, alignment_data=choice, batch_size=3,
        progress=False, **corpus_kwargs(choice),
    )  # fmt: skip
    check_exact(stats, models, choice)
    record = stats.origin["alignment_data"]
    n_corpus = len(CORPUS) if "corpus" in choice else 0
    assert record["choice"] == choice
    assert record["corpus"] == n_corpus
    assert record["locked"] == (0 if choice == "corpus" else len(LOCKED))
    assert record["unlocked"] == (len(UNLOCKED) if choice == "locked+unlocked" else 0)
    assert record["items"] == len(ROWS[choice][0])
    if n_corpus:
        assert record["corpus_source"] == "list"
        assert record["corpus_hash"] == corpus_hash(CORPUS)
    else:
        assert "corpus_source" not in record


@pytest.mark.parametrize("choice", ALIGNMENT_DATA)
def test_collect_transfer_fits_the_named_rows(choice, models):
    src, stok, tgt, ttok = models
    direction, stats = collect_transfer(
        *models, LOCKED, UNLOCKED, target_prompts=TARGET_LOCKED,
        target_prompts_unlocked=TARGET_UNLOCKED, alignment_data=choice, batch_size=2,
        progress=False, **corpus_kwargs(choice),
    )  # fmt: skip
    check_exact(stats, models, choice)
    assert stats.origin["alignment_data"]["choice"] == choice
    # the direction is the prompt contrast's, whatever the alignment's rows
    alone = extract_direction(src, stok, LOCKED, UNLOCKED, progress=False)
    torch.testing.assert_close(direction.vectors, alone.vectors, rtol=1e-5, atol=1e-6)


# Refused settings of collect_alignment_stats: (keyword arguments, error, message).
REFUSALS = {
    "unlocked missing": (dict(alignment_data="locked+unlocked"), ValueError,
                         "needs the unlocked prompts"),
    "unlocked unpaired": (dict(alignment_data="locked+unlocked", prompts_unlocked=UNLOCKED[:2]),
                          ValueError, "must pair"),
    "corpus missing": (dict(alignment_data="corpus"), ValueError, "needs a corpus"),
    "corpus with locked": (dict(corpus=CORPUS), ValueError, "does not use one"),
    "corpus with locked+unlocked": (
        dict(alignment_data="locked+unlocked", prompts_unlocked=UNLOCKED, corpus=CORPUS),
        ValueError, "does not use one",
    ),
    "limit without corpus": (dict(corpus_limit=3), ValueError, "without a corpus"),
    "no prompts for locked": (dict(prompts=[]), ValueError, "non-empty"),
    "no prompts for locked+corpus": (dict(prompts=[], alignment_data="locked+corpus",
                                          corpus=CORPUS), ValueError, "non-empty"),
    "unknown choice": (dict(alignment_data="unlocked"), ValueError,
                       "must be one of locked, locked\\+unlocked"),
    "corpus of wrong type": (dict(alignment_data="corpus", corpus=3), TypeError,
                             "corpus must be"),
    "corpus item not str": (dict(alignment_data="corpus", corpus=["a b", 2]), TypeError,
                            "corpus item 1"),
}  # fmt: skip


@pytest.mark.parametrize("case", REFUSALS)
def test_refused_settings(models, case):
    kwargs, error, match = REFUSALS[case]
    kwargs = {"prompts": LOCKED, **kwargs}
    with pytest.raises(error, match=match):
        collect_alignment_stats(*models, progress=False, **kwargs)


def test_a_corpus_fit_needs_no_prompts(models):
    # fitted once per model pair, for any direction: the prompts are not run
    alone = collect_alignment_stats(*models, [], alignment_data="corpus", corpus=CORPUS,
                                    progress=False)  # fmt: skip
    with_prompts = collect_alignment_stats(
        *models, LOCKED, alignment_data="corpus", corpus=CORPUS, progress=False
    )
    assert alone.num_rows == len(CORPUS)
    assert alone.origin == with_prompts.origin
    for a, b in zip(alone.moments, with_prompts.moments, strict=True):
        torch.testing.assert_close(a.gram("xy"), b.gram("xy"), rtol=0, atol=0)


def test_refusals_through_transfer_and_for_a_missing_file(models, tmp_path):
    src, stok, tgt, ttok = models
    other = make_model("llama", len(stok), seed=5)
    with pytest.raises(ValueError, match="model contrast"):
        collect_transfer(
            src, stok, tgt, ttok, LOCKED, unlocked_model=other,
            alignment_data="locked+unlocked", progress=False,
        )  # fmt: skip
    with pytest.raises(ValueError, match="needs a corpus"):
        collect_transfer(*models, LOCKED, UNLOCKED, alignment_data="locked+corpus", progress=False)
    with pytest.raises(FileNotFoundError, match="no corpus file"):
        collect_alignment_stats(
            *models, LOCKED, alignment_data="corpus", corpus=tmp_path / "none.txt",
            progress=False,
        )  # fmt: skip
    # a model contrast with the paper's rows is fine
    _, stats = collect_transfer(src, stok, tgt, ttok, LOCKED, unlocked_model=other, progress=False)
    assert stats.origin["alignment_data"]["choice"] == "locked"


def test_corpus_from_a_file_and_generic(models, tmp_path):
    path = write_corpus(tmp_path / "c.jsonl", CORPUS)
    from_file = collect_alignment_stats(
        *models, LOCKED, alignment_data="corpus", corpus=path, corpus_limit=4, progress=False
    )
    record = from_file.origin["alignment_data"]
    assert record["corpus_source"] == str(path)
    assert record["corpus"] == 4
    assert record["corpus_hash"] == corpus_hash(CORPUS[:4])
    from_list = collect_alignment_stats(
        *models, LOCKED, alignment_data="corpus", corpus=CORPUS[:4], progress=False
    )
    for a, b in zip(from_file.moments, from_list.moments, strict=True):
        torch.testing.assert_close(a.gram("xy"), b.gram("xy"), rtol=0, atol=0)
    generic = collect_alignment_stats(
        *models, LOCKED, alignment_data="locked+corpus", corpus="generic", corpus_limit=3,
        progress=False,
    )  # fmt: skip
    record = generic.origin["alignment_data"]
    assert record["corpus_source"] == "generic_corpus(n=3, seed=0)"
    assert record["corpus_hash"] == corpus_hash(generic_corpus(3))
    assert generic.num_rows == len(LOCKED) + 3


def test_the_record_survives_save_and_load(models, tmp_path):
    direction, stats = collect_transfer(
        *models, LOCKED, UNLOCKED, alignment_data="locked+corpus", corpus=CORPUS, progress=False
    )
    record = stats.origin["alignment_data"]
    stats.save_pretrained(tmp_path / "stats")
    assert AlignmentStats.from_pretrained(tmp_path / "stats").origin["alignment_data"] == record
    alignment = stats.fit(rank=3)
    assert alignment.origin["alignment_data"] == record
    alignment.save_pretrained(tmp_path / "alignment")
    assert Alignment.from_pretrained(tmp_path / "alignment").origin["alignment_data"] == record
    key = alignment.transfer(direction)
    assert key.origin["alignment_data"] == record
    key.save_pretrained(tmp_path / "key")
    assert SteeringKey.from_pretrained(tmp_path / "key").origin["alignment_data"] == record
    # a damaged record is refused, naming the entry
    meta_file = tmp_path / "alignment" / "unlock.json"
    meta = json.loads(meta_file.read_text())
    meta["origin"]["alignment_data"]["choice"] = "everything"
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="origin.alignment_data.choice"):
        Alignment.from_pretrained(tmp_path / "alignment")
    meta_file = tmp_path / "key" / "unlock.json"
    meta = json.loads(meta_file.read_text())
    meta["origin"]["alignment_data"]["corpus"] = -1
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="origin.alignment_data.corpus"):
        SteeringKey.from_pretrained(tmp_path / "key")


def test_merging_statistics_keeps_the_record_honest(models):
    kw = dict(prompts_unlocked=UNLOCKED, progress=False)
    a = collect_alignment_stats(*models, LOCKED[:2], **{**kw, "prompts_unlocked": UNLOCKED[:2]})
    b = collect_alignment_stats(*models, LOCKED[2:], **{**kw, "prompts_unlocked": UNLOCKED[2:]})
    merged = a.merge(b)
    assert merged.origin["alignment_data"]["locked"] == len(LOCKED)
    assert merged.origin["alignment_data"]["items"] == merged.num_prompts == len(LOCKED)
    c = collect_alignment_stats(
        *models, LOCKED, alignment_data="corpus", corpus=CORPUS, progress=False
    )
    with pytest.raises(ValueError, match="different alignment data"):
        merged.merge(c)
    assert merged.num_prompts == len(LOCKED)  # refused before anything changed
    # a corpus streamed in two parts merges, and the record names both parts
    kw = dict(alignment_data="corpus", progress=False)
    parts = [collect_alignment_stats(*models, LOCKED, corpus=CORPUS[:3], **kw),
             collect_alignment_stats(*models, LOCKED, corpus=CORPUS[3:], **kw)]  # fmt: skip
    whole = collect_alignment_stats(*models, LOCKED, corpus=CORPUS, **kw)
    halves = [p.origin["alignment_data"]["corpus_hash"] for p in parts]
    joined = parts[0].merge(parts[1])
    record = joined.origin["alignment_data"]
    assert record["corpus"] == record["items"] == len(CORPUS) == joined.num_rows
    assert record["corpus_hash"] == "+".join(halves)
    for m, w in zip(joined.moments, whole.moments, strict=True):
        torch.testing.assert_close(m.gram("xy"), w.gram("xy"), rtol=1e-9, atol=1e-9)
    # the same corpus twice would count its rows twice
    with pytest.raises(ValueError, match="count its rows twice"):
        whole.merge(collect_alignment_stats(*models, LOCKED, corpus=CORPUS, **kw))
    assert whole.num_rows == len(CORPUS)


def test_old_artifacts_without_a_record_still_load(models, tmp_path):
    stats = collect_alignment_stats(*models, LOCKED, progress=False)
    stats.origin = {}
    stats.save_pretrained(tmp_path / "stats")
    meta_file = Path(tmp_path / "stats" / "unlock.json")
    meta = json.loads(meta_file.read_text())
    del meta["origin"]
    meta_file.write_text(json.dumps(meta))
    assert AlignmentStats.from_pretrained(tmp_path / "stats").origin == {}


# ------------------------------------------------------------------ the command line


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return save_pair(tmp_path_factory.mktemp("models"))


def cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main([*argv, "--no-progress"])
    return code, capsys.readouterr().err


def meta_record(folder: Path) -> dict[str, object]:
    return json.loads((folder / "unlock.json").read_text())["origin"]["alignment_data"]


def test_cli_transfer_with_the_generic_corpus(saved, tmp_path, capsys):
    out = tmp_path / "run"
    code, err = cli(
        ["transfer", "-s", saved["src"], "-t", saved["tgt"], "-o", str(out), "-n", "4",
         "--n-heldout", "2", "--rank", "2", "--batch-size", "3",
         "--alignment-data", "locked+corpus", "--corpus", "generic", "--corpus-limit", "5"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    record = meta_record(out / "key")
    assert record == meta_record(out / "alignment")
    assert record["choice"] == "locked+corpus"
    assert (record["locked"], record["corpus"], record["items"]) == (4, 5, 9)
    assert record["corpus_source"] == "generic_corpus(n=5, seed=0)"
    assert record["corpus_hash"] == corpus_hash(generic_corpus(5))


@pytest.mark.parametrize("choice", ["corpus", "locked+unlocked"])
def test_cli_align_with_a_corpus_file_or_the_unlocked_prompts(choice, saved, tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus.txt", CORPUS)
    out = tmp_path / "alignment"
    extra = ["--corpus", str(corpus)] if choice == "corpus" else []
    code, err = cli(
        ["align", "-s", saved["src"], "-t", saved["tgt"], "-o", str(out), "-n", "3",
         "--n-heldout", "2", "--rank", "2", "--alignment-data", choice, *extra],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    record = meta_record(out)
    assert record["choice"] == choice
    if choice == "corpus":
        assert (record["locked"], record["corpus"]) == (0, len(CORPUS))
        assert record["corpus_source"] == str(corpus)
    else:
        assert (record["locked"], record["unlocked"], record["items"]) == (3, 3, 6)
    # the held-out diagnostics stay on held-out problems, whatever the fit's rows
    diagnostics = json.loads((out / "diagnostics.json").read_text())
    assert diagnostics["num_rows"] == 2


@pytest.mark.filterwarnings("ignore::unlock_fast.estimator.RankClampedWarning")
def test_cli_evaluate_grid_with_alignment_data(saved, tmp_path, capsys):
    rep = tmp_path / "grid"
    code, err = cli(
        ["evaluate", "-t", saved["tgt"], "-s", saved["src"], "--ranks", "2", "--alphas", "0.1",
         "--ns", "2,3", "--n-train", "3", "--n-heldout", "2", "-n", "2",
         "--max-new-tokens", "2", "--conditions", "unlock", "-o", str(rep),
         "--alignment-data", "locked+unlocked"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert len(json.loads((rep / "report.json").read_text())["points"]) == 2


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["align", "--alignment-data", "corpus"], "needs --corpus FILE or --corpus generic"),
        (["transfer", "--corpus", "generic"], "not locked"),
        (["transfer", "--corpus-limit", "3"], "--corpus-limit needs --corpus"),
        (["align", "--alignment-data", "corpus", "--corpus", "{tmp}/none.txt"], "no corpus file"),
        (["evaluate", "--key", "k", "--alignment-data", "corpus", "--corpus", "generic"],
         "a --key was fitted already"),
        (["evaluate", "-s", "{src}", "--ns", "2,3", "--alignment-data", "corpus", "--corpus",
          "generic"], "give one N"),
    ],
)  # fmt: skip
def test_cli_alignment_data_mistakes(argv, message, saved, tmp_path, capsys):
    models = ["-s", saved["src"], "-t", saved["tgt"], "-o", str(tmp_path / "o")]
    if argv[0] == "evaluate":
        models = ["-t", saved["tgt"], "-o", str(tmp_path / "o")]
    argv = [a.format(tmp=tmp_path, src=saved["src"]) for a in argv]
    code, err = cli([argv[0], *models, *argv[1:]], capsys)
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1


def test_cli_demo_passes_the_alignment_data(monkeypatch, capsys):
    seen = {}
    monkeypatch.setattr(cli_demo, "run_demo", lambda cfg, **_: seen.update(cfg=cfg))
    argv = ["demo", "--quick", "--alignment-data", "locked+corpus", "--corpus", "generic"]
    code, err = cli([*argv, "--corpus-limit", "7"], capsys)
    assert code == 0, err
    cfg = seen["cfg"]
    assert (cfg.alignment_data, cfg.corpus, cfg.corpus_limit) == ("locked+corpus", "generic", 7)
    code, err = cli(["demo", "--alignment-data", "corpus"], capsys)
    assert code == 2
    assert "needs --corpus" in err


def test_cli_map_reuses_one_corpus_alignment_for_saved_directions(saved, tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus.txt", CORPUS)
    pair, direction, out = tmp_path / "pair", tmp_path / "cot", tmp_path / "key"
    code, err = cli(
        ["align", "-s", saved["src"], "-t", saved["tgt"], "-o", str(pair), "-n", "3",
         "--n-heldout", "2", "--rank", "2", "--alignment-data", "corpus", "--corpus",
         str(corpus)],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    code, err = cli(["extract", "-m", saved["src"], "-o", str(direction), "-n", "4"], capsys)
    assert code == 0, err
    assert main(["map", "-d", str(direction), "-a", str(pair), "-o", str(out)]) == 0
    key = SteeringKey.from_pretrained(out)
    want = Alignment.from_pretrained(pair).transfer(Direction.from_pretrained(direction))
    torch.testing.assert_close(key.vectors, want.vectors, rtol=0, atol=0)
    assert key.origin["alignment_data"]["corpus"] == len(CORPUS)
    # a direction of the Target, or an artifact of another kind, is refused in one line
    code, err = cli(["extract", "-m", saved["tgt"], "-o", str(tmp_path / "tcot"), "-n", "4"],
                    capsys)  # fmt: skip
    assert code == 0, err
    for argv, message in [
        (["-d", str(tmp_path / "tcot"), "-a", str(pair)], "this alignment's Source is"),
        (["-d", str(pair), "-a", str(pair)], "holds a saved Alignment, not a direction"),
        (["-d", str(direction), "-a", str(direction)], "holds a saved Direction, not an alignment"),
    ]:
        assert main(["map", *argv, "-o", str(tmp_path / "bad")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
