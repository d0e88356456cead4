"""``dp-mode = sample``: DP-SGD with Opacus on every client (example-level DP).

Each local step draws a Poisson sample of the client's ``n`` examples at rate
``q = batch-size / n`` (from OS entropy), clips every per-example gradient of the trainable
(adapter) parameters to ``max-grad-norm`` ``C`` and adds ``N(0, (sigma C)^2)`` to their sum
(Opacus' DPOptimizer, its generator seeded from OS entropy on the parameters' device). A
round is ``local-steps`` subsampled Gaussian steps ``(sigma, q)`` in the client's ledger.

Neighbouring relation: add or remove one training example of one client. The guarantee
holds against everyone outside the site: the server, the other sites and whoever holds
the released adapters. A causal LM's loss is a mean per example (over that example's
tokens) before the batch reduction, so one example's gradient is one clipped term.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..config import ConfigError
from .mechanisms import ClientMechanism, DpPlan, register

__all__ = ["SampleLevel"]


@register
class SampleLevel(ClientMechanism):
    name = "sample"
    neighbouring = ("add or remove one training example of a client (example-level); against "
                    "the server, other sites and whoever holds the released adapters")

    def check_config(self, cfg: Any) -> None:
        super().check_config(cfg)
        if cfg.local_epochs > 0:
            raise ConfigError("local-epochs", cfg.local_epochs,
                              f"0 with dp-mode = '{cfg.dp_mode}' (DP-SGD runs local-steps "
                              "Poisson-sampled steps)")

    def plan_round(self, cfg: Any, num_examples: int) -> tuple[float, int]:
        return min(1.0, cfg.batch_size / num_examples), cfg.local_steps

    def train(self, model: Any, data: Any, indices: np.ndarray, *, plan: DpPlan, cfg: Any,
              seed: int) -> Any:
        from ..training import train_private

        return train_private(model, data, indices, steps=plan.steps, batch_size=cfg.batch_size,
                             learning_rate=cfg.learning_rate,
                             noise_multiplier=plan.noise_multiplier,
                             max_grad_norm=cfg.max_grad_norm, weight_decay=cfg.weight_decay,
                             seed=seed, optimizer=cfg.optimizer)
