"""One audited client, set up once and audited as many times as asked
(``simulations.audit_privacy``).

:class:`AuditSession` builds the model (with its configured dropout: the mechanism
switches it off itself), the client's real data, the canaries and what the auditor
knows; :meth:`AuditSession.run_once` draws which canaries go in (OS entropy), puts the
adapter back where every audit starts, trains ``rounds`` rounds through the mechanism's
own plan, train and release, scores every canary against each released update and turns
the right guesses into a lower bound on epsilon.

Phase ``lora``: the mechanism's ``train`` (DP-SGD for ``sample``); the auditor scores
the whole adapter with every example's gradient at the start of the round. Phase
``probe``: every round is a linear-probe round (the mechanism's ``train_head``:
full-batch DP-SGD on the head alone); the auditor scores the released head update with
every example's head-only gradient on the rows the head reads, which a probe round does
not change (read once per session); every real example is in every step of a probe
round, so one column stands for all of them in the fit (``pool_others`` of
:func:`~fedlora.privacy.audit.canary_scores`).

Scoring (``score``): ``sum`` adds each round's z-scores; ``llr`` (LoRA phase, ``sample``)
adds each round's log-likelihood ratio of a canary drawn ``Binomial(steps, q)`` times
(:func:`~fedlora.privacy.audit.presence_llr`), its signal per draw ``lr * C / batch`` (an
SGD step of Opacus' clipped, summed, divided gradient: exact with one step a round) over
the fit's standard error, the noise estimated from the fit's residual. ``gradients``:
``fresh`` takes every example's gradient at the start of each round; ``initial`` keeps those
at the start of the run (the same for every audit of the session, so many short rounds
cost no more gradients). Any scoring keeps the bound valid: it only changes the power.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np

from simulations.audit_gradients import (
    concat,
    flat,
    guess_sizes,
    head_gradients,
    key_params,
    make_canaries,
    per_example_gradients,
)

__all__ = ["AuditSession", "GRADIENTS", "SCORES"]

SCORES = ("sum", "llr")
GRADIENTS = ("fresh", "initial")


class AuditSession:
    """A client with canaries, audited by :meth:`run_once` (see the module docstring)."""

    def __init__(self, *, mode: str, epsilon: float, canaries: int, rounds: int,
                 noise_scale: float, known_noise: bool, phase: str, partition: int,
                 partitions: int, cfg, score: str = "sum", gradients: str = "fresh",
                 log=print) -> None:
        from fedlora import privacy, runtime
        from fedlora.adapters import adapter_state
        from fedlora.models import build_lora_model, load_tokenizer
        from fedlora.tasks import get_task

        self.mode, self.epsilon, self.canaries, self.rounds = mode, epsilon, canaries, rounds
        self.noise_scale, self.known_noise, self.phase = noise_scale, known_noise, phase
        self.partition, self.cfg, self.log = partition, cfg, log
        if score not in SCORES or gradients not in GRADIENTS:
            raise ValueError(f"score must be one of {SCORES} and gradients one of "
                             f"{GRADIENTS}, got {score!r}, {gradients!r}")
        if score == "llr" and (mode != "sample" or phase != "lora"):
            raise ValueError("score llr models DP-SGD's sampled steps: --mode sample, "
                             "--phase lora")
        self.score, self.gradients = score, gradients
        self.mechanism = privacy.client_mechanism(cfg.dp_mode)
        if self.mechanism is None:
            raise ValueError(f"dp-mode {cfg.dp_mode!r} runs no mechanism on the client")
        if phase == "probe" and (known_noise or not self.mechanism.probe):
            raise ValueError("--phase probe audits dp-mode sample's linear-probe rounds "
                             "(no --known-noise)")
        if get_task(cfg.task).causal_lm:
            raise ValueError(f"task {cfg.task!r} is a causal LM: the audit's canaries are "
                             "labelled examples of a classification task")
        self.model = build_lora_model(runtime.model_spec(cfg))  # dropout as configured
        self.key_params = key_params(self.model, head_only=phase == "probe")
        self.keys = [k for k, _, _ in self.key_params]
        if cfg.data_path:  # a site's own file (e.g. a test's)
            client = runtime.client_data(cfg, partition_id=None, num_partitions=None,
                                         data_path=cfg.data_path)
        else:
            client = runtime.client_data(cfg, partition_id=partition,
                                         num_partitions=partitions, data_path=None)
        self.real = client.data.data.subset(client.train_idx)
        tokenizer = load_tokenizer(get_task(cfg.task).model_path(cfg))
        self.canary_set = make_canaries(tokenizer, canaries, self.real.label_names,
                                        np.random.default_rng([cfg.seed, 0xCA7A]))
        self.known = runtime.encode(cfg, concat(self.real, self.canary_set))
        self.all_idx = np.arange(len(self.known))
        self.initial = adapter_state(self.model)  # where every audit starts
        self._first_grads: np.ndarray | None = None  # at self.initial: the same each audit
        self._feats = None  # probe phase: what the head reads, every example the auditor knows

    def _gradients(self, r: int) -> np.ndarray:
        """(n_real + m, d): every known example's gradient at the start of round ``r``."""
        if self._first_grads is not None and (r == 1 or self.gradients == "initial"):
            return self._first_grads
        if self.phase == "probe":
            import torch

            from fedlora.heads import head_inputs

            if self._feats is None:  # the encoder does not train in a probe round
                self._feats = head_inputs(self.model, self.known, self.all_idx,
                                          batch_size=self.cfg.eval_batch_size)
            labels = self.known.labels[torch.as_tensor(self.all_idx)]
            grads = head_gradients(self.model, self._feats, labels, self.key_params)
        else:
            grads = per_example_gradients(self.model, self.known, self.all_idx,
                                          self.key_params)
        if r == 1:
            self._first_grads = grads
        return grads

    def run_once(self) -> dict[str, Any]:
        """One audit (see the module docstring); returns what it found."""
        from fedlora import privacy, runtime
        from fedlora.adapters import adapter_state, load_adapter_state
        from fedlora.privacy.audit import audit_guesses, canary_fit, canary_scores, presence_llr
        from fedlora.privacy.gaussian import gaussian_noise_like
        from fedlora.privacy.update_level import privatize_reply, update_noise_std
        from simulations.audit_privacy import KNOWN_NOISE_SEED

        t0 = time.perf_counter()
        cfg, m, model = self.cfg, self.canaries, self.model
        load_adapter_state(model, self.initial)
        included = privacy.private_numpy_rng().random(m) < 0.5  # OS entropy
        data = runtime.encode(cfg, concat(self.real,
                                          self.canary_set.subset(np.flatnonzero(included))))
        idx = np.arange(len(data))
        plan = self.mechanism.plan(cfg, len(idx))  # as the ClientApp plans it
        used = dataclasses.replace(plan, noise_multiplier=plan.noise_multiplier
                                   * self.noise_scale)
        self.log(f"audit {self.mode} ({self.phase}): claimed epsilon {self.epsilon:g} "
                 f"(delta {cfg.target_delta:g}) over {self.rounds} round(s); sigma "
                 f"{plan.noise_multiplier:.4g}"
                 + (f", used x{self.noise_scale:g} = {used.noise_multiplier:.4g}"
                    if self.noise_scale != 1 else "")
                 + (", noise known to the auditor" if self.known_noise else "")
                 + f"; {len(self.real)} real examples + {int(included.sum())} of {m} canaries")
        scores = np.zeros(m)
        for r in range(1, self.rounds + 1):
            t1 = time.perf_counter()
            start = adapter_state(model)
            grads = self._gradients(r)  # (n_real + m, d)
            seed = cfg.seed * 1_000_003 + r * 7919 + self.partition  # as the ClientApp does
            if self.phase == "probe":
                self.mechanism.train_head(model, data, idx, plan=used, cfg=cfg)
            else:
                self.mechanism.train(model, data, idx, plan=used, cfg=cfg, seed=seed)
            trained = adapter_state(model)
            if self.known_noise:  # noise from a generator whose seed the auditor knows
                released = privatize_reply(trained, start, max_norm=cfg.update_max_norm,
                                           noise_multiplier=used.noise_multiplier,
                                           rng=np.random.default_rng(KNOWN_NOISE_SEED + r))
            else:
                released = self.mechanism.release(trained, start, plan=used, cfg=cfg)
            load_adapter_state(model, released)
            update = flat(released, self.keys) - flat(start, self.keys)
            if self.known_noise:
                std = update_noise_std(noise_multiplier=used.noise_multiplier,
                                       max_norm=cfg.update_max_norm)
                noise = gaussian_noise_like(trained, std,  # as privatize_reply draws it
                                            np.random.default_rng(KNOWN_NOISE_SEED + r))
                update -= flat(noise, self.keys)
            pool = self.phase == "probe"  # every real example in every step
            if self.score == "llr":
                coef, se = canary_fit(update, grads, m)
                scores += presence_llr(coef / se, signal=cfg.learning_rate * cfg.max_grad_norm
                                       / cfg.batch_size / se, steps=used.steps,
                                       sample_rate=used.sample_rate)
            else:
                scores += canary_scores(update, grads, m, pool_others=pool)
            self.log(f"round {r}/{self.rounds}: gradients and training "
                     f"{time.perf_counter() - t1:.1f} s")
        outcome = audit_guesses(scores, included, sizes=guess_sizes(m), delta=cfg.target_delta)
        return {
            "mode": self.mode, "phase": self.phase, "claimed_epsilon": self.epsilon,
            "delta": cfg.target_delta, "epsilon_lower_bound": outcome.epsilon_lower_bound,
            "confidence": outcome.confidence, "ceiling": outcome.ceiling,
            "guesses": {"in": outcome.k_pos, "out": outcome.k_neg,
                        "made": outcome.num_guesses, "right": outcome.num_correct},
            "tested": [dict(zip(("in", "out", "made", "right", "bound"), t))
                       for t in outcome.tested],
            "noise_multiplier": plan.noise_multiplier, "noise_scale": self.noise_scale,
            "known_noise": self.known_noise, "rounds": self.rounds, "canaries": m,
            "score": self.score, "gradients": self.gradients,
            "canaries_in": int(included.sum()), "real_examples": len(self.real),
            "sample_rate": plan.sample_rate, "steps_per_round": plan.steps,
            "probe_steps_per_round": plan.probe_steps,
            "scored_entries": int(sum(size for _, _, size in self.key_params)),
            "seconds": time.perf_counter() - t0,
            "run_config": {k: getattr(cfg, k.replace("-", "_"), None) for k in (
                "task", "batch-size", "local-steps", "local-epochs", "learning-rate",
                "optimizer", "lora-rank", "max-grad-norm", "update-max-norm", "train-head",
                "probe-rounds", "probe-steps", "probe-learning-rate", "base-dtype",
                "accountant", "seed")},
        }
