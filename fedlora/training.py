"""Local training and evaluation of a LoRA model on encoded text."""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .data import CausalLMDataset, EncodedDataset

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


@contextlib.contextmanager
def dropout_off(model: nn.Module):
    """Run a block with every dropout of ``model`` at p = 0, then restore it.

    Under DP the dropout masks would be randomness the guarantee rests on: drawn from a
    seed everyone knows and laid out by an example's position in the batch and by the
    padded width, they let one added example change every other example's masks and so
    their clipped gradients (the clipped sum then moves by more than C). Off, each
    example's gradient depends on that example alone. Covers ``nn.Dropout`` modules (whose
    ``p`` attention code also reads) and float ``attention_dropout`` attributes (Llama).
    """
    saved: list[tuple[nn.Module, str, float]] = []
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            saved.append((module, "p", module.p))
            module.p = 0.0
        value = getattr(module, "attention_dropout", None)
        if isinstance(value, float):
            saved.append((module, "attention_dropout", value))
            module.attention_dropout = 0.0
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def zero_nonfinite_examples(params: Sequence[nn.Parameter]) -> int:
    """Zero every per-example gradient (Opacus ``grad_sample``) of an example whose gradient
    has a non-finite entry in any parameter; returns how many examples were zeroed.

    Opacus clips by ``C / (norm + 1e-6)``: one infinite gradient makes the whole noised sum
    NaN, and whether a site then refuses would be an un-noised bit about one example. A
    zeroed example contributes nothing, which the sensitivity C covers.
    """
    samples = [p.grad_sample for p in params if getattr(p, "grad_sample", None) is not None]
    if not samples:
        return 0
    bad = torch.zeros(samples[0].shape[0], dtype=torch.bool, device=samples[0].device)
    for g in samples:  # g: (batch, *param.shape)
        bad |= ~torch.isfinite(g.reshape(g.shape[0], -1)).all(dim=1)
    count = int(bad.sum())
    if count:
        for g in samples:
            g[bad] = 0
    return count


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


def private_step(opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    """One step of an Opacus DPOptimizer: per-example gradients (a non-finite one counts as
    zero), clip, noise, update. The step is always taken and released."""
    with warnings.catch_warnings():
        # Opacus' hooks on a model whose inputs need no grad: expected, harmless.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        loss.backward()
    zeroed = zero_nonfinite_examples(opt.params)
    if zeroed:  # stays in the site's log
        log.warning("%d example(s) had a non-finite gradient and counted as zero", zeroed)
    opt.step()
    opt.zero_grad(set_to_none=True)


def noise_only_step(opt: torch.optim.Optimizer, params: Sequence[nn.Parameter]) -> None:
    """A DP-SGD step on an empty batch: no gradient, but the step's noise is still added
    (so nothing reveals that the batch was empty)."""
    for p in params:
        p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
    opt.step()
    opt.zero_grad(set_to_none=True)


def release_grad_samples(gsm: nn.Module, params: Sequence[nn.Parameter]) -> None:
    """Remove Opacus' hooks and per-example state from a wrapped module's parameters: the
    cached model serves non-private clients too."""
    gsm._close()
    for p in params:
        for attr in ("grad_sample", "_forward_counter", "summed_grad"):
            if hasattr(p, attr):
                delattr(p, attr)
        p.grad = None


def per_example_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of each example, averaged over that example's own tokens.

    ``logits``: (batch, width, vocab); ``labels``: (batch, width), -100 on padding.
    Returns (batch,). An example with no predicted token has loss 0.
    """
    logits = logits[:, :-1].float()  # (batch, width - 1, vocab): predicts token t + 1
    target = labels[:, 1:]  # (batch, width - 1)
    tokens = nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100,
                                         reduction="none")  # (batch, width - 1)
    counts = (target != -100).sum(dim=1).clamp(min=1)
    return tokens.sum(dim=1) / counts


def train_private(
    model: nn.Module,
    data: EncodedDataset,
    indices: Sequence[int] | np.ndarray,
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    noise_multiplier: float,
    max_grad_norm: float,
    weight_decay: float = 0.0,
    grad_sample_mode: str = "hooks",
    optimizer: str = "adamw",
    sample_rate: float | None = None,
    expected_batch_size: int | None = None,
) -> TrainResult:
    """DP-SGD (Opacus) on the trainable (adapter) parameters only.

    Each step draws a Poisson sample of ``indices`` with rate ``q = sample_rate`` (default
    ``batch_size / n``), and the noised sum is divided by ``expected_batch_size`` (default
    ``q n``). Under DP both come from the site's released count, never from ``n`` itself
    (:mod:`fedlora.privacy.count`). Each step
    clips every per-example gradient to ``max_grad_norm`` and adds Gaussian noise of std
    ``noise_multiplier * max_grad_norm`` (Opacus' DPOptimizer). Frozen base weights get no
    gradient at all. Accounting is the caller's: ``steps`` steps at rate ``q``.

    The Poisson masks and the noise come from OS entropy (the noise generator on the
    parameters' device), never from ``seed``: whoever knows the run-config must not be able
    to regenerate them. Dropout is off (:func:`dropout_off`) and a non-finite per-example
    gradient counts as zero (:func:`zero_nonfinite_examples`), so one example moves the
    clipped sum by at most ``max_grad_norm`` whatever else is in the batch. An empty Poisson batch still takes a
    step of pure noise, so that nothing reveals that the batch was empty. A causal LM's loss
    is a mean per example over its own tokens, then over the batch, so that one example's
    gradient is one clipped term however long it is.
    """
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    from .privacy.entropy import private_numpy_rng, private_torch_generator

    idx = np.asarray(indices, dtype=np.int64)
    n = len(idx)
    if n == 0 and sample_rate is None:
        raise ValueError("no training examples")  # with a planned rate: steps of pure noise
    q = min(1.0, batch_size / n) if sample_rate is None else float(sample_rate)
    if not 0 < q <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    if expected_batch_size is None:
        expected_batch_size = max(1, round(q * n))
    rng = private_numpy_rng()
    params = trainable_parameters(model)
    device = model_device(model)
    causal_lm = isinstance(data, CausalLMDataset)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=False,
                           force_functorch=grad_sample_mode == "functorch")
    noise_gen = private_torch_generator(device)
    opt = DPOptimizer(
        make_optimizer(optimizer, params, learning_rate=learning_rate,
                       weight_decay=weight_decay),
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=int(expected_batch_size),
        loss_reduction="mean",
        generator=noise_gen,
    )
    gsm.train()
    losses, seen = [], 0
    scope = contextlib.ExitStack()
    scope.enter_context(dropout_off(model))
    try:
        for _ in range(steps):
            batch_idx = idx[rng.random(n) < q]  # Poisson sampling: each example with prob q
            if len(batch_idx) == 0:
                noise_only_step(opt, params)
                continue
            batch = _to(data.collate(batch_idx), device)
            if causal_lm:
                labels = batch.pop("labels")
                loss = per_example_lm_loss(gsm(**batch).logits, labels).mean()
            else:
                loss = gsm(**batch).loss  # cross-entropy: already a mean of per-example losses
            private_step(opt, loss)
            losses.append(loss.item())
            seen += len(batch_idx)
    finally:
        scope.close()
        release_grad_samples(gsm, params)
    return TrainResult(loss=float(np.mean(losses)) if losses else float("nan"), steps=steps,
                       examples=seen)
