"""Pretrained models with LoRA adapters, loaded once per process.

A worker process that serves many virtual clients keeps one frozen base model per
adapter layout (:class:`LoraSpec`) and swaps only the adapter tensors between clients.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from peft import get_peft_model
from peft.utils.other import ModulesToSaveWrapper
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)
from transformers.utils import logging as hf_logging

from .adapter_families import get_family, is_adapter_parameter
from .adapters import adapter_state
from .base_quant import load_kwargs, release_loader_memory
from .config import ConfigError
from .heads import PooledClassifier, resolve_head_pooling

if TYPE_CHECKING:
    from .run_config import RunConfig

__all__ = ["LoraSpec", "load_tokenizer", "build_lora_model", "cached_lora_model",
           "forget_cached_models", "head_name", "choose_num_threads", "resolve_base_dtype",
           "cast_frozen_base", "BASE_DTYPES", "initial_adapter_state"]

log = logging.getLogger(__name__)

# Models and tokenizers come from local folders only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

# transformers 5 warns from inside its own code when peft inspects a model.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
# VeRA's shared projections are drawn from the run's seed at every party on purpose (they are
# never sent nor saved; see fedlora.adapter_families.vera).
warnings.filterwarnings("ignore", message="Specified to not save vera_A and vera_B",
                        category=UserWarning)

_HEAD_NAMES = ("classifier", "score", "classification_head")


@dataclass(frozen=True)
class LoraSpec:
    """Everything that fixes the adapter layout (and so the keys and shapes on the wire)."""

    model_path: str
    num_labels: int
    rank: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]
    train_head: bool
    init_seed: int = 0  # seeds the head and LoRA initialisation (shared by all parties)
    freeze_a: bool = False  # FFA-LoRA: A stays at its initialisation, only B trains
    causal_lm: bool = False  # a causal LM (next-token loss, no classification head)
    device: str = "cpu"  # where the model lives: "cpu", "cuda", "cuda:1", ...
    base_dtype: str = "float32"  # the frozen base weights' dtype; adapters stay float32
    pooling: str = "model"  # "mean": fedlora.heads.PooledClassifier; "model": the model's own
    family: str = "lora"  # the adapter family (fedlora.adapter_families), run-config adapter
    init: str = "default"  # run-config lora-init (fedlora.adapter_families.inits)
    c3a_block_size: int = 64  # run-config c3a-block-size (adapter = c3a)
    base_quant: str = "none"  # run-config base-quant: the frozen linear layers int8 or nf4

    @classmethod
    def from_config(cls, cfg: RunConfig, *, model_path: str, num_labels: int,
                    rank: int | None = None, freeze_a: bool = False, causal_lm: bool = False):
        """The spec a run-config asks for (``rank`` overrides ``lora-rank``, e.g. per site).

        A causal LM has no classification head: ``train-head`` does not apply to it (its
        output layer, tied to the input embeddings, stays frozen and is never sent).
        """
        device = resolve_device(getattr(cfg, "device", "cpu"))
        pooling = "model" if causal_lm else resolve_head_pooling(
            getattr(cfg, "head_pooling", "model"), model_path,
            private=getattr(cfg, "dp_mode", "off") != "off")
        return cls(
            model_path=model_path,
            num_labels=num_labels,
            rank=rank if rank is not None else cfg.lora_rank,
            alpha=cfg.lora_alpha,
            dropout=cfg.lora_dropout,
            target_modules=tuple(cfg.target_modules),
            train_head=cfg.train_head and not causal_lm,
            init_seed=cfg.seed,
            freeze_a=freeze_a,
            causal_lm=causal_lm,
            device=device,
            base_dtype=resolve_base_dtype(getattr(cfg, "base_dtype", "auto"), device),
            pooling=pooling,
            family=getattr(cfg, "adapter", "lora"),
            init=getattr(cfg, "lora_init", "default"),
            c3a_block_size=getattr(cfg, "c3a_block_size", 64),
            base_quant=getattr(cfg, "base_quant", "none"),
        )

    @property
    def scale(self) -> float:
        """LoRA's scale alpha / r: the update of a module is scale * B @ A."""
        return self.alpha / self.rank


def choose_num_threads(requested: int = 0) -> int:
    """Torch threads for a client: ``requested``, else the CPU share the simulation gave it.

    Ray sets OMP_NUM_THREADS to an actor's ``num_cpus``; oversubscribing the cores
    with several busy clients makes every step many times slower, so we follow it.
    """
    if requested > 0:
        return requested
    try:
        share = int(os.environ.get("OMP_NUM_THREADS", "0"))
    except ValueError:
        share = 0
    return share if share > 0 else max(1, os.cpu_count() or 1)


_LOCK = threading.Lock()
_TOKENIZERS: dict[str, object] = {}
_MODELS: dict[LoraSpec, nn.Module] = {}


def _model_positions(model_path: str) -> int | None:
    """The most tokens the model in ``model_path`` reads (its config's position count)."""
    try:
        config = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for key in ("max_position_embeddings", "n_positions"):
        value = config.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None


def load_tokenizer(model_path: str):
    """The tokenizer of a local model folder, loaded once per process."""
    with _LOCK:
        tok = _TOKENIZERS.get(model_path)
        if tok is None:
            tok = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
            if tok.pad_token_id is None and tok.eos_token is not None:
                tok.pad_token = tok.eos_token
            positions = _model_positions(model_path)
            if positions and not 0 < tok.model_max_length <= positions:
                tok.model_max_length = positions  # rows are never cut longer than the model
            _TOKENIZERS[model_path] = tok
        return tok


def resolve_device(requested: str) -> str:
    """The torch device for run-config ``device``: ``auto`` is the GPU when torch sees one
    (Flower's simulation shows a worker only the GPU share it was given), else the CPU."""
    requested = (requested or "auto").strip()
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError("device", requested, f"'auto' or 'cpu': torch {torch.__version__} "
                              "sees no GPU on this machine")
        index = torch.device(requested).index
        if index is not None and index >= torch.cuda.device_count():
            raise ConfigError("device", requested, f"a GPU index below "
                              f"{torch.cuda.device_count()}, the GPUs on this machine")
    return requested


BASE_DTYPES = ("float32", "bfloat16", "float16")


#: Set to 0 to treat this CPU as one without native bfloat16 (``auto`` then resolves to
#: float32, and tests that need a native bfloat16 base skip), e.g. to measure what a
#: machine without AVX512-BF16/AMX would do.
NATIVE_BF16_ENV = "FEDLORA_NATIVE_BF16"


def _cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX), so that a
    bfloat16 base model is faster than float32 rather than emulated and slower
    (``FEDLORA_NATIVE_BF16=0`` says no whatever the CPU)."""
    if os.environ.get(NATIVE_BF16_ENV, "").strip() == "0":
        return False
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def resolve_base_dtype(requested: str, device: str) -> str:
    """The dtype of the frozen base weights for run-config ``base-dtype``.

    ``auto`` is bfloat16 where the device computes it natively (a CUDA GPU that supports
    it; a CPU with AVX512-BF16 or AMX), else float32. float16 needs a GPU: CPUs have no fast
    float16 matrix products.
    """
    requested = (requested or "float32").strip()
    gpu = device.startswith("cuda")
    if requested == "auto":
        fast = torch.cuda.is_bf16_supported() if gpu else _cpu_has_fast_bf16()
        return "bfloat16" if fast else "float32"
    if requested not in BASE_DTYPES:
        raise ConfigError("base-dtype", requested, f"auto or one of {', '.join(BASE_DTYPES)}")
    if requested == "float16" and not gpu:
        raise ConfigError("base-dtype", requested, "float32, bfloat16 or auto on a CPU (float16 "
                          "needs a GPU: set device to cuda)")
    return requested


def _keep_float32(model: nn.Module) -> set[int]:
    """Ids of the parameters that stay float32 under a lower-precision base: the adapter's
    own (LoRA factors, trainable or frozen under FFA, DoRA's magnitude, VeRA's vectors: they
    are the adapter on the wire) and every parameter of a trained head (peft's
    modules_to_save wrapper, original included)."""
    keep: set[int] = set()
    for module in model.modules():
        if isinstance(module, ModulesToSaveWrapper):
            keep.update(id(p) for p in module.parameters())
    for name, param in model.named_parameters():
        if is_adapter_parameter(name):
            keep.add(id(param))
    return keep


def _float32_inputs(module: nn.Module, args: tuple) -> tuple:
    return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def cast_frozen_base(model: nn.Module, dtype: torch.dtype) -> None:
    """Store the frozen base weights of a peft LoRA model in ``dtype`` (e.g. bfloat16).

    The adapter stays float32: peft casts a LoRA layer's input to its factors' dtype and
    its output back to the base layer's, so the factors, their gradients (per-example ones
    under DP-SGD included) and the optimiser state are float32, and only the frozen
    matrix products run in ``dtype``. A trained head stays float32 and gets float32 inputs.
    """
    keep = _keep_float32(model)
    for param in model.parameters():
        if id(param) not in keep and param.is_floating_point() and param.dtype != dtype:
            if param.requires_grad:
                raise ValueError(f"a trainable base parameter ({tuple(param.shape)}) cannot be "
                                 f"stored in {dtype}")
            param.data = param.data.to(dtype)
    for module in model.modules():
        if isinstance(module, ModulesToSaveWrapper):
            module.register_forward_pre_hook(_float32_inputs)


def _quant_kwargs(spec: LoraSpec) -> dict:
    """``from_pretrained`` arguments for a quantised base (:mod:`fedlora.base_quant`)."""
    return load_kwargs(spec.base_quant, compute_dtype=getattr(torch, spec.base_dtype),
                       device=spec.device)


def head_name(model: nn.Module) -> str | None:
    """Name of the classification head of a transformers model (trained with ``train-head``)."""
    children = dict(model.named_children())
    return next((n for n in _HEAD_NAMES if n in children), None)


def build_lora_model(spec: LoraSpec) -> nn.Module:
    """A fresh frozen pretrained model with LoRA adapters (and the head trainable if asked).

    The model is placed on its device before ``get_peft_model`` so that adapter
    parameters exist where training hooks will look for them. With ``spec.causal_lm`` it is
    a causal language model (peft task type CAUSAL_LM) with LoRA factors only.
    """
    if spec.causal_lm:
        return _build_causal_lm(spec)

    hf_logging.set_verbosity_error()  # the "newly initialised head" report is expected
    hf_logging.disable_progress_bar()
    torch.manual_seed(spec.init_seed)
    if spec.pooling == "mean":
        encoder = AutoModel.from_pretrained(spec.model_path, local_files_only=True,
                                            **_quant_kwargs(spec))
        dropout = getattr(encoder.config, "classifier_dropout", None)
        if dropout is None:
            dropout = getattr(encoder.config, "hidden_dropout_prob", 0.1)
        base = PooledClassifier(encoder, spec.num_labels, dropout=float(dropout))
    else:
        base = AutoModelForSequenceClassification.from_pretrained(
            spec.model_path, num_labels=spec.num_labels, local_files_only=True,
            **_quant_kwargs(spec))
    if base.config.pad_token_id is None:
        tok = load_tokenizer(spec.model_path)
        base.config.pad_token_id = tok.pad_token_id
    head = head_name(base)
    if spec.train_head and head is None:
        raise ValueError(
            f"train-head is true but no classification head ({', '.join(_HEAD_NAMES)}) "
            f"was found in {spec.model_path}"
        )
    config = get_family(spec.family).peft_config(
        spec, modules_to_save=[head] if spec.train_head else None, task_type=None)
    return _attach_lora(base, config, spec)


def _attach_lora(base: nn.Module, config, spec: LoraSpec) -> nn.Module:
    """Wrap ``base`` in peft's adapter per ``config``; freeze A for FFA; move to the device.

    A data-free init (``lora-init`` pissa or olora) is computed here, in float32 on the CPU
    from the base weights, before any cast: every party derives the same factors and the
    same residual base."""
    try:
        model = get_peft_model(base, config)
    except ValueError as e:
        keys = " and ".join(get_family(spec.family).shaped_by)
        raise ValueError(
            f"{keys} (lora-target-modules {','.join(spec.target_modules)!r}) do not fit "
            f"{spec.model_path} with adapter '{spec.family}': {e}") from None
    if spec.freeze_a:
        for name, param in model.named_parameters():
            if ".lora_A." in name:
                param.requires_grad_(False)
    release_loader_memory(spec.base_quant)
    if spec.base_dtype != "float32":
        # After the adapter is drawn (in float32, the same for every party).
        cast_frozen_base(model, getattr(torch, spec.base_dtype))
    # Built and initialised on the CPU, so every party (server on a CPU, sites on GPUs)
    # draws the same seeded adapter; then moved, before any training hook is attached.
    model.to(spec.device)
    return model


@functools.lru_cache(maxsize=4)
def _initial_state(spec: LoraSpec) -> tuple[tuple[str, np.ndarray], ...]:
    return tuple(adapter_state(build_lora_model(spec)).items())


def initial_adapter_state(spec: LoraSpec) -> dict[str, np.ndarray]:
    """The adapter of ``spec`` as every party builds it, before any training (computed once
    per process; copies are returned)."""
    return {k: v.copy() for k, v in _initial_state(spec)}


def forget_cached_models() -> None:
    """Drop this process's models and tokenizers (:func:`cached_lora_model`)."""
    with _LOCK:
        _MODELS.clear()
        _TOKENIZERS.clear()
    _initial_state.cache_clear()


def cached_lora_model(spec: LoraSpec) -> nn.Module:
    """The process-wide model for ``spec``: built on first use, reused afterwards.

    Callers load the adapter tensors they need into it before use
    (:func:`fedlora.adapters.load_adapter_state`), so nothing of one client leaks to the next.
    """
    with _LOCK:
        model = _MODELS.get(spec)
        if model is None:
            log.info("Loading base model %s (LoRA r=%d, base %s, quantised %s) once for this "
                     "process", spec.model_path, spec.rank, spec.base_dtype, spec.base_quant)
            model = build_lora_model(spec)
            _MODELS[spec] = model
        return model


def _build_causal_lm(spec: LoraSpec) -> nn.Module:
    if spec.train_head:
        raise ValueError("train-head: a causal language model has no classification head to "
                         "train (LoraSpec.from_config turns it off for causal-LM tasks)")
    hf_logging.disable_progress_bar()
    torch.manual_seed(spec.init_seed)
    base = AutoModelForCausalLM.from_pretrained(spec.model_path, local_files_only=True,
                                                **_quant_kwargs(spec))
    base.config.use_cache = False  # never generates here: no key/value cache to build
    if base.config.pad_token_id is None:
        base.config.pad_token_id = load_tokenizer(spec.model_path).pad_token_id
    config = get_family(spec.family).peft_config(spec, modules_to_save=None,
                                                  task_type="CAUSAL_LM")
    return _attach_lora(base, config, spec)
