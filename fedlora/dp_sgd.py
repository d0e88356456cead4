"""DP-SGD on a client: Opacus per-example gradients, clipped, noised from OS entropy.

What every private step rests on, in one place: dropout off while a site trains under DP
(:func:`dropout_off`), a non-finite per-example gradient counted as zero
(:func:`zero_nonfinite_examples`), a step on an empty batch still noised
(:func:`noise_only_step`), a causal LM's loss a mean per example
(:func:`per_example_lm_loss`), and :func:`train_private`, which takes Poisson batches in
physical chunks (memory bounded, one noisy step per logical batch). Plain training is
:mod:`fedlora.training`'s.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn

from . import entropy
from .data import CausalLMDataset, EncodedDataset
from .training import (
    TrainResult,
    _to,
    make_optimizer,
    model_device,
    trainable_parameters,
)

__all__ = ["dropout_off", "noise_only_step", "per_example_lm_loss", "private_step",
           "release_grad_samples", "train_private", "zero_nonfinite_examples"]

log = logging.getLogger(__name__)


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
    max_physical_batch_size: int | None = None,
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
    gradient is one clipped term however long it is. With ``max_physical_batch_size``
    a Poisson batch is taken in chunks of at most that many examples: each chunk's
    per-example gradients are clipped and added up, and the noise is added once per logical
    batch, so memory is bounded by the chunk and the release is the same.
    """
    idx = np.asarray(indices, dtype=np.int64)
    n = len(idx)
    if n == 0 and sample_rate is None:
        raise ValueError("no training examples")  # with a planned rate: steps of pure noise
    q = min(1.0, batch_size / n) if sample_rate is None else float(sample_rate)
    if not 0 < q <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    if expected_batch_size is None:
        expected_batch_size = max(1, round(q * n))
    rng = entropy.private_numpy_rng()
    params = trainable_parameters(model)
    device = model_device(model)
    causal_lm = isinstance(data, CausalLMDataset)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=False,
                           force_functorch=grad_sample_mode == "functorch")
    noise_gen = entropy.private_torch_generator(device)
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
            chunk = max_physical_batch_size or len(batch_idx)
            for start in range(0, len(batch_idx), chunk):
                batch = _to(data.collate(batch_idx[start : start + chunk]), device)
                if causal_lm:
                    labels = batch.pop("labels")
                    loss = per_example_lm_loss(gsm(**batch).logits, labels).mean()
                else:
                    loss = gsm(**batch).loss  # cross-entropy: a mean of per-example losses
                if start + chunk < len(batch_idx):  # clip and add up; noise at the last chunk
                    opt.signal_skip_step(do_skip=True)
                private_step(opt, loss)
                losses.append(loss.item())
            seen += len(batch_idx)
    finally:
        scope.close()
        release_grad_samples(gsm, params)
    return TrainResult(loss=float(np.mean(losses)) if losses else float("nan"), steps=steps,
                       examples=seen)
