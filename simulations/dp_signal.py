"""Where DP-SGD has signal: per parameter group, the clipped gradient against the noise.

    python -m simulations.dp_signal                       # the default task, epsilon 8
    python -m simulations.dp_signal --epsilon 1 --set 'lora-target-modules="value"'
    python -m simulations.dp_signal --set 'adapter="vera"'   # what DP-SGD would face on VeRA

On one client's data (partition 0 of ``--clients``) with the model the DP recipe trains
(under ``dp-mode = sample``: the mean-pooled head), the head is first fitted by
``--probe-steps`` full-batch steps *without* noise (roughly where the recipe's probe rounds
leave it; this is a diagnostic on the packaged data and releases nothing). Then every
example's gradient of the trainable parameters is taken and clipped to ``max-grad-norm`` C
as DP-SGD clips it. Per group (the head, and what the adapter family trains: LoRA A
and B; DoRA's magnitude too; VeRA's lambda_b and lambda_d; C3A's kernel) the table gives:

* the noised dimensions and the median per-example gradient norm (before clipping);
* the signal: the norm of the mean clipped gradient, what one DP-SGD step estimates;
* the noise DP-SGD adds to that mean at the plan's sigma, as a norm: sigma C sqrt(d) / n for
  one client in a full-batch step (q = 1), and that over sqrt(K) once the server averages
  K clients' steps (the best case: every step at q = 1, every client in the round);
* their ratio. Under 1 a step moves the group mostly by noise;
* under distributed DP (``secure-aggregation = true``: the noise of one step added once to
  the sum of the K clients' clipped gradients, fedlora.distributed_dp), the noise on the
  mean at the same sigma, ``sigma C sqrt(d) / (K n)``: sqrt(K) less, and that ratio.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from simulations.harness import parse_sets  # noqa: E402

#: What a family trains, by the name peft gives the parameter (its segment before the
#: adapter's name), as the table shows it.
GROUP_NAMES = {"lora_A": "LoRA A", "lora_B": "LoRA B", "lora_magnitude_vector": "DoRA magnitude",
               "vera_lambda_b": "VeRA lambda_b", "vera_lambda_d": "VeRA lambda_d",
               "c3a_kernel": "C3A kernel"}


def _group_of(name: str) -> str:
    for part in name.split("."):
        if part in GROUP_NAMES:
            return GROUP_NAMES[part]
    raise ValueError(f"no group for trainable parameter {name!r}")


def _groups(model) -> dict[str, list]:
    from fedlora.heads import head_module

    head = {id(p) for p in head_module(model).parameters()}
    groups: dict[str, list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        kind = "head" if id(p) in head else _group_of(name)
        groups.setdefault(kind, []).append(p)
    return groups


def _family_config(overrides: dict):
    """The run-config of the plan (DP-SGD's sigma is the same for every family: it rests on
    the client's count, the sampling and the steps) and the one the model is built from.
    DP-SGD refuses families whose per-example gradients Opacus cannot take (dora, vera,
    c3a); this diagnostic takes every example's gradient itself, so it shows what DP-SGD
    would face on them."""
    import dataclasses

    from fedlora.run_config import field_name
    from fedlora.runtime import resolve_config

    family = {k: overrides[k] for k in ("adapter", "c3a-block-size") if k in overrides}
    plan = resolve_config({"dp-mode": "sample",
                           **{k: v for k, v in overrides.items() if k not in family}})
    checked = resolve_config({**plan.to_dict(), **family, "dp-mode": "off"})  # its values
    return plan, dataclasses.replace(plan, **{field_name(k): getattr(checked, field_name(k))
                                              for k in family})


def measure(overrides: dict, *, clients: int, probe_steps: int, max_examples: int | None,
            progress=print) -> dict:
    """The per-group figures of the module docstring (see there), with the plan's sigma."""
    import numpy as np
    import torch

    from fedlora.models import build_lora_model
    from fedlora.privacy.mechanisms import get_mechanism
    from fedlora.probe import train_head
    from fedlora.runtime import client_data, model_spec

    cfg, model_cfg = _family_config(overrides)
    data = client_data(cfg, partition_id=0, num_partitions=clients, data_path=None)
    idx = np.asarray(data.train_idx)
    n = len(idx)
    sigma = get_mechanism(cfg.dp_mode).plan(cfg, n).noise_multiplier
    model = build_lora_model(model_spec(model_cfg))
    if probe_steps:
        train_head(model, data.data, idx, steps=probe_steps,
                   learning_rate=cfg.probe_learning_rate, batch_size=cfg.eval_batch_size)
    groups = _groups(model)
    clipped = {k: [torch.zeros_like(p, dtype=torch.float32) for p in ps]
               for k, ps in groups.items()}
    norms: dict[str, list[float]] = {k: [] for k in groups}
    use = idx if max_examples is None else idx[:max_examples]
    model.eval()  # dropout off: the gradient itself, not one draw of it
    for i, row in enumerate(use):
        batch = data.data.collate(np.array([row]))
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        grads = {k: [p.grad.detach().float() if p.grad is not None else torch.zeros_like(p)
                     for p in ps] for k, ps in groups.items()}
        sq = {k: float(sum((g ** 2).sum() for g in gs)) for k, gs in grads.items()}
        scale = min(1.0, cfg.max_grad_norm / max(math.sqrt(sum(sq.values())), 1e-12))
        for k, gs in grads.items():
            norms[k].append(math.sqrt(sq[k]))
            for acc, g in zip(clipped[k], gs):
                acc += scale * g
        if (i + 1) % 100 == 0:
            progress(f"{i + 1}/{len(use)} examples")
    out = {"noise_multiplier": sigma, "examples": n, "clients": clients,
           "max_grad_norm": cfg.max_grad_norm, "groups": []}
    for k, accs in clipped.items():
        d = sum(p.numel() for p in groups[k])
        signal = math.sqrt(sum(float(((a / len(use)) ** 2).sum()) for a in accs))
        noise_one = sigma * cfg.max_grad_norm * math.sqrt(d) / n
        noise_all = noise_one / math.sqrt(clients)
        noise_distributed = noise_one / clients
        out["groups"].append({"group": k, "dimensions": d,
                              "median_example_norm": float(np.median(norms[k])),
                              "signal": signal, "noise_one_client": noise_one,
                              "noise_mean_of_clients": noise_all,
                              "ratio": signal / noise_all if noise_all else math.inf,
                              "noise_distributed": noise_distributed,
                              "ratio_distributed": (signal / noise_distributed
                                                    if noise_distributed else math.inf)})
    return out


def table(result: dict) -> str:
    k = result["clients"]
    lines = [f"sigma {result['noise_multiplier']:.4f}, C = {result['max_grad_norm']:g}, "
             f"n = {result['examples']} examples on the client, {k} clients", "",
             "| group | noised dimensions | median example gradient norm | signal: mean "
             "clipped gradient norm | noise norm, one client (q = 1) | noise norm, mean of "
             f"{k} clients | signal / noise ({k} clients) | noise norm, distributed "
             f"(once on the sum of {k}) | signal / noise, distributed |",
             "|---|---|---|---|---|---|---|---|---|"]
    for g in result["groups"]:
        lines.append(f"| {g['group']} | {g['dimensions']:,} | {g['median_example_norm']:.3f} | "
                     f"{g['signal']:.4f} | {g['noise_one_client']:.3f} | "
                     f"{g['noise_mean_of_clients']:.3f} | {g['ratio']:.2f} | "
                     f"{g['noise_distributed']:.4f} | {g['ratio_distributed']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epsilon", type=float, default=8.0, help="target-epsilon of the plan")
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--probe-steps", type=int, default=120,
                    help="noise-free full-batch head steps first (the recipe's 6 probe rounds "
                         "of 20)")
    ap.add_argument("--examples", type=int, default=None,
                    help="use only the client's first this many examples for the gradients")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra run-config entries (repeatable)")
    args = ap.parse_args(argv)
    for name in ("clients", "probe_steps"):
        if getattr(args, name) < (1 if name == "clients" else 0):
            raise SystemExit(f"--{name.replace('_', '-')}: out of range, got "
                             f"{getattr(args, name)}")
    if args.examples is not None and args.examples < 1:
        raise SystemExit(f"--examples: must be at least 1, got {args.examples}")
    overrides = {"target-epsilon": args.epsilon, **parse_sets(args.set)}
    result = measure(overrides, clients=args.clients, probe_steps=args.probe_steps,
                     max_examples=args.examples, progress=lambda m: print(m, flush=True))
    print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
