"""The generic corpus (plain prose made offline) and corpus files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from unlock_fast.cli import main
from unlock_fast.corpus import (
    available_sentences,
    corpus_hash,
    generic_corpus,
    read_corpus,
    write_corpus,
)

CODE_MARKS = (">>>", "`", "(", ")", "[", "]", "{", "}", "=", "_", "*", "#", "<", ">", "\\", "/")


@pytest.fixture(scope="module")
def big() -> list[str]:
    return generic_corpus(8192)


def test_at_least_8192_distinct_sentences(big: list[str]) -> None:
    assert available_sentences() >= 8192
    assert len(big) == 8192
    assert len(set(big)) == 8192


def test_sentences_look_like_prose(big: list[str]) -> None:
    for s in big:
        assert 10 <= len(s.split()) <= 40, s
        assert s[0].isupper(), s
        assert s.endswith("."), s
        assert not any(mark in s for mark in CODE_MARKS), s
        assert not re.search(r"\d", s), s
        assert " ".join(s.split()) == s, s
        assert not re.search(r"\b[a-z]+[A-Z]", s), s  # camelCase: an identifier
        assert not re.search(r"\b(XXX|TODO|FIXME)\b", s), s  # notes to programmers
        words = s[:-1].split()
        assert all(re.fullmatch(r"[A-Za-z]+(['-][A-Za-z]+)*[,;]?", w) for w in words), s


def test_deterministic_for_a_seed() -> None:
    assert generic_corpus(64, seed=3) == generic_corpus(64, seed=3)
    assert generic_corpus(64, seed=3) != generic_corpus(64, seed=4)
    assert generic_corpus(10, seed=3) == generic_corpus(64, seed=3)[:10]  # a prefix


def test_past_the_standard_library(big: list[str]) -> None:
    n = available_sentences()
    head = generic_corpus(n, seed=1)
    assert len(set(head)) == n
    assert sorted(head) == sorted(generic_corpus(n, seed=2))  # everything, in another order
    assert set(big) <= set(head)


def test_too_many_names_the_maximum() -> None:
    n = available_sentences()
    with pytest.raises(ValueError, match=f"at most {n}"):
        generic_corpus(n + 1)
    with pytest.raises(ValueError, match="at least 1"):
        generic_corpus(0)
    with pytest.raises(TypeError, match="n must be an int"):
        generic_corpus(3.0)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["c.txt", "c.jsonl"])
def test_round_trip(name: str, tmp_path: Path) -> None:
    texts = generic_corpus(20, seed=5)
    path = write_corpus(tmp_path / name, texts)
    assert list(read_corpus(path)) == texts
    assert list(read_corpus(path, start=5, limit=3)) == texts[5:8]
    assert list(read_corpus(path, start=15, limit=100)) == texts[15:]
    assert corpus_hash(read_corpus(path)) == corpus_hash(texts) != corpus_hash(texts[1:])
    if name.endswith(".jsonl"):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert rows == [{"text": t} for t in texts]
    else:
        assert path.read_text().splitlines() == texts


def test_jsonl_other_field_and_line_breaks(tmp_path: Path) -> None:
    texts = ["one line", "two\nlines"]
    path = write_corpus(tmp_path / "c.jsonl", texts, field="body")
    assert list(read_corpus(path, field="body")) == texts
    with pytest.raises(ValueError, match="line break"):
        write_corpus(tmp_path / "c.txt", texts)
    with pytest.raises(ValueError, match="no sentences"):
        write_corpus(tmp_path / "c.txt", [])
    with pytest.raises(TypeError, match="item 1"):
        write_corpus(tmp_path / "c.txt", ["a", 2])  # type: ignore[list-item]


def test_read_streams(tmp_path: Path) -> None:
    path = write_corpus(tmp_path / "c.txt", ["first", "second"])
    items = read_corpus(path)
    assert next(items) == "first"  # an iterator, not a list
    path.write_text("first\n\n  \nsecond\n")  # blank lines are skipped
    assert list(read_corpus(path)) == ["first", "second"]


def test_read_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no corpus file"):
        read_corpus(tmp_path / "missing.txt")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="is empty"):
        list(read_corpus(empty))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        list(read_corpus(bad))
    other = tmp_path / "other.jsonl"
    other.write_text('{"text": "fine"}\n\n{"question": "q"}\n')
    with pytest.raises(ValueError, match=r"line 3 has no 'text' field \(it has: question\)"):
        list(read_corpus(other))
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('["text"]\n')
    with pytest.raises(ValueError, match="line 1 is a JSON list"):
        list(read_corpus(wrong))
    short = write_corpus(tmp_path / "short.txt", ["a", "b"])
    with pytest.raises(ValueError, match="none after start=2"):
        list(read_corpus(short, start=2))
    with pytest.raises(ValueError, match="limit must be at least 1"):
        read_corpus(short, limit=0)
    with pytest.raises(ValueError, match="start must be 0 or more"):
        read_corpus(short, start=-1)


@pytest.mark.parametrize("name", ["out.txt", "out.jsonl"])
def test_cli_writes_the_corpus(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / name
    assert main(["corpus", "-o", str(out), "-n", "12", "--seed", "7", "--no-progress"]) == 0
    assert "wrote 12 sentences" in capsys.readouterr().out
    assert list(read_corpus(out)) == generic_corpus(12, seed=7)
    assert main(["corpus", "-o", str(out), "-n", "99999999", "--no-progress"]) == 2
    assert "at most" in capsys.readouterr().err
