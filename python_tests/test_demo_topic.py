"""The demo's topic part: the word-list measure, the splits, the null keys, and the whole part
on tiny random models (its report entries, on its own and inside the demo)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tiny_models import bpe_tokenizer, make_model, save_pair, word_tokenizer

from unlock_fast import SteeringKey, collect_alignment_stats, steer
from unlock_fast.demo import QUICK, run_demo
from unlock_fast.demo.topic import (
    TopicConfig,
    mapped_random_keys,
    run_topic,
)
from unlock_fast.demo.topic_cli import main as topic_main
from unlock_fast.demo.topic_items import (
    FRAMES,
    OCEAN,
    STARTS,
    TopicItem,
    TopicSpec,
    on_topic,
    prompts,
    topic_items,
    topic_splits,
)
from unlock_fast.evaluation.conditions import Runner


@pytest.mark.parametrize(
    "text",
    [
        " ocean is deep.",
        " walked along the BEACH",
        " saw a Whale, then left.",
        " a deep-sea fish swam by.",
        " liked the sea.\nThen nothing.",
        " waves, waves and more waves",
        " sailed the Pacific",
    ],
)
def test_on_topic_counts_list_words_in_the_first_line(text: str) -> None:
    assert on_topic(text)


@pytest.mark.parametrize(
    "text",
    [
        " went home after school.",
        " loved the season.",  # "sea" inside a word
        " studied oceanography",  # a longer word that starts with a list word
        " collected seashores",  # a form the list does not hold
        " ate lunch.\nThe ocean was calm.",  # the topic only after the first line
        "\nocean",
        "",
    ],
)
def test_on_topic_ignores_other_words_and_later_lines(text: str) -> None:
    assert not on_topic(text)


def test_topic_spec_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="lower-case"):
        TopicSpec("x", "x", ("Ocean",))
    with pytest.raises(ValueError, match="phrase"):
        TopicSpec("x", " ", ("ocean",))
    with pytest.raises(TypeError, match="str"):
        on_topic(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no item"):
        TopicItem(len(FRAMES), 0)


def test_item_forms_differ_only_by_the_topic_and_end_in_the_start() -> None:
    item = TopicItem(2, 13)
    locked, unlocked = item.prompt(), item.prompt(OCEAN)
    assert locked == "Write a short sentence.\nYesterday,"
    assert unlocked == "Write a short sentence about the ocean.\nYesterday,"
    assert len(topic_items()) == len(FRAMES) * len(STARTS) == 400
    assert len({it.id for it in topic_items()}) == 400
    assert all(not OCEAN.matches(p) for p in prompts(topic_items()))  # locked forms: no topic


def test_splits_are_deterministic_disjoint_and_nested() -> None:
    sizes = {"train": 64, "heldout": 32, "test": 200}
    a, b = topic_splits(sizes, seed=0), topic_splits(sizes, seed=0)
    assert a == b
    assert [len(a[k]) for k in ("train", "heldout", "test")] == [64, 32, 200]
    ids = [{it.id for it in a[k]} for k in ("train", "heldout", "test")]
    assert sum(map(len, ids)) == len(set.union(*ids)) == 296
    # a smaller run's test items are among a larger run's, and never in its train split
    small = topic_splits({"train": 16, "heldout": 8, "test": 48}, seed=0)
    assert {it.id for it in small["test"]} <= ids[2]
    assert not {it.id for it in small["test"]} & ids[0]
    assert topic_splits(sizes, seed=1)["test"] != a["test"]


@pytest.mark.parametrize(
    ("sizes", "match"),
    [
        ({"train": 300, "heldout": 50, "test": 60}, "there are 400"),
        ({"train": -1}, "ints >= 0"),
        ({"dev": 4}, "split names"),
        ({"train": 2.5}, "ints >= 0"),
    ],
)
def test_splits_refuse_bad_sizes(sizes: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        topic_splits(sizes)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (dict(alignment_data=("paper",)), "alignment_data"),
        (dict(alignment_data=()), "alignment_data"),
        (dict(alignment_data=("locked", "locked")), "twice"),
        (dict(topic="space"), "topic"),
        (dict(ranks=(0,)), "ranks"),
        (dict(alphas=(0.0,)), "alphas"),
        (dict(own_alpha=-0.1), "own_alpha"),
        (dict(n_test=0), "n_test"),
        (dict(random_keys=-1), "random_keys"),
        (dict(n_heldout=0, alphas=(0.1, 0.2)), "n_heldout"),
    ],
)
def test_config_refuses_bad_settings(change: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TopicConfig(**change)


def _pair() -> tuple[Runner, Runner]:
    st, tt = bpe_tokenizer(), word_tokenizer()
    sm = make_model("llama", len(st), hidden=32, layers=3)
    tm = make_model("qwen2", len(tt), hidden=48, layers=5, seed=2)
    return Runner(sm, st, progress=False), Runner(tm, tt, progress=False)


def test_random_keys_via_the_map_have_the_keys_norms_and_lie_in_its_image() -> None:
    source, target = _pair()
    texts = prompts(topic_items()[:12])
    stats = collect_alignment_stats(
        source.model, source.tokenizer, target.model, target.tokenizer, texts, progress=False
    )
    alignment = stats.fit(rank=4)
    like = SteeringKey.random_like(
        SteeringKey(torch.ones(5, 48), list(range(5)), alignment.target), seed=7
    ).scale(3.0)
    keys = mapped_random_keys(alignment, like, 3, seed=5)
    assert len(keys) == 3
    for k in keys:
        torch.testing.assert_close(k.vectors.norm(dim=-1), like.vectors.norm(dim=-1))
    assert not torch.allclose(keys[0].vectors, keys[1].vectors)
    # seed 5 + 1: the map of that Gaussian Source direction, rescaled
    layers = sorted({s for s, _ in alignment.layer_map})
    noise = torch.randn(len(layers), 32, generator=torch.Generator().manual_seed(6))
    for i, (s, t) in enumerate(alignment.layer_map):
        mapped = alignment.map_directions(noise[layers.index(s)][None], t)[0]
        cos = torch.nn.functional.cosine_similarity(mapped, keys[1].vectors[i], dim=0)
        assert cos.item() == pytest.approx(1.0, abs=1e-5)


def test_the_topic_part_runs_end_to_end_on_tiny_models() -> None:
    source, target = _pair()
    cfg = TopicConfig(
        n_train=6, n_heldout=3, n_test=4, alignment_data=("locked+corpus", "locked"),
        corpus_size=12, ranks=(2, 4, 64), alphas=(0.1, 0.5), select_random=2, random_keys=3,
        null_contrasts=2, num_random=10, max_new_tokens=3,
    )  # fmt: skip
    seen = []
    result = run_topic(source, target, cfg, checkpoint=lambda r: seen.append(len(r.choices)))
    assert seen[-1] == 2
    assert seen[0] == 0
    names = [c.name for c in result.conditions]
    assert names[:2] == ["unsteered", "own"]
    assert len(names) == 2 + 2 * (1 + 3 + 2) == len(set(names))
    assert result.corpus_rows == 12
    # several alphas: the own direction's alpha is chosen on held-out items too
    assert {r["alpha"] for r in result.own_selection} == {0.1, 0.5}
    assert result.own.alpha in (0.1, 0.5)
    for data, ch in result.choices.items():
        # every candidate of the grid was scored on held-out items: ranks 2, 4, and the
        # rows' ceiling (64 names it: 6 locked rows give k = 6, 18 rows give k = 18)
        assert {(r["rank"], r["alpha"]) for r in ch.selection} == {
            (r, a) for r in (2, 4, 64) for a in (0.1, 0.5)
        }
        best = max(r["score"] for r in ch.selection)
        assert any(
            (r["rank"], r["alpha"]) == (ch.rank, ch.alpha) and r["score"] == best
            for r in ch.selection
        )
        assert ch.num_rows == {"locked": 6, "locked+corpus": 18}[data]
        rates = [c.rate for c in ch.random]
        want = (1 + sum(r >= ch.key.rate for r in rates)) / (1 + len(rates))
        assert ch.p_random == pytest.approx(want)
        assert len(ch.cosine.layers) == 5
    for cond in result.conditions:
        assert len(cond.items) == 4
        assert all(it.on_topic == on_topic(it.output) for it in cond.items)
    # the unsteered outputs are plain greedy generation; the key's, generation under steer()
    tok, model = target.tokenizer, target.model
    ch = result.choices["locked+corpus"]
    assert ch.steering_key is not None
    assert ch.steering_key.origin["k"] == ch.k
    record = ch.steering_key.origin["alignment_data"]
    assert record["choice"] == "locked+corpus"
    assert record["locked"] + record["corpus"] == record["items"] == result.corpus_rows + 6
    for cond, key in ((result.unsteered, None), (ch.key, ch.steering_key)):
        enc = tok([it.prompt for it in cond.items], return_tensors="pt", padding=True,
                  padding_side="left")  # fmt: skip
        gen = dict(max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
        with torch.inference_mode():
            if key is None:
                seqs = model.generate(**enc, **gen)
            else:
                with steer(model, key, alpha=ch.alpha):
                    seqs = model.generate(**enc, **gen)
        for it, row in zip(cond.items, seqs[:, enc["input_ids"].shape[1] :], strict=True):
            assert tok.decode(row[: it.num_tokens], skip_special_tokens=True) == it.output


def test_topic_cli_writes_its_report(tmp_path: Path) -> None:
    dirs = save_pair(
        tmp_path, target_arch="qwen2", target_hidden=48, target_layers=5, target_seed=2
    )
    out = tmp_path / "report"
    argv = [
        "--out", str(out), "--source", dirs["src"], "--target", dirs["tgt"], "--n-train", "6",
        "--n-heldout", "0", "--n-test", "3", "--alignment-data", "corpus,locked",
        "--corpus-size", "8", "--ranks", "4", "--alphas", "0.3", "--random-keys", "2",
        "--null-contrasts", "1", "--num-random", "10", "--max-new-tokens", "2", "--threads", "1",
        "--no-progress",
    ]  # fmt: skip
    assert topic_main(argv) == 0
    data = json.loads((out / "report.json").read_text())
    assert list(data["choices"]) == ["corpus", "locked"]
    assert data["choices"]["corpus"]["num_rows"] == 8
    assert data["choices"]["locked"]["selection"] == []  # one candidate: nothing to choose
    assert data["choices"]["locked"]["alpha"] == 0.3
    assert data["own"]["alpha"] == 0.1  # own_alpha, not the key's alpha
    items = [json.loads(x) for x in (out / "items.jsonl").read_text().splitlines()]
    assert len(items) == 3 * (2 + 2 * (1 + 2 + 1))
    assert {it["family"] for it in items} == {"unsteered", "own", "key", "random", "null_contrast"}
    assert (out / "topic_rates.png").read_bytes()[:4] == b"\x89PNG"
    assert "Topic transfer: ocean" in (out / "report.md").read_text()


def test_topic_cli_refuses_bad_alignment_data(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        topic_main(["--out", str(tmp_path), "--alignment-data", "paper"])
    assert exc.value.code == 2


def test_the_demo_writes_the_topic_part_into_its_report(tmp_path: Path) -> None:
    dirs = save_pair(
        tmp_path, target_arch="qwen2", target_hidden=48, target_layers=5, target_seed=2
    )
    topic = replace(QUICK.topic_config, n_train=6, n_test=3, max_new_tokens=2, ranks=(4,),
                    num_random=10)  # fmt: skip
    cfg = replace(
        QUICK, source=dirs["src"], target=dirs["tgt"], n_train=6, n_heldout=4, n_test=3,
        max_new_tokens=2, rank=4, sweep_ranks=(1, 4), num_random=20, topic_config=topic,
    )  # fmt: skip
    out = tmp_path / "report"
    result = run_demo(cfg, out=out, progress=False, echo=False)
    assert result.topic is not None
    data = json.loads((out / "report.json").read_text())
    assert data["topic"]["unsteered"]["n"] == 3
    assert list(data["topic"]["choices"]) == list(topic.alignment_data)
    assert "topic" in data["timings_s"]
    md = (out / "report.md").read_text()
    assert "## Topic transfer: ocean" in md
    assert md.index("## Topic") < md.index("## Time")
    lines = (out / "topic_items.jsonl").read_text().splitlines()
    assert len(lines) == 3 * (2 + 1 + topic.random_keys + topic.null_contrasts)
    assert len((out / "items.jsonl").read_text().splitlines()) == 4 * 3  # the CoT part's own
    assert (out / "topic_rates.png").is_file()
    # and without it
    run_demo(replace(cfg, topic=False), out=tmp_path / "plain", progress=False, echo=False)
    assert json.loads((tmp_path / "plain" / "report.json").read_text())["topic"] is None
    assert not (tmp_path / "plain" / "topic_items.jsonl").exists()
