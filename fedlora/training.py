"""Local training and evaluation of a LoRA model on encoded text."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from .data import CausalLMDataset, EncodedDataset

if TYPE_CHECKING:
    from .run_config import RunConfig

__all__ = ["TrainResult", "EvalResult", "train", "evaluate", "trainable_parameters",
           "minibatches"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    loss: float  # mean training loss over the steps taken
    steps: int
    examples: int  # examples seen (steps x batch size, fewer in a short last batch)


@dataclass(frozen=True)
class EvalResult:
    """Classifier: mean cross-entropy per example, accuracy and the confusion matrix.
    Causal LM: mean cross-entropy per predicted token, next-token (top-1) accuracy and
    perplexity."""

    loss: float
    accuracy: float
    examples: int
    perplexity: float | None = None  # exp(loss), for causal language models only
    # (num_labels, num_labels) counts, [true][predicted]; classifiers only
    confusion: tuple[tuple[int, ...], ...] | None = None


# Logits of a causal LM are (rows, width, vocab): evaluate at most this many floats at once.
LOGIT_BUDGET = 2**25


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def model_device(model: nn.Module) -> torch.device:
    """The device the model's parameters are on (where its batches must go)."""
    return next(model.parameters()).device


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    if device.type == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@contextlib.contextmanager
def seeded_torch(seed: int):
    """Run a block with torch's global RNG (dropout) seeded by ``seed``, then restore it.

    A worker process serves many virtual clients in turn; without this, dropout masks would
    depend on which clients the process served before, and runs would not repeat.
    """
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed) % (2**63 - 1))
        yield


OPTIMIZERS = ("adamw", "sgd")


def make_optimizer(name: str, params, *, learning_rate: float, weight_decay: float):
    """AdamW, or SGD with momentum 0.9 (under DP-SGD's noise, Adam's per-coordinate scaling
    moves every coordinate by about the learning rate whatever its signal; SGD averages the
    noise out across steps)."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=learning_rate, momentum=0.9, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r} (known: {', '.join(OPTIMIZERS)})")


def minibatches(idx: np.ndarray, batch_size: int, total: int,
                rng: np.random.Generator) -> Iterator[np.ndarray]:
    """``total`` mini-batches of ``idx``: consecutive slices of a permutation, reshuffled
    (from ``rng``) each time it is used up; the last slice of a pass may be shorter."""
    order, pos = rng.permutation(idx), 0
    for _ in range(total):
        if pos >= len(order):
            order, pos = rng.permutation(idx), 0
        yield order[pos : pos + batch_size]
        pos += batch_size


def train(
    model: nn.Module,
    data: EncodedDataset,
    indices: Sequence[int] | np.ndarray,
    *,
    steps: int,
    epochs: int = 0,
    batch_size: int,
    learning_rate: float,
    weight_decay: float = 0.0,
    seed: int = 0,
    optimizer: str = "adamw",
) -> TrainResult:
    """Train the trainable (adapter) parameters with ``optimizer`` (AdamW by default).

    Runs ``epochs`` passes over ``indices`` when ``epochs`` > 0, else ``steps``
    mini-batches drawn by reshuffling ``indices`` as often as needed (seeded).
    """
    idx = np.asarray(indices, dtype=np.int64)
    if len(idx) == 0:
        raise ValueError("no training examples")
    rng = np.random.default_rng(seed)
    per_epoch = math.ceil(len(idx) / batch_size)
    total = epochs * per_epoch if epochs > 0 else steps
    params = trainable_parameters(model)
    device = model_device(model)
    opt = make_optimizer(optimizer, params, learning_rate=learning_rate,
                         weight_decay=weight_decay)
    model.train()
    losses, seen = [], 0
    with seeded_torch(seed):
        for batch_idx in minibatches(idx, batch_size, total, rng):
            batch = _to(data.collate(batch_idx), device)
            out = model(**batch)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(out.loss.item())
            seen += len(batch_idx)
    return TrainResult(loss=float(np.mean(losses)), steps=total, examples=seen)


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    data: EncodedDataset,
    indices: Sequence[int] | np.ndarray | None = None,
    *,
    batch_size: int = 128,
) -> EvalResult:
    """Mean cross-entropy, accuracy and confusion matrix over ``indices`` (all rows if
    None), in one pass; for a :class:`CausalLMDataset`, loss and accuracy per next token,
    with perplexity (see :class:`EvalResult`)."""
    idx = np.arange(len(data)) if indices is None else np.asarray(indices, dtype=np.int64)
    if len(idx) == 0:
        return EvalResult(loss=float("nan"), accuracy=float("nan"), examples=0,
                          perplexity=float("nan") if isinstance(data, CausalLMDataset) else None)
    if isinstance(data, CausalLMDataset):
        return _evaluate_lm(model, data, idx, batch_size=batch_size)
    model.eval()
    device = model_device(model)
    total_loss, correct, counts = 0.0, 0, None
    for batch in data.batches(idx, batch_size):
        batch = _to(batch, device)
        labels = batch.pop("labels")
        logits = model(**batch).logits  # (batch, num_labels)
        total_loss += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        k, pred = logits.shape[-1], logits.argmax(-1)
        correct += (pred == labels).sum().item()
        cells = torch.bincount(labels * k + pred, minlength=k * k).cpu()  # (k * k,)
        counts = cells if counts is None else counts + cells
    model.train()
    confusion = tuple(map(tuple, counts.view(k, k).tolist()))  # [true][predicted]
    return EvalResult(loss=total_loss / len(idx), accuracy=correct / len(idx), examples=len(idx),
                      confusion=confusion)


def _evaluate_lm(model: nn.Module, data: CausalLMDataset, idx: np.ndarray, *,
                 batch_size: int) -> EvalResult:
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 50_000
    nll, correct, tokens = 0.0, 0, 0
    model.eval()
    device = model_device(model)
    for batch in data.batches(idx, batch_size):
        batch = _to(batch, device)
        labels = batch.pop("labels")  # (batch, width): input ids, -100 on padding
        rows = max(1, LOGIT_BUDGET // (labels.shape[1] * vocab))
        for s in range(0, len(labels), rows):
            logits = model(input_ids=batch["input_ids"][s : s + rows],
                           attention_mask=batch["attention_mask"][s : s + rows]).logits
            logits = logits[:, :-1].float()  # (rows, width - 1, vocab): predicts token t + 1
            target = labels[s : s + rows, 1:]  # (rows, width - 1)
            valid = target != -100
            nll += nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                               target.reshape(-1), ignore_index=-100,
                                               reduction="sum").item()
            correct += ((logits.argmax(-1) == target) & valid).sum().item()
            tokens += valid.sum().item()
    model.train()
    if tokens == 0:
        return EvalResult(loss=float("nan"), accuracy=float("nan"), examples=len(idx),
                          perplexity=float("nan"))
    loss = nll / tokens
    return EvalResult(loss=loss, accuracy=correct / tokens, examples=len(idx),
                      perplexity=math.exp(min(loss, 700.0)))


def train_as_configured(model: nn.Module, data: EncodedDataset,
                        indices: Sequence[int] | np.ndarray, cfg: RunConfig,
                        seed: int) -> TrainResult:
    """Plain local training with the run-config's settings: what a site runs when no local
    DP mechanism is on, and what a mechanism runs unless it trains otherwise."""
    return train(model, data, indices, steps=cfg.local_steps, epochs=cfg.local_epochs,
                 batch_size=cfg.batch_size, learning_rate=cfg.learning_rate,
                 weight_decay=cfg.weight_decay, seed=seed, optimizer=cfg.optimizer)
