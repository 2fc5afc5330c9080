"""A generic text corpus, made offline, and corpus files (plain text or JSONL).

The alignment map can be fitted on text that never shows the capability. ``generic_corpus``
makes such text without a network and without any topic vocabulary: plain English sentences
taken from the prose that ships with Python (the reference text of ``pydoc``, the docstrings
and comments of the standard library's sources) and, for larger corpora, from the docstrings
and comments of the packages the core already depends on (transformers, torch, numpy,
safetensors). Sources are read as text, never imported. A sentence is kept when it looks like
prose: it starts with a capital letter, ends with a period, has 10 to 40 words, and every word
is letters (an inner apostrophe or hyphen, a trailing comma or semicolon allowed) with no
identifier casing: no code, markup, numbers, brackets or paths. Licence headers are
left out.

``write_corpus`` and ``read_corpus`` store a list of texts one per line, as plain text or, for a
``.jsonl`` file, as JSON objects with a text field; ``read_corpus`` streams.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import inspect
import json
import os
import random
import re
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path

__all__ = [
    "CORPUS_PACKAGES",
    "GENERIC_SIZE",
    "available_sentences",
    "corpus_hash",
    "generic_corpus",
    "is_jsonl",
    "read_corpus",
    "write_corpus",
]

# Packages the core depends on, read (never imported) once the standard library runs out.
CORPUS_PACKAGES = ("transformers", "torch", "numpy", "safetensors")
MIN_WORDS, MAX_WORDS = 10, 40
# Sentences of a generic corpus when no size is given (``unlock-fast corpus``, ``"generic"``).
GENERIC_SIZE = 1024

# Folders whose text is tests, demos or vendored code, not the library's own prose.
_SKIP_DIRS = frozenset(
    {
        "site-packages",
        "dist-packages",
        "test",
        "tests",
        "testing",
        "idlelib",
        "tkinter",
        "turtledemo",
        "lib2to3",
        "ensurepip",
        "distutils",
        "_vendor",
        "__pycache__",
    }
)
_TRIPLE = re.compile(r'"""(.*?)"""|\'\'\'(.*?)\'\'\'', re.S)
_COMMENTS = re.compile(r"(?:^[ \t]*#[^\n]*\n)+", re.M)
_PARAGRAPHS = re.compile(r"\n[ \t]*\n")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
# A word of prose: letters, an inner apostrophe or hyphen, then at most a comma or semicolon.
_WORD = re.compile(r"[A-Za-z]+(?:['-][A-Za-z]+)*[,;]?")
# Words that mark a note to programmers, not prose.
_MARKERS = frozenset({"XXX", "TODO", "FIXME", "HACK", "NB"})
_QUOTES = str.maketrans({"\u2019": "'", "\u2018": "'"})
# A licence header is legal text, not prose: its blocks are left out whole.
_LEGAL = re.compile(r"copyright|licen[cs]e|warrant", re.I)


def _looks_like_prose(sentence: str) -> bool:
    """A plain English sentence: capital first, period last, 10 to 40 words of letters,
    mostly lower case, no identifier spelled in camel case (``TypeError``, ``getValue``)."""
    if not (sentence[:1].isupper() and sentence.endswith(".")) or sentence.endswith(".."):
        return False
    words = sentence[:-1].split()
    if not MIN_WORDS <= len(words) <= MAX_WORDS:
        return False
    lower = 0
    for word in words:
        if not _WORD.fullmatch(word):
            return False
        letters = word.rstrip(",;")
        if letters in _MARKERS:
            return False
        if letters.islower():
            lower += 1
        elif not (letters.isupper() or letters[1:].islower()):
            return False  # camel case: an identifier
    return lower >= 0.75 * len(words)


def _sentences(text: str) -> Iterator[str]:
    """The prose sentences of a block of text (a docstring, a comment, a help topic)."""
    if _LEGAL.search(text):
        return
    for paragraph in _PARAGRAPHS.split(text.translate(_QUOTES)):
        joined = " ".join(line.strip() for line in paragraph.splitlines())
        for sentence in _SENTENCE_END.split(joined):
            sentence = " ".join(sentence.split())
            if _looks_like_prose(sentence):
                yield sentence


def _source_texts(source: str) -> Iterator[str]:
    """The docstrings (any triple-quoted string) and comment blocks of a Python source."""
    for match in _TRIPLE.finditer(source):
        yield inspect.cleandoc(match.group(1) or match.group(2) or "")
    for match in _COMMENTS.finditer(source):
        yield "\n".join(line.strip().lstrip("#").strip() for line in match.group(0).splitlines())


def _tree_sentences(root: Path) -> set[str]:
    """Every prose sentence of the ``.py`` files under ``root``, tests and vendored code
    left out; files are read in sorted order and not imported."""
    out: set[str] = set()
    if not root.is_dir():
        return out
    for path in sorted(root.rglob("*.py")):
        if _SKIP_DIRS.intersection(path.relative_to(root).parts[:-1]):
            continue
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        for text in _source_texts(source):
            out.update(_sentences(text))
    return out


@functools.cache
def _stdlib_pool() -> tuple[str, ...]:
    """The standard library's prose sentences, sorted: pydoc's reference topics, then the
    docstrings and comments of the library's sources."""
    out: set[str] = set()
    try:
        from pydoc_data import topics  # plain data: the reference manual's text

        for text in topics.topics.values():
            out.update(_sentences(text))
    except ImportError:  # a Python without pydoc_data still has its sources
        pass
    out |= _tree_sentences(Path(sysconfig.get_paths()["stdlib"]))
    return tuple(sorted(out))


@functools.cache
def _package_pool() -> tuple[str, ...]:
    """The prose sentences of ``CORPUS_PACKAGES`` that the standard library lacks, sorted."""
    out: set[str] = set()
    for name in CORPUS_PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin is not None:
            out |= _tree_sentences(Path(spec.origin).parent)
    return tuple(sorted(out.difference(_stdlib_pool())))


def available_sentences() -> int:
    """How many distinct sentences ``generic_corpus`` can make on this installation."""
    return len(_stdlib_pool()) + len(_package_pool())


def generic_corpus(n: int, *, seed: int = 0) -> list[str]:
    """``n`` distinct plain English sentences of ordinary prose (10 to 40 words each), made
    offline and with no topic vocabulary: data that never shows a capability.

    The standard library's sentences come first, in an order drawn from ``seed``; past them,
    the sentences of the packages the core depends on follow, in an order drawn from the
    same generator. The result is deterministic for a seed on a given installation (another
    Python or package version has other docstrings). At least 8192 sentences are available
    on a stock Python 3.10 to 3.12 with the core's dependencies; a larger ``n`` than
    ``available_sentences()`` raises ValueError naming that maximum.
    """
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"generic_corpus: n must be an int, got {type(n).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"generic_corpus: seed must be an int, got {type(seed).__name__}")
    if n < 1:
        raise ValueError(f"generic_corpus: n must be at least 1, got {n}")
    rng = random.Random(seed)
    first = list(_stdlib_pool())
    rng.shuffle(first)
    if n <= len(first):
        return first[:n]
    rest = list(_package_pool())
    if n > len(first) + len(rest):
        raise ValueError(
            f"generic_corpus: n={n} is more than the {len(first) + len(rest)} distinct "
            "sentences this installation's standard library and packages "
            f"({', '.join(CORPUS_PACKAGES)}) provide; ask for at most {len(first) + len(rest)}"
        )
    rng.shuffle(rest)
    return first + rest[: n - len(first)]


def corpus_hash(texts: Iterable[str]) -> str:
    """A short fingerprint of a list of texts (12 hex digits of the SHA-256 of the texts,
    each followed by a newline): equal lists, equal hashes."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()[:12]


# ------------------------------------------------------------------------------ files


def is_jsonl(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names a JSONL file (by its suffix); any other name is plain text."""
    return Path(path).suffix.lower() == ".jsonl"


def write_corpus(
    path: str | os.PathLike[str], sentences: Iterable[str], *, field: str = "text"
) -> Path:
    """Write ``sentences`` one per line: as ``{field: text}`` JSON objects when ``path`` ends
    in ``.jsonl``, else as plain text (where a text may not hold a line break). The file is
    written next to its place and then moved there, so a failure leaves no half file.
    Returns the path."""
    out = Path(path)
    jsonl = is_jsonl(out)
    lines = []
    for i, text in enumerate(sentences):
        if not isinstance(text, str):
            raise TypeError(f"write_corpus: item {i} is a {type(text).__name__}, not a str")
        if not text.strip():
            raise ValueError(f"write_corpus: item {i} is empty")
        if not jsonl and ("\n" in text or "\r" in text):
            raise ValueError(
                f"write_corpus: item {i} holds a line break, which a text file (one item "
                "per line) cannot store; write a .jsonl file instead"
            )
        lines.append(json.dumps({field: text}, ensure_ascii=False) if jsonl else text)
    if not lines:
        raise ValueError("write_corpus: no sentences to write")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    os.replace(tmp, out)
    return out


def read_corpus(
    path: str | os.PathLike[str],
    *,
    field: str = "text",
    limit: int | None = None,
    start: int = 0,
) -> Iterator[str]:
    """Stream the items of a corpus file: the lines of a text file, or the ``field`` of each
    JSON object of a ``.jsonl`` file; blank lines are skipped. ``start`` items are skipped
    first and at most ``limit`` are yielded.

    The file's existence and the arguments are checked at once; what is wrong inside the
    file (a line that is not JSON, an object without ``field``, no item at all) raises
    ValueError, naming the line, while iterating.
    """
    src = Path(path)
    if not src.is_file():
        raise FileNotFoundError(f"read_corpus: no corpus file at {src}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)):
        raise TypeError(f"read_corpus: limit must be an int or None, got {limit!r}")
    if isinstance(start, bool) or not isinstance(start, int):
        raise TypeError(f"read_corpus: start must be an int, got {start!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"read_corpus: limit must be at least 1, got {limit}")
    if start < 0:
        raise ValueError(f"read_corpus: start must be 0 or more, got {start}")
    return _stream(src, field, limit, start)


def _stream(src: Path, field: str, limit: int | None, start: int) -> Iterator[str]:
    jsonl = is_jsonl(src)
    seen = given = 0
    with src.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if limit is not None and given >= limit:
                return
            if not line.strip():
                continue
            text = _item(src, number, line, field) if jsonl else line.rstrip("\r\n")
            seen += 1
            if seen > start:
                given += 1
                yield text
    if seen == 0:
        raise ValueError(f"read_corpus: {src} is empty (no non-blank line)")
    if given == 0:
        raise ValueError(f"read_corpus: {src} has {seen} items, none after start={start}")


def _item(src: Path, number: int, line: str, field: str) -> str:
    """The ``field`` of one JSONL line, or a ValueError naming the line."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"read_corpus: {src} line {number} is not JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise ValueError(
            f"read_corpus: {src} line {number} is a JSON {type(obj).__name__}, not an object"
        )
    if field not in obj:
        keys = ", ".join(sorted(obj)) or "none"
        raise ValueError(
            f"read_corpus: {src} line {number} has no {field!r} field (it has: {keys}); "
            "name the text's field with field="
        )
    value = obj[field]
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"read_corpus: {src} line {number}: {field!r} is not a non-empty string")
    return value
