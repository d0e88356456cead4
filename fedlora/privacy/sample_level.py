"""``dp-mode = sample``: DP-SGD with Opacus on every client (example-level DP).

Each local step draws a Poisson sample of the client's examples at rate
``q = batch-size / n~`` (from OS entropy; ``n~`` is the site's noised example count,
released once, :mod:`fedlora.privacy.count`), clips every per-example gradient of the trainable
(adapter) parameters to ``max-grad-norm`` ``C`` and adds ``N(0, (sigma C)^2)`` to their sum
(Opacus' DPOptimizer, its generator seeded from OS entropy on the parameters' device). A
round is ``local-steps`` subsampled Gaussian steps ``(sigma, q)`` in the client's ledger.

Neighbouring relation: add or remove one training example of one client. The guarantee
holds against everyone outside the site: the server, the other sites and whoever holds
the released adapters. A causal LM's loss is a mean per example (over that example's
tokens) before the batch reduction, so one example's gradient is one clipped term.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from transformers import AutoConfig

from .. import dp_sgd  # train_private looked up at call time (tests watch it)
from ..config import KEYS_BY_NAME, ConfigError
from ..probe import train_head
from ..tasks import get_task
from .accounting import epsilon_of_history
from .count import COUNT_NOISE_STD, count_history, full_batch_denominator
from .mechanisms import ClientMechanism, DpPlan, calibrated_sigma, register
from .reply_bound import dp_sgd_reply_bound, probe_reply_bound

if TYPE_CHECKING:
    from ..run_config import RunConfig

__all__ = ["SampleLevel"]

#: The DP recipe's LoRA rounds at the end of the run (the rounds before probe the head).
RECIPE_LORA_ROUNDS = 2
#: The largest noise-to-signal ratio of a site's private probe step before the recipe
#: gives it fewer, longer steps (:meth:`SampleLevel.probe_schedule`). At 6 the default
#: task's sites (rho 0.4 at epsilon 8, 2.3 at 1) keep the run-config's 20 steps; BBC News
#: sites of about 90 articles (rho 19.8 at epsilon 1) take 2.
PROBE_NOISE_RATIO = 6.0
#: Distributed DP (with secure aggregation): the recipe's rounds, each one step of the head
#: over the union of the sites' data (fedlora.distributed_dp), and the server's Adam rate.
DISTRIBUTED_ROUNDS = 30
DISTRIBUTED_LEARNING_RATE = 0.03
DISTRIBUTED_EVALUATE_EVERY = 5


@functools.lru_cache(maxsize=8)
def _hidden_size(model_path: str) -> int:
    """The hidden width of a model folder (its config.json; no weights are read)."""
    config = AutoConfig.from_pretrained(model_path)
    for name in ("hidden_size", "dim", "n_embd", "d_model"):
        if isinstance(getattr(config, name, None), int):
            return int(getattr(config, name))
    raise ValueError(f"cannot tell the hidden size of the model at {model_path}")


def probe_dims(cfg: RunConfig) -> int:
    """The entries a linear head on the model's features has: ``(hidden + 1) x labels``."""
    task = get_task(cfg.task)
    return (_hidden_size(task.model_path(cfg)) + 1) * len(task.label_names(cfg))


def _causal_lm(task: str) -> bool:
    """Whether the registered task is a causal LM (no classification head to probe)."""
    try:
        return get_task(task).causal_lm
    except ValueError:
        return False  # an unknown task is refused by the config checks, naming the key


def recipe_probe_rounds(rounds: int) -> int:
    """The recipe's linear-probe rounds: all but the last RECIPE_LORA_ROUNDS, and at least
    half of a short run."""
    return max(rounds - RECIPE_LORA_ROUNDS, (rounds + 1) // 2)



@register
class SampleLevel(ClientMechanism):
    name = "sample"
    neighbouring = ("add or remove one training example of a client (example-level); against "
                    "the server, other sites and whoever holds the released adapters")

    probe = True

    def recipe(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """Every client in every round (sigma is planned as if each took part in all of
        them, so sampling fewer only throws signal away); linear probing first, then LoRA."""
        if values["dp-mode"] != self.name:
            return {}
        out: dict[str, Any] = {"fraction-train": 1.0}
        if values["secure-aggregation"]:  # distributed DP: every round a step of the head
            rounds = values["num-server-rounds"]
            if rounds == KEYS_BY_NAME["num-server-rounds"].default:
                rounds = DISTRIBUTED_ROUNDS
            return {**out, "num-server-rounds": rounds, "probe-rounds": rounds,
                    "probe-learning-rate": DISTRIBUTED_LEARNING_RATE,
                    "evaluate-every": DISTRIBUTED_EVALUATE_EVERY}
        if values["train-head"] and not _causal_lm(values["task"]):
            out["probe-rounds"] = recipe_probe_rounds(int(values["num-server-rounds"]))
        return out

    def describe(self, cfg: RunConfig) -> str:
        """The plan's choices in one line (the server logs it once at the start)."""
        if cfg.secure_aggregation:
            lora = cfg.num_server_rounds - min(cfg.probe_rounds, cfg.num_server_rounds)
            what = "the head" if not lora else (
                f"the head in rounds 1-{cfg.probe_rounds}, of the LoRA factors and the head "
                f"(Adam at {cfg.learning_rate:g}) in the last {lora}")
            return (f"dp-mode sample, distributed: each of the {cfg.num_server_rounds} rounds "
                    f"is one DP-SGD step of {what} over the union of the sampled sites' "
                    f"data (every example clipped to {cfg.max_grad_norm:g}), released by the "
                    f"secure sum with Skellam noise of noise multiplier "
                    f"{self.distributed_sigma(cfg):.4g}, each site adding its share for "
                    f"dp-min-honest = {cfg.dp_min_honest:g}; the server takes Adam steps at "
                    f"{cfg.probe_learning_rate:g}; target-epsilon {cfg.target_epsilon:g}")
        adapts = (f", fewer and longer where a site's steps would be mostly noise (at most "
                  f"{PROBE_NOISE_RATIO:g} times the signal; see probe_schedule)"
                  if cfg.dp_recipe == "auto" else "")
        probe = (f"rounds 1-{cfg.probe_rounds} train the head alone ({cfg.probe_steps} "
                 f"full-batch steps, SGD at {cfg.probe_learning_rate:g}{adapts}), then "
                 if cfg.probe_rounds else "")
        return (f"dp-mode sample: {probe}LoRA rounds of {cfg.local_steps} DP-SGD steps "
                f"(Poisson batches of about {cfg.batch_size}, {cfg.optimizer} at "
                f"{cfg.learning_rate:g}, clip {cfg.max_grad_norm:g}); fraction-train "
                f"{cfg.fraction_train:g}; each site calibrates sigma to target-epsilon "
                f"{cfg.target_epsilon:g} from its released example count")

    def check_config(self, cfg: RunConfig) -> None:
        super().check_config(cfg)
        count_cost = epsilon_of_history(count_history(COUNT_NOISE_STD), delta=cfg.target_delta,
                                        accountant=self.plan_accountant(cfg))
        if cfg.target_epsilon <= count_cost:
            raise ConfigError("target-epsilon", cfg.target_epsilon,
                              f"a float above {count_cost:.4f} with dp-mode = "
                              f"'{cfg.dp_mode}' (what releasing a site's noised example "
                              "count costs at this target-delta)")

        if cfg.secure_aggregation:
            self._check_distributed(cfg)

    @staticmethod
    def _check_distributed(cfg: RunConfig) -> None:
        """Distributed DP: every round one full-batch step (of the head in a probe round, of
        every sent tensor after), the same noise multiplier at every site (no round depends
        on a site's count), Renyi accounting. No round trains locally: local steps with only
        a share of the noise would not be private."""
        if _causal_lm(cfg.task) or not cfg.train_head:
            raise ConfigError("secure-aggregation", cfg.secure_aggregation,
                              "false with dp-mode = 'sample' for a task without a trained "
                              "classification head: distributed DP steps the head")
        if cfg.accountant == "prv":
            raise ConfigError("accountant", cfg.accountant,
                              "rdp with dp-mode = 'sample' and secure-aggregation = true (the "
                              "Skellam mechanism's bound is a Renyi-DP bound)")

    def plan_accountant(self, cfg: RunConfig) -> str:
        """Distributed steps are accounted at integer Renyi orders (fedlora.privacy.skellam)."""
        return "rdp-int" if cfg.secure_aggregation else cfg.accountant

    def distributed_sigma(self, cfg: RunConfig) -> float:
        """The noise multiplier of every distributed step: what :meth:`plan` gives any site
        (its rounds are full-batch steps, whatever its count; the same phases, so the same
        calibration)."""
        probe = min(cfg.probe_rounds, cfg.num_server_rounds)
        lora = cfg.num_server_rounds - probe
        phases = [*([(1.0, lora)] if lora else []), *([(1.0, probe)] if probe else [])]
        return calibrated_sigma(cfg.target_epsilon, cfg.target_delta, *phases[0],
                                self.plan_accountant(cfg), tuple(phases[1:]),
                                tuple(count_history(COUNT_NOISE_STD)))

    def plan_round(self, cfg: RunConfig, num_examples: int | None) -> tuple[float, int]:
        if cfg.secure_aggregation:  # one distributed full-batch step per round
            return 1.0, 1
        return min(1.0, cfg.batch_size / num_examples), cfg.local_steps  # the released count

    def reply_norm_bound(self, cfg: RunConfig, server_round: int, released_count: int,
                         dims: int, start_norm: float) -> float | None:
        """A probe round's full-batch head steps or a LoRA round's DP-SGD steps, as this
        site's plan (from its released count) runs them."""
        plan = self.plan(cfg, released_count)
        if 1 <= server_round <= plan.probe_rounds:
            return probe_reply_bound(released_count=released_count,
                                     noise_multiplier=plan.noise_multiplier,
                                     max_grad_norm=cfg.max_grad_norm, dims=dims,
                                     steps=plan.probe_steps,
                                     learning_rate=plan.probe_learning_rate)
        return dp_sgd_reply_bound(released_count=released_count, batch_size=cfg.batch_size,
                                  sample_rate=plan.sample_rate,
                                  noise_multiplier=plan.noise_multiplier,
                                  max_grad_norm=cfg.max_grad_norm, dims=dims, steps=plan.steps,
                                  learning_rate=cfg.learning_rate, optimizer=cfg.optimizer,
                                  weight_decay=cfg.weight_decay, start_norm=start_norm)

    def probe_schedule(self, cfg: RunConfig, num_examples: int | None,
                       sigma_for: Any) -> tuple[int, float]:
        """The DP recipe's probe schedule for a site that released ``num_examples``.

        A private full-batch step of the head moves it by the clipped mean gradient (norm
        at most ``C``) plus noise of norm about ``sigma C sqrt(d) / D`` (``d`` the head's
        entries, ``(hidden + 1) x labels``; ``D = max(n~, 100)``). Where that ratio
        ``rho = sigma sqrt(d) / D`` exceeds :data:`PROBE_NOISE_RATIO`, the site's steps are
        mostly noise and its head drifts where later steps read nothing; with ``T`` steps
        per round sigma grows about as ``sqrt(T)``, so the site takes
        ``T = round(probe-steps (PROBE_NOISE_RATIO / rho)^2)`` steps (at least 1) and
        keeps the same path length, ``probe-learning-rate x probe-steps / T``. Sigma is
        then calibrated for the steps it takes. A site whose steps are clean takes the
        run-config's schedule. Only with ``dp-recipe = auto``."""
        steps, lr = super().probe_schedule(cfg, num_examples, sigma_for)
        if cfg.secure_aggregation:  # one distributed step per round
            return 1, lr
        if cfg.dp_recipe != "auto" or num_examples is None or steps <= 1:
            return steps, lr
        rho = sigma_for(steps) * math.sqrt(probe_dims(cfg)) / full_batch_denominator(num_examples)
        if rho <= PROBE_NOISE_RATIO:
            return steps, lr
        fewer = max(1, min(steps, round(steps * (PROBE_NOISE_RATIO / rho) ** 2)))
        return fewer, lr * steps / fewer

    def worst_probe_round(self, cfg: RunConfig) -> tuple[float, int]:
        """``(sigma, steps)`` of the dearest probe round any released count could give:
        for ``T`` steps at rate 1 a round's Renyi DP is ``a T / (2 sigma^2)`` at every order
        ``a``, and sigma is at least what the probe rounds alone (no LoRA rounds, which only
        raise it) calibrate to; the largest ``T / sigma^2`` over the schedules
        :meth:`probe_schedule` can choose bounds every one of them."""
        if cfg.secure_aggregation:
            return self.distributed_sigma(cfg), 1
        probe = min(cfg.probe_rounds, cfg.num_server_rounds)
        steps, _ = super().probe_schedule(cfg, None, None)
        candidates = range(1, steps + 1) if cfg.dp_recipe == "auto" else (steps,)
        worst = None
        for t in candidates:
            sigma = calibrated_sigma(cfg.target_epsilon, cfg.target_delta, 1.0, probe * t,
                                     cfg.accountant, (), tuple(count_history(COUNT_NOISE_STD)))
            if worst is None or t / sigma ** 2 > worst[1] / worst[0] ** 2:
                worst = (sigma, t)
        return worst

    def train_head(self, model: Any, data: Any, indices: np.ndarray, *, plan: DpPlan | None,
                   cfg: RunConfig) -> Any:
        return train_head(model, data, indices, steps=plan.probe_steps,
                          learning_rate=plan.probe_learning_rate,
                          noise_multiplier=plan.noise_multiplier,
                          max_grad_norm=cfg.max_grad_norm, batch_size=cfg.eval_batch_size,
                          denominator=full_batch_denominator(plan.examples))

    def train(self, model: Any, data: Any, indices: np.ndarray, *, plan: DpPlan, cfg: RunConfig,
              seed: int) -> Any:
        return dp_sgd.train_private(
            model, data, indices, steps=plan.steps, batch_size=cfg.batch_size,
            learning_rate=cfg.learning_rate, noise_multiplier=plan.noise_multiplier,
            max_grad_norm=cfg.max_grad_norm, weight_decay=cfg.weight_decay,
            optimizer=cfg.optimizer, sample_rate=plan.sample_rate,
            expected_batch_size=cfg.batch_size,
            max_physical_batch_size=cfg.max_physical_batch_size)
