"""llama.cpp control vectors: the file layout llama.cpp reads, and the steering it means."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from tiny_models import PROMPTS, make_model, word_tokenizer

from unlock_fast import ModelInfo, SteeringKey, steer
from unlock_fast.cli import main
from unlock_fast.export import read_control_vector, to_llamacpp
from unlock_fast.layers import decoder_layers

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_and_key():
    tok = word_tokenizer()
    model = make_model("llama", len(tok))
    info = ModelInfo.of(model)
    gen = torch.Generator().manual_seed(0)
    vectors = torch.randn(info.num_layers, info.hidden_size, generator=gen)
    return model, tok, SteeringKey(vectors, list(range(info.num_layers)), info)


def test_file_holds_what_llamacpp_reads(tmp_path, model_and_key):
    _, _, key = model_and_key
    out = to_llamacpp(key, tmp_path / "cv.gguf", alpha=0.25, model_hint="llama")
    assert out.dropped_layers == [0]
    assert out.layers == list(range(1, key.model.num_layers))
    assert "layer 0" in out.note
    reader = gguf.GGUFReader(str(out.path))
    arch = reader.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "controlvector"
    count = reader.fields["controlvector.layer_count"]
    assert int(count.parts[count.data[0]][0]) == key.model.num_layers - 1
    names = sorted(t.name for t in reader.tensors)
    assert names == sorted(f"direction.{i}" for i in range(1, key.model.num_layers))
    for t in reader.tensors:
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        assert int(np.prod(t.shape)) == key.model.hidden_size
    hint, vectors = read_control_vector(out.path)
    assert hint == "llama"
    for layer, v in vectors.items():
        np.testing.assert_allclose(v, 0.25 * key.vector(layer).numpy(), rtol=1e-6)


def test_adding_the_file_per_block_equals_steer_add_all(tmp_path, model_and_key):
    """What llama.cpp does with the file (add tensor N to block N's output at every token)
    equals steer(mode='add', positions='all') on layers 1..L-1."""
    model, tok, key = model_and_key
    _, vectors = read_control_vector(to_llamacpp(key, tmp_path / "cv.gguf", alpha=0.3).path)
    enc = tok(PROMPTS[:3], return_tensors="pt", padding=True)
    blocks = decoder_layers(model)

    def adder(v: torch.Tensor):
        def hook(_module, _args, output):
            return (output[0] + v, *output[1:]) if isinstance(output, tuple) else output + v

        return hook

    hooks = [
        blocks[n].register_forward_hook(adder(torch.from_numpy(v))) for n, v in vectors.items()
    ]
    try:
        with torch.inference_mode():
            by_file = model(**enc).logits
    finally:
        for h in hooks:
            h.remove()
    layers = sorted(vectors)
    with torch.inference_mode(), steer(model, key, 0.3, mode="add", positions="all", layers=layers):
        by_steer = model(**enc).logits
    real = enc["attention_mask"].bool()  # steer() leaves padding alone; llama.cpp has none
    torch.testing.assert_close(by_file[real], by_steer[real], atol=1e-5, rtol=1e-5)


def test_bad_input_is_refused_and_writes_nothing(tmp_path, model_and_key):
    _, _, key = model_and_key
    with pytest.raises(ValueError, match="alpha"):
        to_llamacpp(key, tmp_path / "a.gguf", alpha=float("nan"))
    with pytest.raises(TypeError, match="SteeringKey"):
        to_llamacpp(key.vectors, tmp_path / "a.gguf", alpha=0.1)  # type: ignore[arg-type]
    only0 = SteeringKey(key.vectors[:1], [0], key.model)
    with pytest.raises(ValueError, match="only layer 0"):
        to_llamacpp(only0, tmp_path / "a.gguf", alpha=0.1)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "x.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="GGUF"):
        read_control_vector(tmp_path / "x.gguf")


def test_cli_export(tmp_path, capsys, model_and_key):
    _, _, key = model_and_key
    key.save_pretrained(tmp_path / "key")
    args = ["export", "--to", "gguf", str(tmp_path / "key"), str(tmp_path / "k.gguf")]
    assert main([*args, "--alpha", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "add" in out
    assert "wrote" in out
    _, vectors = read_control_vector(tmp_path / "k.gguf")
    assert sorted(vectors) == list(range(1, key.model.num_layers))
    assert main(["export", str(tmp_path / "nope"), str(tmp_path / "n.gguf"), "--alpha", "1"]) == 2


def test_repeng_reads_the_file(tmp_path, model_and_key):
    repeng = pytest.importorskip("repeng")
    _, _, key = model_and_key
    path = to_llamacpp(key, tmp_path / "cv.gguf", alpha=1.0).path
    cv = repeng.ControlVector.import_gguf(str(path))
    assert sorted(cv.directions) == list(range(1, key.model.num_layers))
    np.testing.assert_allclose(cv.directions[2], key.vector(2).numpy(), rtol=1e-6)
