"""Classification heads that fit their checkpoint, and what a head reads.

A sentence-transformers checkpoint (e.g. all-MiniLM-L6-v2) was trained to be read by mean
pooling over its tokens; its [CLS] pooler was never trained for that use.
:class:`PooledClassifier` reads such a model the way it was trained: a linear
``classifier`` over the mean of the token states. Its keys match
transformers' ``...ForSequenceClassification`` (the encoder under its own prefix, e.g.
``bert``, and ``classifier``), so LoRA keys on the wire are the same either way.

:func:`head_inputs` returns what the trained head reads for given examples, so a linear
probe can train the head alone on them without running the encoder again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft.utils.other import ModulesToSaveWrapper
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

__all__ = ["PooledClassifier", "checkpoint_pooling", "resolve_head_pooling",
           "head_module", "head_inputs"]

def checkpoint_pooling(model_path: str) -> str | None:
    """``"mean"`` for a sentence-transformers folder pooled by the mean of its tokens, else
    None. (Its L2 normalisation, if any, is left out: a linear head learns faster on the
    unnormalised mean, with and without DP.)"""
    root = Path(model_path)
    try:
        modules = json.loads((root / "modules.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(modules, list):
        return None
    kinds = {str(m.get("type", "")).rsplit(".", 1)[-1]: m for m in modules if isinstance(m, dict)}
    pooling = kinds.get("Pooling")
    if pooling is None:
        return None
    try:
        conf = json.loads((root / str(pooling.get("path", "")) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not conf.get("pooling_mode_mean_tokens") or conf.get("pooling_mode_cls_token"):
        return None
    return "mean"


def resolve_head_pooling(requested: str, model_path: str, *, private: bool) -> str:
    """The pooling for run-config ``head-pooling``. ``auto``: under a DP mode, the
    checkpoint's own (mean pooling for a sentence-transformers folder that says so), where a
    private linear probe learns far more than on the [CLS] pooler; without DP the model's
    own head, which LoRA adapts to as well (measured in docs/privacy.md, "DP that pays")."""
    if requested == "auto":
        return (checkpoint_pooling(model_path) if private else None) or "model"
    return requested


class PooledClassifier(nn.Module):
    """``classifier(mean over tokens(encoder(x)))`` with cross-entropy on labels."""

    def __init__(self, encoder: nn.Module, num_labels: int, *, dropout: float = 0.1) -> None:
        super().__init__()
        self.prefix = getattr(encoder, "base_model_prefix", "") or "encoder"
        setattr(self, self.prefix, encoder)
        self.config = encoder.config
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)
        std = float(getattr(encoder.config, "initializer_range", 0.02))
        nn.init.normal_(self.classifier.weight, std=std)  # as transformers' heads start
        nn.init.zeros_(self.classifier.bias)
        self.num_labels = num_labels

    @property
    def encoder(self) -> nn.Module:
        return getattr(self, self.prefix)

    def get_input_embeddings(self) -> nn.Module:
        return self.encoder.get_input_embeddings()

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               **inputs: Any) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                              **inputs).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return ((hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)).float()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **inputs: Any):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        inputs = {k: v for k, v in inputs.items() if k == "token_type_ids"}
        pooled = self.dropout(self.pooled(input_ids, attention_mask, **inputs))
        head_dtype = next(self.classifier.parameters()).dtype  # a frozen head may be bfloat16
        logits = self.classifier(pooled.to(head_dtype))
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


def head_module(model: nn.Module) -> nn.Module:
    """The trainable copy of a peft model's classification head (its modules_to_save)."""
    heads = [m for m in model.modules() if isinstance(m, ModulesToSaveWrapper)]
    if len(heads) != 1:
        raise ValueError(f"expected one trained classification head, found {len(heads)}")
    wrapper = heads[0]
    return wrapper.modules_to_save[wrapper.active_adapter if isinstance(
        wrapper.active_adapter, str) else wrapper.active_adapter[0]]


@torch.no_grad()  # not inference mode: the head trains on these rows afterwards
def head_inputs(model: nn.Module, data: Any, indices: np.ndarray, *,
                batch_size: int = 128) -> torch.Tensor:
    """What the trained head reads for each of ``indices`` (rows in that order), with the
    adapter as it is now and dropout off: (n, ...) float32 on the model's device."""
    head = head_module(model)
    captured: list[torch.Tensor] = []

    def grab(module: nn.Module, args: tuple) -> None:
        captured.append(args[0].detach().float())

    handle = head.register_forward_pre_hook(grab)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    idx = np.asarray(indices, dtype=np.int64)
    # Batches of similar length pad little; the rows go back to the order of ``indices``.
    order = sorted(range(len(idx)), key=lambda j: len(data.input_ids[idx[j]]))
    try:
        for start in range(0, len(order), batch_size):
            batch = data.collate(idx[order[start : start + batch_size]])
            model(**{k: v.to(device) for k, v in batch.items() if k != "labels"})
    finally:
        handle.remove()
        model.train(was_training)
    # A head that reads every token (e.g. RoBERTa's) gets rows of each batch's own padded
    # width: pad them to one width (the head reads the first token, which padding leaves).
    width = max((c.shape[1] for c in captured if c.dim() > 2), default=0)
    rows = torch.cat([nn.functional.pad(c, (0, 0, 0, width - c.shape[1])) if c.dim() > 2
                      else c for c in captured])
    out = torch.empty_like(rows)
    out[torch.as_tensor(order, device=rows.device)] = rows
    return out
