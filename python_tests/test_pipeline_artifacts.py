"""Saving and loading directions, alignments and keys (safetensors + JSON, no pickle)."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import PROMPTS, bpe_tokenizer, make_model, word_tokenizer

import unlock_fast
from unlock_fast import (
    Alignment,
    AlignmentStats,
    Direction,
    SteeringKey,
    collect_alignment_stats,
    extract_direction,
    load_artifact,
    steer,
)

COT = [p + " Answer: Let's think step by step." for p in PROMPTS]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipeline():
    stok, ttok = word_tokenizer(), bpe_tokenizer()
    src, tgt = make_model("llama", len(stok)), make_model("qwen2", len(ttok), seed=1)
    direction = extract_direction(src, stok, PROMPTS, COT, progress=False)
    stats = collect_alignment_stats(src, stok, tgt, ttok, PROMPTS, progress=False)
    return dict(src=src, tgt=tgt, stok=stok, ttok=ttok, direction=direction, stats=stats)


@pytest.mark.parametrize("centered", [False, True])
def test_round_trips(tmp_path, pipeline, centered):
    d, stats = pipeline["direction"], pipeline["stats"]
    alignment = stats.fit(rank=5, centered=centered)
    key = alignment.transfer(d)
    for name, obj in (("d", d), ("a", alignment), ("k", key)):
        obj.save_pretrained(tmp_path / name)
        files = sorted(p.name for p in (tmp_path / name).iterdir())
        assert files == ["tensors.safetensors", "unlock.json"]
        meta = json.loads((tmp_path / name / "unlock.json").read_text())
        assert meta["library_version"] == unlock_fast.__version__
    d2 = Direction.from_pretrained(tmp_path / "d", pipeline["src"])
    a2 = Alignment.from_pretrained(tmp_path / "a", pipeline["src"], pipeline["tgt"])
    k2 = SteeringKey.from_pretrained(tmp_path / "k", pipeline["tgt"])
    assert torch.equal(d2.vectors, d.vectors)
    assert d2.layers == d.layers
    assert a2.layer_map == alignment.layer_map
    assert a2.centered == centered
    assert torch.equal(a2.matrix(3), alignment.matrix(3))
    assert torch.equal(k2.vectors, key.vectors)
    assert k2.origin == key.origin
    torch.testing.assert_close(a2.transfer(d2).vectors, key.vectors, atol=1e-7, rtol=1e-6)
    assert isinstance(load_artifact(tmp_path / "a"), Alignment)
    assert isinstance(load_artifact(tmp_path / "k"), SteeringKey)
    assert isinstance(load_artifact(tmp_path / "d"), Direction)
    meta = json.loads((tmp_path / "a" / "unlock.json").read_text())
    assert meta["source"]["hidden_size"] == 32
    assert meta["target"]["hidden_size"] == 48
    assert meta["num_rows"] == len(PROMPTS)
    assert meta["k"] == 5


def test_mismatched_artifacts_are_refused(tmp_path, pipeline):
    key = pipeline["stats"].fit(rank=4).transfer(pipeline["direction"])
    key.save_pretrained(tmp_path / "k")
    with pytest.raises(ValueError, match="hidden size"):
        SteeringKey.from_pretrained(tmp_path / "k", pipeline["src"])
    with pytest.raises(ValueError, match="'steering_key' artifact, expected 'direction'"):
        Direction.from_pretrained(tmp_path / "k")
    same_shape = make_model("qwen2", len(pipeline["ttok"]))
    same_shape.config.rope_theta = 1234.0
    with pytest.raises(ValueError, match="fingerprint"):
        SteeringKey.from_pretrained(tmp_path / "k", same_shape)
    with pytest.raises(ValueError, match="fingerprint"):
        steer(same_shape, key)
    SteeringKey.from_pretrained(tmp_path / "k", same_shape, check_fingerprint=False)
    # metadata that disagrees with the tensors
    meta_file = tmp_path / "k" / "unlock.json"
    meta = json.loads(meta_file.read_text())
    meta["layers"] = meta["layers"][:-1]
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="shape"):
        SteeringKey.from_pretrained(tmp_path / "k")
    with pytest.raises(FileNotFoundError, match="not an unlock-fast artifact"):
        load_artifact(tmp_path / "missing")


def test_transfer_refuses_direction_of_another_source(pipeline):
    alignment = pipeline["stats"].fit(rank=4)
    other = make_model("llama", len(pipeline["stok"]))
    other.config.rope_theta = 99.0
    d = extract_direction(other, pipeline["stok"], PROMPTS[:3], COT[:3], progress=False)
    with pytest.raises(ValueError, match="fingerprint"):
        alignment.transfer(d)
    assert alignment.transfer(d, check_fingerprint=False).vectors.shape == (5, 48)


def test_alignment_stats_round_trip(tmp_path, pipeline):
    stats = pipeline["stats"]
    stats.save_pretrained(tmp_path / "s")
    back = AlignmentStats.from_pretrained(tmp_path / "s")
    assert back.layer_map == stats.layer_map
    assert back.num_rows == stats.num_rows
    assert torch.equal(back.fit(rank=4).matrix(2), stats.fit(rank=4).matrix(2))
    assert isinstance(load_artifact(tmp_path / "s"), AlignmentStats)
    for obj in (stats, back.fit(rank=4), pipeline["direction"]):
        assert "tensor(" not in repr(obj)
