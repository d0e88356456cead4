"""A quantised frozen base at the sites (run-config ``base-quant``).

With ``base-quant = "int8"`` or ``"nf4"`` a site loads its frozen base model with the
linear layers quantised by bitsandbytes (LLM.int8() rows of int8 with a float scale each;
NF4: 4-bit NormalFloat codes in blocks of 64 with a float scale each), and peft puts its
LoRA layers on top of the quantised layers (``peft.tuners.lora.bnb``), as in QLoRA. The
factors, a trained head, their gradients (per-example ones under DP-SGD included) and the
optimiser state stay float32: what crosses the wire is the same as with ``"none"``. The
embeddings, norms and the output layer are not quantised. The server evaluates the global
adapter on the unquantised base (:func:`fedlora.runtime.server_spec`).

The layers are quantised as transformers loads them (its bitsandbytes quantiser); the
load itself still reads the float32 checkpoint, so what a site saves is the memory the base
holds while it trains, not the peak of loading it. Why bitsandbytes, and what it saves,
is measured in docs/adapters.md (``python -m simulations.bench_base_quant``).
"""

from __future__ import annotations

import ctypes
import gc
import importlib.util
from typing import TYPE_CHECKING, Any

import torch
from transformers import BitsAndBytesConfig

from .config import ConfigError

if TYPE_CHECKING:
    from .run_config import RunConfig

__all__ = ["BASE_QUANTS", "check_config", "is_quantised_layer", "load_kwargs",
           "quantised_layers", "release_loader_memory"]

BASE_QUANTS = ("none", "int8", "nf4")

#: Modules never quantised: the classification heads (trained, kept float32 and sent) and
#: a causal LM's output layer (tied to the input embeddings).
KEEP_FLOAT = ("classifier", "score", "classification_head", "lm_head")

_COMPAT = "adapter = 'lora', lora-init default or gaussian, an aggregator other than 'stack'"


def _available() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def check_config(cfg: RunConfig) -> None:
    """``ConfigError`` naming the keys for a run-config whose ``base-quant`` cannot work.

    Refused: bitsandbytes missing; an adapter family other than LoRA (peft's quantised
    layers are checked here for LoRA only); an init that rewrites the base weights
    (``lora-init`` pissa or olora: the residual ``W - s B0 A0`` would be quantised at the
    sites but not at the server); ``aggregator = "stack"``, whose sites fold the stacked
    update into their base weights."""
    value = getattr(cfg, "base_quant", "none")
    if value not in BASE_QUANTS:
        raise ConfigError("base-quant", value, f"one of {', '.join(BASE_QUANTS)}")
    if value == "none":
        return
    if not _available():
        raise ConfigError("base-quant", value, "none: bitsandbytes is not installed (install "
                          "the 'quant' extra: pip install -e '.[quant]')")
    if cfg.adapter != "lora":
        raise ConfigError("adapter", cfg.adapter, f"lora with base-quant = '{value}' ({_COMPAT})")
    if cfg.lora_init not in ("default", "gaussian"):
        raise ConfigError("lora-init", cfg.lora_init,
                          f"default or gaussian with base-quant = '{value}' ({cfg.lora_init} "
                          "rewrites the base weights, which a quantised base cannot hold "
                          "the same at every party)")
    if cfg.aggregator == "stack":
        raise ConfigError("aggregator", cfg.aggregator,
                          f"one other than stack with base-quant = '{value}' ('stack' folds "
                          "each round's update into the frozen base weights)")


def load_kwargs(base_quant: str, *, compute_dtype: torch.dtype, device: str) -> dict[str, Any]:
    """The ``from_pretrained`` arguments that load a base quantised per ``base_quant``
    (none for ``"none"``); NF4 layers compute in ``compute_dtype`` (the base dtype)."""
    if base_quant == "none":
        return {}
    if base_quant not in BASE_QUANTS:
        raise ConfigError("base-quant", base_quant, f"one of {', '.join(BASE_QUANTS)}")
    if not _available():
        raise ConfigError("base-quant", base_quant, "none: bitsandbytes is not installed")
    if base_quant == "int8":
        # No outlier decomposition (threshold 0): with it, the columns computed in float
        # are those where *any* row of the batch exceeds the threshold, so one example
        # would change how every other example of its batch is computed (their features
        # and clipped gradients under DP). Without it each row is quantised on its own.
        config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=0.0,
                                    llm_int8_skip_modules=list(KEEP_FLOAT))
    else:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                    bnb_4bit_compute_dtype=compute_dtype,
                                    llm_int8_skip_modules=list(KEEP_FLOAT))
    # Quantised as the weights are read, straight onto the site's device.
    return {"quantization_config": config, "device_map": {"": device}, "dtype": torch.float32}


def release_loader_memory(base_quant: str) -> None:
    """Hand back to the OS the heap that loading a quantised base freed (the float32 weights
    the loader held while quantising): glibc keeps freed memory in its arenas, so without
    this a site's resident memory after loading stays about 400 MB higher for SmolLM2
    (measured by ``simulations.bench_base_quant``). No-op without glibc."""
    if base_quant == "none":
        return
    gc.collect()
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the C library this process runs on
    except (OSError, AttributeError):
        return
    trim(0)


def is_quantised_layer(module: torch.nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes quantised linear layer (int8 or 4-bit)."""
    if not _available():
        return False
    # deferred: bitsandbytes is an optional extra, imported only where a base is quantised
    import bitsandbytes as bnb

    return isinstance(module, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))


def quantised_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The quantised linear layers of ``model`` by name."""
    return {n: m for n, m in model.named_modules() if is_quantised_layer(m)}
