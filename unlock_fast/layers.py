"""Find the decoder layers of any Hugging Face decoder-only model, and describe the model.

No per-architecture table: the decoder is the ``nn.ModuleList`` of repeated blocks that holds
the most parameters (``model.layers`` in llama/qwen/gemma/mistral, ``transformer.h`` in gpt2,
``gpt_neox.layers`` in gpt-neox, ...). A layout this search gets wrong can be named by hand
with ``layer_path="dotted.path.to.ModuleList"``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "decoder_layers",
    "resolve_layer_indices",
    "hidden_size",
    "model_name",
    "model_fingerprint",
    "legacy_model_fingerprint",
    "fingerprint_matches",
    "input_device",
]

# Config keys that change nothing about the activations of the decoder blocks: names and
# bookkeeping, output switches, the attention backend (same math), dtype, special token ids
# and generation settings (the tokenizer's business, not the network's), and the settings
# of heads, losses and weight initialisation, which the blocks never read.
_VOLATILE_CONFIG_KEYS = frozenset(
    {
        # names and bookkeeping
        "_name_or_path",
        "name_or_path",
        "transformers_version",
        "_commit_hash",
        "architectures",
        "tokenizer_class",
        "prefix",
        "finetuning_task",
        "task_specific_params",
        # numerics and backend: the same math
        "torch_dtype",
        "dtype",
        "_attn_implementation",
        "_attn_implementation_autoset",
        "_attn_implementation_internal",
        "_experts_implementation",
        "quantization_config",
        "chunk_size_feed_forward",
        "torchscript",
        "use_bfloat16",
        "pretraining_tp",
        "base_model_tp_plan",
        "base_model_pp_plan",
        "base_model_ep_plan",
        # what the forward returns, not what it computes
        "use_cache",
        "output_hidden_states",
        "output_attentions",
        "output_router_logits",
        "return_dict",
        "output_scores",
        "return_dict_in_generate",
        # special token ids
        "pad_token_id",
        "bos_token_id",
        "eos_token_id",
        "sep_token_id",
        "decoder_start_token_id",
        "forced_bos_token_id",
        "forced_eos_token_id",
        # generation settings (older configs carry them)
        "max_length",
        "min_length",
        "do_sample",
        "early_stopping",
        "num_beams",
        "num_beam_groups",
        "diversity_penalty",
        "temperature",
        "top_k",
        "top_p",
        "typical_p",
        "repetition_penalty",
        "length_penalty",
        "no_repeat_ngram_size",
        "encoder_no_repeat_ngram_size",
        "bad_words_ids",
        "num_return_sequences",
        "remove_invalid_values",
        "exponential_decay_length_penalty",
        "suppress_tokens",
        "begin_suppress_tokens",
        # heads, losses and initialisation: never read by the decoder blocks
        "tie_word_embeddings",
        "id2label",
        "label2id",
        "num_labels",
        "problem_type",
        "classifier_dropout",
        "summary_type",
        "summary_use_proj",
        "summary_activation",
        "summary_proj_to_labels",
        "summary_first_dropout",
        "router_aux_loss_coef",
        "router_z_loss_coef",
        "initializer_range",
        "initializer_factor",
    }
)

# The keys the first fingerprint format left out; keys saved with it stay accepted while the
# model's config matches (see :func:`fingerprint_matches`).
_LEGACY_VOLATILE_CONFIG_KEYS = frozenset(
    {
        "_name_or_path",
        "name_or_path",
        "transformers_version",
        "torch_dtype",
        "dtype",
        "_attn_implementation",
        "_attn_implementation_autoset",
        "_commit_hash",
        "architectures",
        "use_cache",
        "output_hidden_states",
        "output_attentions",
        "return_dict",
        "quantization_config",
    }
)


def _get_path(model: nn.Module, path: str) -> Any:
    obj: Any = model
    for part in path.split("."):
        if part.isdigit() and isinstance(obj, (nn.ModuleList, nn.Sequential)):
            obj = obj[int(part)]
        elif hasattr(obj, part):
            obj = getattr(obj, part)
        else:
            raise ValueError(f"layer_path {path!r}: {type(obj).__name__} has no attribute {part!r}")
    return obj


def _expected_depth(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    for c in (cfg, getattr(cfg, "text_config", None)):
        if c is None:
            continue
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            v = getattr(c, key, None)
            if isinstance(v, int) and v > 0:
                return v
    return None


def _how_to_name(model: nn.Module) -> str:
    lists = [
        f"{n} ({len(m)} x {type(m[0]).__name__})"
        for n, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) > 0
    ]
    seen = ", ".join(lists[:8]) if lists else "none"
    return (
        "Pass the decoder blocks by hand with layer_path='<dotted path>' (for example "
        "layer_path='model.layers' or layer_path='transformer.h'), naming the nn.ModuleList "
        "whose blocks take the residual stream and return it as their first output. "
        f"ModuleLists found in this model: {seen}."
    )


def decoder_layers(model: nn.Module, layer_path: str | None = None) -> nn.ModuleList:
    """Return the ``nn.ModuleList`` of decoder blocks of ``model``.

    With ``layer_path`` (e.g. ``"model.layers"``) that attribute is used. Otherwise the
    largest (by parameter count) ModuleList whose entries all share one class is chosen,
    preferring lists whose length equals the configured depth.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if layer_path is not None:
        if not isinstance(layer_path, str) or not layer_path:
            raise TypeError(f"layer_path must be a non-empty str, got {layer_path!r}")
        obj = _get_path(model, layer_path)
        if not isinstance(obj, (nn.ModuleList, nn.Sequential)) or len(obj) == 0:
            raise ValueError(
                f"layer_path {layer_path!r} names a {type(obj).__name__}, expected a "
                "non-empty nn.ModuleList of decoder blocks"
            )
        return obj  # type: ignore[return-value]
    depth = _expected_depth(model)
    best: tuple[tuple[bool, int, int], nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if len({type(m) for m in mod}) != 1:
            continue
        n_params = sum(p.numel() for p in mod.parameters())
        if n_params == 0:
            continue
        score = (depth is not None and len(mod) == depth, n_params, -name.count("."))
        if best is None or score > best[0]:
            best = (score, mod)
    if best is None:
        raise ValueError(
            f"could not find the decoder layers of {type(model).__name__}. " + _how_to_name(model)
        )
    return best[1]


def resolve_layer_indices(num_layers: int, layers: Sequence[int] | None) -> list[int]:
    """Validate a selection of layer indices (negative ones count from the end)."""
    if layers is None:
        return list(range(num_layers))
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
        raise TypeError(
            f"layers must be a sequence of ints or None, got {type(layers).__name__}; "
            "to name the decoder block list itself, use layer_path="
        )
    out: list[int] = []
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"layers must hold ints, got {i!r}")
        j = i + num_layers if i < 0 else i
        if not 0 <= j < num_layers:
            raise ValueError(f"layer index {i} is out of range for {num_layers} layers")
        if j in out:
            raise ValueError(f"layer index {i} is given twice")
        out.append(j)
    if not out:
        raise ValueError("layers must not be empty")
    return sorted(out)


def _holders(model: nn.Module, layer_path: str | None) -> Iterator[nn.Module]:
    """``model``, then the modules that hold its decoder blocks, nearest first (a wrapper's
    inner Hugging Face model). The blocks are looked up only when asked for the second."""
    yield model
    blocks = decoder_layers(model, layer_path)
    for name, mod in model.named_modules():
        if mod is blocks:
            parts = name.split(".")[:-1]
            for i in range(len(parts), 0, -1):
                yield model.get_submodule(".".join(parts[:i]))
            return


def _own_hidden_size(model: nn.Module) -> int | None:
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if emb is not None and getattr(emb, "embedding_dim", None):
        return int(emb.embedding_dim)
    cfg = getattr(model, "config", None)
    for c in (cfg, getattr(cfg, "text_config", None)):
        for key in ("hidden_size", "n_embd", "d_model"):
            v = getattr(c, key, None) if c is not None else None
            if isinstance(v, int) and not isinstance(v, bool):
                return v
    return None


def hidden_size(model: nn.Module, layer_path: str | None = None) -> int:
    """Width of the residual stream: from the input embeddings, else from the config, of the
    model or else of the module that holds its decoder blocks (``layer_path`` names them when
    they are not found automatically)."""
    for mod in _holders(model, layer_path):
        width = _own_hidden_size(mod)
        if width is not None:
            return width
    raise ValueError(
        f"cannot tell the hidden size of {type(model).__name__}: neither it nor the modules "
        "holding its decoder blocks have get_input_embeddings() or a config with hidden_size "
        "(n_embd, d_model). Give the model a `config` with hidden_size, or a "
        "get_input_embeddings() method"
    )


def model_name(model: nn.Module) -> str:
    """``config._name_or_path`` when set, else the class name."""
    cfg = getattr(model, "config", None)
    name = getattr(cfg, "_name_or_path", "") or getattr(model, "name_or_path", "")
    return str(name) if name else type(model).__name__


def _config_dict(model: nn.Module, layer_path: str | None) -> dict[str, Any] | None:
    """The config of the model, else of the module holding its decoder blocks, as a dict."""
    try:
        for mod in _holders(model, layer_path):
            cfg = getattr(mod, "config", None)
            if cfg is not None and hasattr(cfg, "to_dict"):
                return dict(cfg.to_dict())
    except ValueError:  # no config and no decoder blocks found: describe by class
        return None
    return None


def _hash(desc: dict[str, Any]) -> str:
    blob = json.dumps(desc, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def model_fingerprint(model: nn.Module, layer_path: str | None = None) -> str:
    """Short hash of what determines the activations of the decoder blocks: the config
    without the fields that do not change them (names, dtype, attention backend, special
    token ids, generation, head and loss settings), and the hidden size."""
    cfg = _config_dict(model, layer_path)
    desc: dict[str, Any] = (
        {"class": type(model).__name__} if cfg is None else _clean(cfg, _VOLATILE_CONFIG_KEYS)
    )
    desc["hidden_size"] = hidden_size(model, layer_path)
    return _hash(desc)


def legacy_model_fingerprint(model: nn.Module) -> str:
    """The fingerprint in its first format (which also hashed special token ids and other
    fields that do not change the activations), as artifacts saved with it carry."""
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "to_dict"):
        desc: dict[str, Any] = {"class": type(model).__name__}
    else:
        desc = _clean(cfg.to_dict(), _LEGACY_VOLATILE_CONFIG_KEYS)
    desc["hidden_size"] = hidden_size(model)
    return _hash(desc)


def fingerprint_matches(fingerprint: str, model: nn.Module, layer_path: str | None = None) -> bool:
    """Whether an artifact's ``fingerprint`` fits ``model``: the current format, or the first
    one (artifacts saved before it changed; they match while the config is the same)."""
    if fingerprint == model_fingerprint(model, layer_path):
        return True
    try:
        return fingerprint == legacy_model_fingerprint(model)
    except ValueError:
        return False


def _clean(d: dict[str, Any], volatile: frozenset[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if k in volatile:
            continue
        out[k] = _clean(v, volatile) if isinstance(v, dict) else v
    return out


def input_device(model: nn.Module) -> torch.device:
    """Device the token ids go to (that of the input embeddings; works with device_map)."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if emb is not None and getattr(emb, "weight", None) is not None:
        dev = emb.weight.device
        if dev.type != "meta":
            return dev
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")
