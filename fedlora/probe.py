"""Linear-probe rounds: a client trains only the classification head (LP before LoRA).

In the first ``probe-rounds`` rounds (LP-FT), each client reads what the head reads
(:func:`fedlora.heads.head_inputs`, the encoder run once with the adapter as received) and
trains the head alone by full-batch gradient descent: ``probe-steps`` steps of SGD at
``probe-learning-rate``. The LoRA factors are left as received. Under ``dp-mode = sample``
every step is a DP-SGD step (Opacus) with sampling rate 1: every example's gradient clipped
to ``max-grad-norm`` and Gaussian noise of std ``sigma * max-grad-norm`` on their sum, the
noise drawn from OS entropy. Few trained dimensions and the whole client's data in every
step put far less noise on each coordinate than DP-SGD on the adapter does.

What the head reads is kept per process for the rounds in which the adapter does not
change (it does not during the probe rounds), so the encoder runs once per client.
"""

from __future__ import annotations

import hashlib
import threading
import weakref
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn

from . import entropy
from .adapter_families import is_adapter_parameter
from .dp_sgd import dropout_off, noise_only_step, private_step, release_grad_samples
from .heads import head_inputs, head_module
from .training import TrainResult

if TYPE_CHECKING:
    from .run_config import RunConfig

__all__ = ["is_probe_round", "train_head", "train_head_as_configured"]

# Per dataset (weakly held: a dataset dropped from the process takes its rows with it), the
# rows the head read for (model, indices, adapter outside the head).
_CACHE: weakref.WeakKeyDictionary[Any, OrderedDict[tuple, torch.Tensor]] = \
    weakref.WeakKeyDictionary()
_CACHE_SIZE = 512  # entries per dataset (distributed DP keeps one per chunk of 64 examples)
_LOCK = threading.Lock()


def is_probe_round(cfg: RunConfig, server_round: int) -> bool:
    """Whether ``server_round`` (1-based) trains the head alone."""
    return 1 <= server_round <= getattr(cfg, "probe_rounds", 0)


def _encoder_digest(model: nn.Module) -> str:
    """A digest of every trainable tensor outside the head: what the head reads depends on
    nothing else (the frozen base is fixed by the model itself)."""
    head = {id(p) for p in head_module(model).parameters()}
    h = hashlib.blake2b(digest_size=16)
    for name, p in model.named_parameters():
        if is_adapter_parameter(name) and id(p) not in head:
            h.update(name.encode())
            h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def features(model: nn.Module, data: Any, idx: np.ndarray, batch_size: int) -> torch.Tensor:
    key = (id(model), hashlib.blake2b(idx.tobytes(), digest_size=16).hexdigest(),
           _encoder_digest(model))
    with _LOCK:
        per_data = _CACHE.setdefault(data, OrderedDict())
        cached = per_data.get(key)
        if cached is not None:
            per_data.move_to_end(key)
            return cached
    feats = head_inputs(model, data, idx, batch_size=batch_size)
    with _LOCK:
        per_data[key] = feats
        while len(per_data) > _CACHE_SIZE:
            per_data.popitem(last=False)
    return feats


def train_head(model: nn.Module, data: Any, indices: np.ndarray, *, steps: int,
               learning_rate: float, noise_multiplier: float | None = None,
               max_grad_norm: float = 1.0, batch_size: int = 128,
               denominator: int | None = None) -> TrainResult:
    """Train the head alone for ``steps`` full-batch steps (DP-SGD when
    ``noise_multiplier`` is given; see the module docstring). A private step divides the
    noised gradient sum by ``denominator``: the site's released count, not ``n``."""
    idx = np.asarray(indices, dtype=np.int64)
    if len(idx) == 0 and noise_multiplier is None:
        raise ValueError("no training examples")
    head = head_module(model)
    if len(idx) == 0:  # under DP a site with no usable example still takes its noisy steps
        _noise_only(head, steps, learning_rate, noise_multiplier, max_grad_norm,
                    denominator or 1)
        return TrainResult(loss=float("nan"), steps=steps, examples=0)
    feats = features(model, data, idx, batch_size)
    labels = data.labels[torch.as_tensor(idx)].to(feats.device)
    params = [p for p in head.parameters() if p.requires_grad]
    # The head stays in training mode (Opacus records activations only then); the dropout
    # before it is the encoder side's, off while the rows were read.
    if noise_multiplier is None:
        losses = _descend(head, params, feats, labels, steps, learning_rate)
    else:
        losses = _descend_private(head, params, feats, labels, steps, learning_rate,
                                  noise_multiplier, max_grad_norm,
                                  denominator or len(labels))
    return TrainResult(loss=float(np.mean(losses)) if losses else float("nan"), steps=steps,
                       examples=steps * len(idx))


def _descend(head: nn.Module, params: list, feats: torch.Tensor, labels: torch.Tensor,
             steps: int, lr: float) -> list[float]:
    opt = torch.optim.SGD(params, lr=lr)
    losses = []
    for _ in range(steps):
        loss = nn.functional.cross_entropy(head(feats), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def _descend_private(head: nn.Module, params: list, feats: torch.Tensor, labels: torch.Tensor,
                     steps: int, lr: float, noise_multiplier: float,
                     max_grad_norm: float, denominator: int) -> list[float]:
    """DP-SGD at sampling rate 1: every example in every step, each gradient clipped."""
    gsm, opt = _private_head(head, params, lr, noise_multiplier, max_grad_norm, denominator)
    losses = []
    try:  # dropout inside a head (e.g. RoBERTa's) would make one example move the others
        with dropout_off(head):
            for _ in range(steps):
                loss = nn.functional.cross_entropy(gsm(feats), labels)
                private_step(opt, loss)
                losses.append(loss.item())
    finally:
        release_grad_samples(gsm, params)
    return losses


def _private_head(head: nn.Module, params: list, lr: float, noise_multiplier: float,
                  max_grad_norm: float, denominator: int):
    """The head wrapped for per-example gradients, and its DP-SGD optimizer (noise from OS
    entropy on the head's device)."""
    device = params[0].device
    gsm = GradSampleModule(head, batch_first=True, loss_reduction="mean", strict=False)
    opt = DPOptimizer(torch.optim.SGD(params, lr=lr), noise_multiplier=noise_multiplier,
                      max_grad_norm=max_grad_norm, expected_batch_size=int(denominator),
                      loss_reduction="mean", generator=entropy.private_torch_generator(device))
    return gsm, opt


def _noise_only(head: nn.Module, steps: int, lr: float, noise_multiplier: float,
                max_grad_norm: float, denominator: int) -> None:
    """``steps`` DP-SGD steps of the head on no example: noise alone."""
    params = [p for p in head.parameters() if p.requires_grad]
    gsm, opt = _private_head(head, params, lr, noise_multiplier, max_grad_norm, denominator)
    try:
        for _ in range(steps):
            noise_only_step(opt, params)
    finally:
        release_grad_samples(gsm, params)


def train_head_as_configured(model: nn.Module, data: Any, indices: np.ndarray,
                             cfg: RunConfig) -> TrainResult:
    """A plain linear-probe round with the run-config's settings (no privacy)."""
    return train_head(model, data, indices, steps=cfg.probe_steps,
                      learning_rate=cfg.probe_learning_rate, batch_size=cfg.eval_batch_size)
