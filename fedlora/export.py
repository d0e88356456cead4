"""A finished run's model, loaded as its centralised evaluation used it, and exported.

:func:`load_run_model` rebuilds the run's model from its folder (``config.json`` and the
peft adapter in ``adapter/``) on the CPU with a float32 base. :func:`export_run` writes it
as a folder that transformers loads on its own:

- ``merged=True``: the LoRA update ``alpha/r * B @ A`` folded into the base weights
  (``merge_and_unload``), saved as a plain transformers model (``config.json`` with the
  label names in ``id2label``, ``model.safetensors``, the tokenizer);
- ``merged=False``: the peft adapter (LoRA factors and trained head) with the base model
  named by its local path in ``adapter_config.json``, and the tokenizer.

A head on the mean of the token states (``head-pooling = mean``) has no transformers class:
its merged export carries :mod:`fedlora.pooled_model` as local code (``trust_remote_code``),
and it cannot be exported unmerged (its base is no plain transformers model).

Every export also holds ``fedlora.json`` (task, labels, pooling, max length, source run).
The tokenizer's ``model_max_length`` is the run's ``max-length``, so that
``truncation=True`` cuts texts where the run's evaluation did.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from peft import get_peft_model_state_dict
from peft.utils import load_peft_weights, set_peft_model_state_dict

from . import pooled_model, runtime
from .config import ConfigError
from .data import DataError
from .models import build_lora_model, load_tokenizer
from .tasks import get_task

if TYPE_CHECKING:
    from torch import nn

    from .models import LoraSpec
    from .run_config import RunConfig

__all__ = ["ExportError", "TrainedRun", "load_run_model", "export_run", "staged_folder",
           "EXPORT_INFO", "POOLED_CODE"]

log = logging.getLogger(__name__)

EXPORT_INFO = "fedlora.json"  # what an export holds besides the transformers files
POOLED_CODE = "pooled_model.py"  # the local code of a mean-pooled classifier


class ExportError(ValueError):
    """A run folder, model folder or output path that cannot be used; the message names it."""


@dataclasses.dataclass
class TrainedRun:
    """A run's model as its centralised evaluation saw it (peft model, eval mode, CPU)."""

    run_dir: Path
    cfg: RunConfig
    spec: LoraSpec
    model: nn.Module
    tokenizer: Any
    label_names: tuple[str, ...]

    @property
    def causal_lm(self) -> bool:
        return self.spec.causal_lm

    def info(self, *, merged: bool) -> dict[str, Any]:
        """The ``fedlora.json`` of an export of this run."""
        return {"task": self.cfg.task, "causal_lm": self.causal_lm,
                "labels": list(self.label_names), "pooling": self.spec.pooling,
                "max_length": self.cfg.max_length, "merged": merged,
                "base_model": self.spec.model_path, "lora_rank": self.spec.rank,
                "lora_alpha": self.spec.alpha, "run": str(self.run_dir.resolve())}


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"cannot read {what} {path}: {e}") from None
    if not isinstance(value, dict):
        raise ExportError(f"{path} is not a JSON object")
    return value


def run_config_of(run_dir: Path) -> dict[str, Any]:
    """The run-config a run folder was made with (``config.json``, else ``metrics.json``)."""
    if (run_dir / "config.json").is_file():
        return _read_json(run_dir / "config.json", "the run-config")
    if (run_dir / "metrics.json").is_file():
        config = _read_json(run_dir / "metrics.json", "the metrics").get("config")
        if isinstance(config, dict):
            return config
    raise ExportError(f"'{run_dir}' is not a run folder: it has no config.json")


def is_run_dir(path: str | Path) -> bool:
    """Whether ``path`` looks like a run folder (rather than an exported model)."""
    p = Path(path)
    return (p / "adapter").is_dir() or (p / "metrics.json").is_file()


def load_run_model(run_dir: str | Path) -> TrainedRun:
    """The model of a finished run: its base (float32, CPU) with the adapter of
    ``adapter/`` loaded. Raises :class:`ExportError` naming what is missing or does not fit."""

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ExportError(f"'{run_dir}' is not a run folder: no such directory")
    adapter = run_dir / "adapter"
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (adapter / name).is_file():
            raise ExportError(f"'{run_dir}' has no trained adapter: {adapter / name} is missing "
                              "(the run has not finished a round)")
    try:
        cfg = runtime.resolve_config(run_config_of(run_dir))
        task = get_task(cfg.task)
        spec = runtime.server_spec(cfg)
        labels = tuple(task.label_names(cfg))
    except (ConfigError, DataError, ValueError) as e:
        raise ExportError(f"{run_dir / 'config.json'}: {e}") from None
    adapter_cfg = _read_json(adapter / "adapter_config.json", "the adapter config")
    _check_adapter(adapter, adapter_cfg, spec)
    # A run whose init changed the base saved plain LoRA on the original base (see
    # fedlora.adapter_families.inits), so the model is built with the default init.
    spec = dataclasses.replace(spec, rank=int(adapter_cfg.get("r", spec.rank)),
                               alpha=float(adapter_cfg.get("lora_alpha", spec.alpha)),
                               freeze_a=False, device="cpu", base_dtype="float32",
                               init="default")
    model = _load_adapter(spec, adapter)
    return TrainedRun(run_dir=run_dir, cfg=cfg, spec=spec, model=model,
                      tokenizer=load_tokenizer(spec.model_path), label_names=labels)


def _check_adapter(adapter: Path, adapter_cfg: dict[str, Any], spec: LoraSpec) -> None:
    """The adapter was trained on the model and task the run-config names."""
    where = adapter / "adapter_config.json"
    # The numbers each peft family's config holds (VeRA's has no lora_alpha, C3A's no r).
    required = {"LORA": ("r", "lora_alpha"), "VERA": ("r",)}.get(
        adapter_cfg.get("peft_type", "LORA"), ())
    for key in required:
        if not isinstance(adapter_cfg.get(key), (int, float)):
            raise ExportError(f"{where}: '{key}' is missing or not a number")
    task_type = adapter_cfg.get("task_type")
    if (task_type == "CAUSAL_LM") != spec.causal_lm:
        kinds = ("a classifier", "a causal LM")
        raise ExportError(
            f"{where}: the adapter is for {kinds[task_type == 'CAUSAL_LM']} (task_type "
            f"{task_type!r}) but the run-config's task is {kinds[spec.causal_lm]}: a model of "
            "another task")
    base = adapter_cfg.get("base_model_name_or_path")
    if base and Path(base).resolve() != Path(spec.model_path).resolve():
        raise ExportError(f"{where}: the adapter was trained on {base!r}, but the run-config's "
                          f"model is {spec.model_path!r}")


def _load_adapter(spec: LoraSpec, adapter: Path) -> nn.Module:
    try:
        model = build_lora_model(spec)
    except (OSError, RuntimeError, ValueError) as e:
        raise ExportError(f"cannot build the model of the run-config ({spec.model_path}): "
                          f"{str(e).splitlines()[0] if str(e) else e!r}") from None
    weights = load_peft_weights(str(adapter), device="cpu")
    own = {k: v.shape for k, v in _peft_state(model).items()}
    for key, tensor in weights.items():
        if key in own and tuple(own[key]) != tuple(tensor.shape):
            raise ExportError(f"{adapter}: tensor {key} has shape {tuple(tensor.shape)}, the "
                              f"run's model expects {tuple(own[key])} (a model of another task?)")
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    if missing or unexpected:
        raise ExportError(f"{adapter}: the adapter does not fit the run's model: missing "
                          f"{missing[:3]}, unexpected {unexpected[:3]}")
    set_peft_model_state_dict(model, {k: v.to(torch.float32) for k, v in weights.items()})
    return model.eval()


def _peft_state(model: nn.Module) -> dict[str, Any]:
    return get_peft_model_state_dict(model)


@contextlib.contextmanager
def staged_folder(out: str | Path) -> Iterator[Path]:
    """A fresh temporary folder beside ``out``, renamed to ``out`` when the block succeeds
    and removed when it fails, so ``out`` is either complete or absent. ``out`` must not
    exist, or be an empty folder."""
    out = Path(out)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise ExportError(f"output folder '{out}' already exists and is not empty")
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{out.name}.", suffix=".tmp"))
    except OSError as e:
        raise ExportError(f"cannot write the output folder '{out}': {e.strerror or e}") from None
    try:
        yield tmp
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def export_run(run_dir: str | Path, out: str | Path, *, merged: bool = False) -> Path:
    """Write the model of ``run_dir`` to ``out`` (see the module docstring); return ``out``."""
    run = load_run_model(run_dir)
    if not merged and run.spec.pooling == "mean":
        raise ExportError(f"'{run_dir}' trained a head on the mean of the token states "
                          "(head-pooling = mean), which no transformers base model has: "
                          "export it with --merged")
    with staged_folder(out) as tmp:
        if merged:
            _save_merged(run, tmp)
        else:
            _save_adapter(run, tmp)
        tok = run.tokenizer
        saved_max = tok.model_max_length
        tok.model_max_length = run.cfg.max_length  # the run's truncation travels with it
        try:
            tok.save_pretrained(str(tmp))
        finally:
            tok.model_max_length = saved_max
        (tmp / EXPORT_INFO).write_text(json.dumps(run.info(merged=merged), indent=2) + "\n")
    log.info("exported %s (%s) to %s", run_dir, "merged" if merged else "adapter", out)
    return Path(out)


def _label_maps(labels: tuple[str, ...]) -> dict[str, Any]:
    return {"id2label": dict(enumerate(labels)), "label2id": {n: i for i, n in enumerate(labels)}}


def _save_adapter(run: TrainedRun, tmp: Path) -> None:
    """The peft adapter, its base named by absolute local path."""
    run.model.peft_config["default"].base_model_name_or_path = str(
        Path(run.spec.model_path).resolve())
    run.model.save_pretrained(str(tmp))


def _save_merged(run: TrainedRun, tmp: Path) -> None:
    """The base with the adapter folded in (peft applies each layer's alpha/r scale)."""
    merged = run.model.merge_and_unload()
    if run.causal_lm:
        merged.config.use_cache = True  # training switched the key/value cache off
        merged.save_pretrained(str(tmp))
        return
    if run.spec.pooling == "mean":
        _save_mean_pooled(merged, run, tmp)
        return
    merged.config.update(_label_maps(run.label_names))
    merged.save_pretrained(str(tmp))


def _save_mean_pooled(merged: nn.Module, run: TrainedRun, tmp: Path) -> None:
    """A :class:`fedlora.heads.PooledClassifier` as :mod:`fedlora.pooled_model`'s class,
    with that module copied beside the weights and named in ``auto_map``."""
    module = POOLED_CODE.removesuffix(".py")
    config = pooled_model.MeanPooledConfig(
        encoder=merged.encoder.config.to_dict(),
        classifier_dropout=float(merged.dropout.p),
        architectures=[pooled_model.MeanPooledForSequenceClassification.__name__],
        auto_map={"AutoConfig": f"{module}.MeanPooledConfig",
                  "AutoModelForSequenceClassification":
                      f"{module}.MeanPooledForSequenceClassification"},
        **_label_maps(run.label_names))
    model = pooled_model.MeanPooledForSequenceClassification(config)
    prefix = f"{merged.prefix}."
    state = {("encoder." + k[len(prefix):] if k.startswith(prefix) else k): v
             for k, v in merged.state_dict().items()}
    model.load_state_dict(state, strict=True)
    model.save_pretrained(str(tmp))
    shutil.copyfile(pooled_model.__file__, tmp / POOLED_CODE)
