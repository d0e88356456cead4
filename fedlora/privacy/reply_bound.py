"""The largest change an honest private reply can make to the adapter, from the plan.

The server refuses a reply whose change (L2 norm over every tensor it sends,
``Method.update_norm``) is larger than a bound. Under a DP mode an honest reply carries
noise whose norm grows with the number of noised dimensions ``d`` and the noise
multiplier, so a fixed ``max-update-norm`` either refuses honest private replies (a small
site's noisy probe step) or lets poisoned ones through. The functions here bound the
change from the plan alone (sigma, ``C``, the steps, the learning rate, the optimiser,
``d`` and the site's released count), each term with a tail bound that an honest reply
exceeds with probability below about 1e-13:

- the norm of ``N(0, s^2 I_d)`` exceeds ``s (sqrt(d) + t)`` with probability at most
  ``exp(-t^2 / 2)`` (Gaussian concentration of a 1-Lipschitz function); ``t`` is
  :data:`TAIL_T`;
- a site's true count ``n`` exceeds its released count ``n~`` by more than
  ``TAIL_T * COUNT_NOISE_STD`` with probability below ``exp(-t^2 / 2)``;
- a Poisson batch of mean ``mu`` exceeds ``mu + TAIL_T sqrt(mu) + 3 TAIL_T`` with
  probability below ``exp(-t^2 / 2)`` (Bernstein's inequality);
- SGD with momentum ``beta`` moves the parameters by at most ``lr / (1 - beta)`` times the
  sum of the gradient norms; Adam(W) moves each coordinate by at most ``lr K_t`` at step
  ``t``, ``K_t = (1 - b1) / (1 - b1^t) sqrt((1 - r^t) / (1 - r)) sqrt((1 - b2^t) /
  (1 - b2))`` with ``r = b1^2 / b2`` (Cauchy-Schwarz on the moment sums), whatever the
  gradients; weight decay adds ``lr wd`` times the parameters' norm at each step.
"""

from __future__ import annotations

import math

from .count import COUNT_NOISE_STD, full_batch_denominator

__all__ = ["TAIL_T", "adam_step_factor", "gaussian_norm_bound", "largest_count",
           "largest_poisson_batch", "displacement", "dp_sgd_reply_bound", "probe_reply_bound"]

#: Standard deviations of every tail bound (exp(-8^2 / 2) ~ 1.3e-14 per term).
TAIL_T = 8.0
ADAM_BETAS = (0.9, 0.999)  # torch.optim.AdamW's defaults, which fedlora uses
SGD_MOMENTUM = 0.9  # fedlora.training.make_optimizer's


def gaussian_norm_bound(dims: int, std: float) -> float:
    """A bound on the norm of ``N(0, std^2 I_dims)``."""
    return float(std) * (math.sqrt(max(int(dims), 0)) + TAIL_T)


def largest_count(released: int) -> float:
    """A bound on a site's true example count given the count it released."""
    return float(released) + TAIL_T * COUNT_NOISE_STD + 0.5  # (+0.5: the rounding)


def largest_poisson_batch(examples: float, rate: float) -> float:
    """A bound on a Poisson batch drawn at ``rate`` from ``examples`` examples."""
    mu = examples * min(1.0, rate)
    return min(examples, mu + TAIL_T * math.sqrt(mu) + 3 * TAIL_T)


def adam_step_factor(step: int, betas: tuple[float, float] = ADAM_BETAS) -> float:
    """``K_t``: how far, in units of the learning rate, Adam moves one coordinate at step
    ``step`` (1-based) at most, whatever its gradients were."""
    b1, b2 = betas
    r = b1 * b1 / b2
    return ((1 - b1) / (1 - b1 ** step) * math.sqrt((1 - r ** step) / (1 - r))
            * math.sqrt((1 - b2 ** step) / (1 - b2)))


def displacement(*, optimizer: str, steps: int, learning_rate: float, grad_bound: float,
                 dims: int, weight_decay: float = 0.0, start_norm: float = 0.0) -> float:
    """A bound on how far ``steps`` optimiser steps move the parameters, given a bound
    on every step's gradient norm (ignored by Adam, whose steps are bounded anyway).

    ``optimizer``: ``"adamw"``, ``"sgd"`` (momentum :data:`SGD_MOMENTUM`, coupled weight
    decay) or ``"plain-sgd"`` (no momentum, no weight decay: the probe's)."""
    lr, moved = float(learning_rate), 0.0
    if optimizer == "adamw":
        for t in range(1, steps + 1):
            moved += lr * (adam_step_factor(t) * math.sqrt(dims)
                           + weight_decay * (start_norm + moved))
        return moved
    if optimizer in ("sgd", "plain-sgd"):
        beta = SGD_MOMENTUM if optimizer == "sgd" else 0.0
        # Gradient s reaches the parameters through the momentum buffer at every later
        # step: in all, at most lr * (1 - beta^(steps - s + 1)) / (1 - beta) of it.
        for s in range(1, steps + 1):
            reach = sum(beta ** k for k in range(steps - s + 1))
            moved += lr * reach * (grad_bound + weight_decay * (start_norm + moved))
        return moved
    raise ValueError(f"unknown optimizer {optimizer!r}")


def dp_sgd_reply_bound(*, released_count: int, batch_size: int, sample_rate: float,
                       noise_multiplier: float, max_grad_norm: float, dims: int, steps: int,
                       learning_rate: float, optimizer: str, weight_decay: float = 0.0,
                       start_norm: float = 0.0) -> float:
    """A DP-SGD round (``fedlora.dp_sgd.train_private``): every step divides the clipped
    sum (at most ``C`` per example of its Poisson batch) plus ``N(0, (sigma C)^2 I_d)`` by
    the expected batch ``batch_size``."""
    batch = largest_poisson_batch(largest_count(released_count), sample_rate)
    grad = (max_grad_norm * batch
            + gaussian_norm_bound(dims, noise_multiplier * max_grad_norm)) / batch_size
    return displacement(optimizer=optimizer, steps=steps, learning_rate=learning_rate,
                        grad_bound=grad, dims=dims, weight_decay=weight_decay,
                        start_norm=start_norm)


def probe_reply_bound(*, released_count: int, noise_multiplier: float, max_grad_norm: float,
                      dims: int, steps: int, learning_rate: float) -> float:
    """A private probe round (``fedlora.probe.train_head``): full-batch SGD steps of the
    head, each dividing the clipped sum plus noise by the count's denominator."""
    denominator = full_batch_denominator(released_count)
    grad = (max_grad_norm * largest_count(released_count)
            + gaussian_norm_bound(dims, noise_multiplier * max_grad_norm)) / denominator
    return displacement(optimizer="plain-sgd", steps=steps, learning_rate=learning_rate,
                        grad_bound=grad, dims=dims)
