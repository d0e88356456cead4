"""Empirical privacy audit of a client's DP mechanism in one run (Steinke, Nasr & Jagielski 2023).

    python -m simulations.audit_privacy                                  # sample, epsilon 1
    python -m simulations.audit_privacy --mode update --epsilon 8
    python -m simulations.audit_privacy --broken-noise-scale 0.01        # a broken mechanism
    python -m simulations.audit_privacy --mode update --known-noise      # noise the auditor knows

One client holds a real partition of the task's data plus ``--canaries`` canary examples
(texts of random vocabulary words with a random label, all different), each put in its
training data independently with probability 1/2, drawn from OS entropy. The client trains
for ``--rounds`` rounds exactly as the ClientApp does: its mechanism's plan (sigma calibrated
for ``--epsilon`` over those rounds), its ``train`` (DP-SGD for ``sample``; ordinary training
for ``update``) and its ``release`` (the update clipped and noised for ``update``); each round
starts from the adapter released by the one before, as a client that is the whole federation.

The auditor sees every released adapter and knows everything but which canaries went in
and the mechanism's randomness (white box). At the start of each round it takes every
example's loss gradient; the released update is, to first order, minus a non-negative
combination of the gradients of what was trained on, plus noise; least squares over those
gradients gives each canary a z-score (:func:`fedlora.privacy.audit.canary_scores`), summed
over rounds. It guesses "in" for the highest and "out" for the lowest scores at a few sizes
fixed in advance, and turns the number of right guesses into a 95% lower bound on epsilon
(Bonferroni over the sizes). The bound of an honest mechanism stays at or under its claim
(with 95% probability); a bound above it means the mechanism leaks more than it claims.

To give the audit teeth the run-config differs from the app's defaults where a DP
guarantee does not depend on it (``--set`` overrides any of it): no classification head
trained (its gradient is shared by all examples and would fill the clipping norm), small
clipping norms (every per-example gradient of ``sample`` and every update of ``update`` is
clipped, so that the noise, calibrated to the norm, is as small as the signal allows), SGD
with small steps (the update stays linear in the gradients), a float32 base and no dropout
in the model (the auditor's gradients are the ones trained on).

``--broken-noise-scale`` multiplies the noise multiplier the mechanism is given (a wrong
calibration: the claim stays the same). ``--known-noise`` (``update``) draws the noise from a
generator the auditor can replay (as if it were seeded from the public run-config seed) and
subtracts it. The last line printed is the claim and the bound; a JSON copy goes to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from simulations.harness import parse_sets  # noqa: E402

#: What the audit changes in the app's defaults (see the module docstring), then per mode.
AUDIT_DEFAULTS: dict[str, Any] = {
    "train-head": False, "optimizer": "sgd", "max-grad-norm": 1e-3, "update-max-norm": 1e-6,
    "base-dtype": "float32", "dp-recipe": "none", "probe-rounds": 0, "batch-size": 32,
}
MODE_DEFAULTS: dict[str, dict[str, Any]] = {
    # every gradient clipped to C: lr * C sets how far a step goes
    "sample": {"local-steps": 10, "learning-rate": 0.02},
    # about one pass over a client's data a round (a private client runs local-steps steps,
    # never epochs), unclipped gradients: a small step keeps it linear
    "update": {"local-steps": 20, "learning-rate": 0.0001},
}
CANARY_WORDS = 8  # words per canary text
GRAD_BATCH = 32  # examples per per-example-gradient pass
KNOWN_NOISE_SEED = 0  # the generator --known-noise hands to the mechanism (and the auditor)


def audit_config(mode: str, epsilon: float, rounds: int, extra: dict[str, Any] | None = None):
    """The validated run-config of an audit: the app's, with :data:`AUDIT_DEFAULTS`."""
    from fedlora import runtime
    from fedlora.config import KEYS_BY_NAME

    defaults = {**AUDIT_DEFAULTS, **MODE_DEFAULTS.get(mode, {})}
    values = {k: v for k, v in defaults.items() if k in KEYS_BY_NAME}
    values.update({"dp-mode": mode, "target-epsilon": float(epsilon),
                   "num-server-rounds": int(rounds), **(extra or {})})
    return runtime.resolve_config(values)


def make_canaries(tokenizer, count: int, label_names: tuple[str, ...],
                  rng: np.random.Generator):
    """``count`` different texts of :data:`CANARY_WORDS` random whole-word vocabulary
    entries, each with a random label (a :class:`~fedlora.data.TextDataset`)."""
    from fedlora.data import TextDataset

    special = set(tokenizer.all_special_tokens)
    words = sorted(w for w in tokenizer.get_vocab()
                   if w.isascii() and w.isalpha() and len(w) > 2 and w not in special)
    texts: list[str] = []
    seen: set[str] = set()
    while len(texts) < count:
        text = " ".join(rng.choice(words, CANARY_WORDS))
        if text not in seen:
            seen.add(text)
            texts.append(text)
    labels = rng.integers(0, max(2, len(label_names)), count)
    return TextDataset(texts, labels.astype(np.int64), ["canary"] * count, label_names)


def _concat(a, b):
    from fedlora.data import TextDataset

    return TextDataset(a.texts + b.texts, np.concatenate([a.labels, b.labels]),
                       a.groups + b.groups, a.label_names)


def _disable_dropout(model) -> None:
    from torch import nn

    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def _key_params(model) -> list[tuple[str, Any, int]]:
    """The adapter keys (the order of :func:`fedlora.adapters.adapter_state`), each with
    the trainable parameter behind it (None: a tensor that does not train) and its size."""
    from peft import get_peft_model_state_dict

    from fedlora.training import trainable_parameters

    by_ptr = {p.data_ptr(): p for p in trainable_parameters(model)}
    return [(k, by_ptr.get(t.data_ptr()), t.numel())
            for k, t in get_peft_model_state_dict(model).items()]


def per_example_gradients(model, data, indices: np.ndarray, key_params) -> np.ndarray:
    """(n, d) float32: each example's loss gradient over the adapter, keys in order (no
    clipping: :func:`~fedlora.privacy.audit.canary_scores` uses directions only)."""
    import torch
    from opacus import GradSampleModule

    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=False)
    gsm.train()
    rows = []
    try:
        for start in range(0, len(indices), GRAD_BATCH):
            batch = data.collate(indices[start : start + GRAD_BATCH])
            with warnings.catch_warnings():  # Opacus' hooks on inputs that need no grad
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                gsm(**batch).loss.backward()
            n = len(batch["labels"])
            rows.append(torch.cat([
                (p.grad_sample.reshape(n, -1) if p is not None else torch.zeros((n, size)))
                .float().cpu() for _, p, size in key_params], dim=1).numpy())
            for _, p, _ in key_params:
                if p is not None:
                    p.grad_sample, p.grad = None, None
    finally:
        gsm._close()  # remove the hooks before the mechanism wraps the model itself
        for _, p, _ in key_params:
            if p is not None:
                for attr in ("grad_sample", "_forward_counter", "summed_grad"):
                    if hasattr(p, attr):
                        delattr(p, attr)
                p.grad = None
    return np.concatenate(rows)


def _flat(state: dict[str, np.ndarray], keys: list[str]) -> np.ndarray:
    return np.concatenate([np.asarray(state[k], dtype=np.float64).ravel() for k in keys])


def guess_sizes(num_canaries: int) -> list[tuple[int, int]]:
    """The guess sizes tried (fixed before any score is seen): k in and k out for k of
    1/16, 1/8, 1/4 and 3/8 of the canaries."""
    ks = sorted({max(1, num_canaries * f // 16) for f in (1, 2, 4, 6)})
    return [(k, k) for k in ks if 2 * k <= num_canaries]


def run_audit(*, mode: str = "sample", epsilon: float = 1.0, canaries: int = 128,
              rounds: int = 2, noise_scale: float = 1.0, known_noise: bool = False,
              partition: int = 0, partitions: int = 100, extra: dict[str, Any] | None = None,
              threads: int = 0, log=print) -> dict[str, Any]:
    """Run one audit; returns what it found (see :func:`main` for what is printed)."""
    import torch

    from fedlora import privacy, runtime
    from fedlora.adapters import adapter_state, load_adapter_state
    from fedlora.models import build_lora_model, load_tokenizer
    from fedlora.privacy.audit import audit_guesses, canary_scores
    from fedlora.privacy.gaussian import gaussian_noise_like
    from fedlora.privacy.update_level import privatize_reply, update_noise_std
    from fedlora.tasks import get_task

    if known_noise and mode != "update":
        raise ValueError("--known-noise needs --mode update (DP-SGD draws its noise inside "
                         "Opacus)")
    if noise_scale <= 0:
        raise ValueError(f"the noise scale must be > 0, got {noise_scale}")
    t0 = time.perf_counter()
    torch.set_num_threads(threads or torch.get_num_threads())
    cfg = audit_config(mode, epsilon, rounds, extra)
    mechanism = privacy.client_mechanism(cfg.dp_mode)
    if mechanism is None:
        raise ValueError(f"dp-mode {cfg.dp_mode!r} runs no mechanism on the client")
    if get_task(cfg.task).causal_lm:
        raise ValueError(f"task {cfg.task!r} is a causal LM: the audit's canaries are labelled "
                         "examples of a classification task")
    model = build_lora_model(runtime.model_spec(cfg))
    _disable_dropout(model)
    key_params = _key_params(model)
    keys = [k for k, _, _ in key_params]

    if cfg.data_path:  # a site's own file (e.g. a test's)
        client = runtime.client_data(cfg, partition_id=None, num_partitions=None,
                                     data_path=cfg.data_path)
    else:
        client = runtime.client_data(cfg, partition_id=partition, num_partitions=partitions,
                                     data_path=None)
    real = client.data.data.subset(client.train_idx)
    tokenizer = load_tokenizer(get_task(cfg.task).model_path(cfg))
    canary_set = make_canaries(tokenizer, canaries, real.label_names,
                               np.random.default_rng([cfg.seed, 0xCA7A]))
    included = privacy.private_numpy_rng().random(canaries) < 0.5  # OS entropy
    train_set = _concat(real, canary_set.subset(np.flatnonzero(included)))
    known = runtime.encode(cfg, _concat(real, canary_set))  # what the auditor knows
    data = runtime.encode(cfg, train_set)
    idx = np.arange(len(train_set))
    plan = mechanism.plan(cfg, len(idx))  # as the ClientApp plans it
    used = dataclasses.replace(plan, noise_multiplier=plan.noise_multiplier * noise_scale)
    log(f"audit {mode}: claimed epsilon {epsilon:g} (delta {cfg.target_delta:g}) over "
        f"{rounds} round(s); sigma {plan.noise_multiplier:.4g}"
        + (f", used x{noise_scale:g} = {used.noise_multiplier:.4g}" if noise_scale != 1 else "")
        + (", noise known to the auditor" if known_noise else "")
        + f"; {len(real)} real examples + {int(included.sum())} of {canaries} canaries")

    scores = np.zeros(canaries)
    all_idx = np.arange(len(known))
    for r in range(1, rounds + 1):
        t1 = time.perf_counter()
        start = adapter_state(model)
        grads = per_example_gradients(model, known, all_idx, key_params)  # (n_real + m, d)
        seed = cfg.seed * 1_000_003 + r * 7919 + partition  # as the ClientApp derives it
        mechanism.train(model, data, idx, plan=used, cfg=cfg, seed=seed)
        trained = adapter_state(model)
        if known_noise:  # noise from a generator whose seed the auditor knows
            released = privatize_reply(trained, start, max_norm=cfg.update_max_norm,
                                       noise_multiplier=used.noise_multiplier,
                                       rng=np.random.default_rng(KNOWN_NOISE_SEED + r))
        else:
            released = mechanism.release(trained, start, plan=used, cfg=cfg)
        load_adapter_state(model, released)
        update = _flat(released, keys) - _flat(start, keys)
        if known_noise:
            std = update_noise_std(noise_multiplier=used.noise_multiplier,
                                   max_norm=cfg.update_max_norm)
            noise = gaussian_noise_like(trained, std,  # as privatize_reply draws it
                                        np.random.default_rng(KNOWN_NOISE_SEED + r))
            update -= _flat(noise, keys)
        scores += canary_scores(update, grads, canaries)
        log(f"round {r}/{rounds}: gradients and training {time.perf_counter() - t1:.1f} s")

    outcome = audit_guesses(scores, included, sizes=guess_sizes(canaries),
                            delta=cfg.target_delta)
    return {
        "mode": mode, "claimed_epsilon": epsilon, "delta": cfg.target_delta,
        "epsilon_lower_bound": outcome.epsilon_lower_bound,
        "confidence": outcome.confidence, "ceiling": outcome.ceiling,
        "guesses": {"in": outcome.k_pos, "out": outcome.k_neg,
                    "made": outcome.num_guesses, "right": outcome.num_correct},
        "tested": [dict(zip(("in", "out", "made", "right", "bound"), t))
                   for t in outcome.tested],
        "noise_multiplier": plan.noise_multiplier, "noise_scale": noise_scale,
        "known_noise": known_noise, "rounds": rounds, "canaries": canaries,
        "canaries_in": int(included.sum()), "real_examples": len(real),
        "sample_rate": plan.sample_rate, "steps_per_round": plan.steps,
        "seconds": time.perf_counter() - t0,
        "run_config": {k: getattr(cfg, k.replace("-", "_"), None) for k in (
            "task", "batch-size", "local-steps", "local-epochs", "learning-rate", "optimizer",
            "lora-rank", "max-grad-norm", "update-max-norm", "train-head", "base-dtype",
            "accountant", "seed")},
    }


def summary(result: dict[str, Any]) -> list[str]:
    """The lines printed at the end; the last one is the claim and the bound."""
    g = result["guesses"]
    lines = ["guess sizes tried (in/out: right of made, bound): " + "; ".join(
        f"{t['in']}/{t['out']}: {t['right']} of {t['made']}, {t['bound']:.2f}"
        for t in result["tested"]),
        f"best: {g['right']} of {g['made']} guesses right; the most these sizes can show "
        f"is {result['ceiling']:.2f}; {result['seconds']:.0f} s"]
    if result["claimed_epsilon"] > result["ceiling"]:
        lines.append(f"note: a claim above {result['ceiling']:.2f} cannot be refuted with "
                     f"{result['canaries']} canaries")
    lines.append(f"claimed epsilon {result['claimed_epsilon']:g} (delta "
                 f"{result['delta']:g}): audit lower bound "
                 f"{result['epsilon_lower_bound']:.2f} at "
                 f"{result['confidence']:.0%} confidence")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=("sample", "update"), default="sample")
    ap.add_argument("--epsilon", type=float, default=1.0, help="the claimed epsilon")
    ap.add_argument("--canaries", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--broken-noise-scale", type=float, default=1.0,
                    help="multiply the mechanism's noise multiplier (e.g. 0.01: broken)")
    ap.add_argument("--known-noise", action="store_true",
                    help="update mode: noise from a generator the auditor can replay")
    ap.add_argument("--partition", type=int, default=0)
    ap.add_argument("--partitions", type=int, default=100,
                    help="split the task's pool into this many clients")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="run-config override (repeatable)")
    ap.add_argument("--out", default=str(ROOT / "results" / "audit"))
    args = ap.parse_args(argv)
    result = run_audit(mode=args.mode, epsilon=args.epsilon, canaries=args.canaries,
                       rounds=args.rounds, noise_scale=args.broken_noise_scale,
                       known_noise=args.known_noise, partition=args.partition,
                       partitions=args.partitions, extra=parse_sets(args.set),
                       threads=args.threads)
    from fedlora.results import atomic_write_text

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = (f"{time.strftime('%Y%m%d-%H%M%S')}-{args.mode}-eps{args.epsilon:g}"
            + (f"-noise{args.broken_noise_scale:g}" if args.broken_noise_scale != 1 else "")
            + ("-known-noise" if args.known_noise else ""))
    atomic_write_text(out / f"{name}.json", json.dumps(result, indent=1) + "\n")
    for line in summary(result):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
