"""Empirical privacy audit of a client's DP mechanism in one run (Steinke, Nasr & Jagielski 2023).

    python -m simulations.audit_privacy                                  # sample, epsilon 1
    python -m simulations.audit_privacy --mode update --epsilon 8
    python -m simulations.audit_privacy --broken-noise-scale 0.01        # a broken mechanism
    python -m simulations.audit_privacy --mode update --known-noise      # noise the auditor knows
    python -m simulations.audit_privacy --phase probe --broken-noise-scale 0.1 --repeats 10

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

``--phase probe`` audits the linear-probe rounds instead (``sample`` only): every round
trains the classification head alone by full-batch DP-SGD (the mechanism's
``train_head``), and the auditor scores the released head update with every example's
head-only gradient on the rows the head reads. ``--repeats N`` runs the audit N times
(the model, data and canaries built once; which canaries go in and the noise drawn
afresh each time) and reports how often the bound exceeds the claim.

To give the audit teeth the run-config differs from the app's defaults where a DP
guarantee does not depend on it (``--set`` overrides any of it): in the LoRA phase no
classification head trained (its gradient is shared by all examples and would fill the
clipping norm), small clipping norms (every per-example gradient of ``sample`` and every
update of ``update`` is clipped, so that the noise, calibrated to the norm, is as small as
the signal allows), SGD with small steps (the update stays linear in the gradients) and a
float32 base. The model keeps its configured dropout: the mechanisms switch it off while
they train, and the auditor takes its gradients with it off too.

``--broken-noise-scale`` multiplies the noise multiplier the mechanism is given (a wrong
calibration: the claim stays the same). ``--known-noise`` (``update``) draws the noise from a
generator the auditor can replay (as if it were seeded from the public run-config seed) and
subtracts it. The last line printed is the claim and the bound; a JSON copy goes to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
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
KNOWN_NOISE_SEED = 0  # the generator --known-noise hands to the mechanism (and the auditor)
PHASES = ("lora", "probe")
#: What the probe phase changes further: the head trains alone in every round.
PROBE_DEFAULTS: dict[str, Any] = {"train-head": True}


def audit_config(mode: str, epsilon: float, rounds: int, extra: dict[str, Any] | None = None,
                 *, phase: str = "lora"):
    """The validated run-config of an audit: the app's, with :data:`AUDIT_DEFAULTS` (and
    in the probe phase :data:`PROBE_DEFAULTS`, every round a probe round)."""
    from fedlora import runtime
    from fedlora.config import KEYS_BY_NAME

    if phase not in PHASES:
        raise ValueError(f"phase must be one of {', '.join(PHASES)}, got {phase!r}")
    defaults = {**AUDIT_DEFAULTS, **MODE_DEFAULTS.get(mode, {})}
    if phase == "probe":
        defaults.update(PROBE_DEFAULTS, **{"probe-rounds": int(rounds)})
    values = {k: v for k, v in defaults.items() if k in KEYS_BY_NAME}
    values.update({"dp-mode": mode, "target-epsilon": float(epsilon),
                   "num-server-rounds": int(rounds), **(extra or {})})
    return runtime.resolve_config(values)


def run_audit(**kwargs) -> dict[str, Any]:
    """Run one audit; returns what it found (see :func:`run_audits` for the arguments and
    :func:`main` for what is printed)."""
    return run_audits(repeats=1, **kwargs)["runs"][0]


def run_audits(*, mode: str = "sample", epsilon: float = 1.0, canaries: int = 128,
               rounds: int = 2, noise_scale: float = 1.0, known_noise: bool = False,
               phase: str = "lora", repeats: int = 1, score: str = "sum",
               gradients: str = "fresh", partition: int = 0,
               partitions: int = 100, extra: dict[str, Any] | None = None,
               threads: int = 0, log=print) -> dict[str, Any]:
    """``repeats`` independent audits of one mechanism (each with its own draw of which
    canaries go in and its own noise; the model, data and canaries are built once, and
    every audit starts from the same adapter). Returns ``runs`` (one result each) and
    ``flagged``: how many bounded epsilon above the claim."""
    import torch

    if known_noise and mode != "update":
        raise ValueError("--known-noise needs --mode update (DP-SGD draws its noise inside "
                         "Opacus)")
    if noise_scale <= 0:
        raise ValueError(f"the noise scale must be > 0, got {noise_scale}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    t0 = time.perf_counter()
    torch.set_num_threads(threads or torch.get_num_threads())
    from simulations.audit_session import AuditSession

    session = AuditSession(mode=mode, epsilon=epsilon, canaries=canaries, rounds=rounds,
                           noise_scale=noise_scale, known_noise=known_noise, phase=phase,
                           score=score, gradients=gradients,
                           partition=partition, partitions=partitions,
                           cfg=audit_config(mode, epsilon, rounds, extra, phase=phase),
                           log=log)
    runs = []
    for i in range(repeats):
        if repeats > 1:
            log(f"audit {i + 1} of {repeats}")
        runs.append(session.run_once())
        if repeats > 1:
            log(f"bound {runs[-1]['epsilon_lower_bound']:.2f} "
                f"({runs[-1]['guesses']['right']} of {runs[-1]['guesses']['made']} right)")
    return aggregate(runs, seconds=time.perf_counter() - t0)


def aggregate(runs: list[dict[str, Any]], *, seconds: float = 0.0) -> dict[str, Any]:
    """The repeated audits' tally: ``flagged`` of ``repeats`` bounded epsilon strictly above
    the claim, with every run's bound."""
    if not runs:
        raise ValueError("no audit runs to aggregate")
    bounds = [r["epsilon_lower_bound"] for r in runs]
    return {"repeats": len(runs), "claimed_epsilon": runs[0]["claimed_epsilon"],
            "flagged": sum(r["epsilon_lower_bound"] > r["claimed_epsilon"] for r in runs),
            "bounds": bounds, "median_bound": float(np.median(bounds)),
            "seconds": seconds, "runs": runs}


def summary(result: dict[str, Any]) -> list[str]:
    """The lines printed at the end of one audit; the last one is the claim and the bound."""
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


def repeats_summary(result: dict[str, Any]) -> str:
    """The last line printed for repeated audits."""
    return (f"flagged {result['flagged']} of {result['repeats']} (bound > claimed epsilon "
            f"{result['claimed_epsilon']:g}); bounds " + ", ".join(
                f"{b:.2f}" for b in result["bounds"])
            + f"; median {result['median_bound']:.2f}; {result['seconds']:.0f} s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=("sample", "update"), default="sample")
    ap.add_argument("--phase", choices=PHASES, default="lora",
                    help="lora: the adapter's training; probe: linear-probe rounds (the "
                    "head alone, full-batch DP-SGD; dp-mode sample)")
    ap.add_argument("--epsilon", type=float, default=1.0, help="the claimed epsilon")
    ap.add_argument("--canaries", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1,
                    help="run the audit this many times; report how often it flags")
    ap.add_argument("--score", choices=("sum", "llr"), default="sum",
                    help="sum of each round's z-scores, or (sample, lora) the likelihood "
                    "ratio of a canary drawn by Poisson sampling (power with few steps a round)")
    ap.add_argument("--gradients", choices=("fresh", "initial"), default="fresh",
                    help="the auditor's gradients: at each round's start, or the run's start "
                    "(cheap: many short rounds)")
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
    result = run_audits(mode=args.mode, epsilon=args.epsilon, canaries=args.canaries,
                        rounds=args.rounds, noise_scale=args.broken_noise_scale,
                        known_noise=args.known_noise, phase=args.phase,
                        repeats=args.repeats, score=args.score, gradients=args.gradients,
                        partition=args.partition,
                        partitions=args.partitions, extra=parse_sets(args.set),
                        threads=args.threads)
    from fedlora.results import atomic_write_text

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = (f"{time.strftime('%Y%m%d-%H%M%S')}-{args.mode}-{args.phase}-eps{args.epsilon:g}"
            + (f"-noise{args.broken_noise_scale:g}" if args.broken_noise_scale != 1 else "")
            + ("-known-noise" if args.known_noise else "")
            + (f"-{args.score}" if args.score != "sum" else "")
            + (f"-x{args.repeats}" if args.repeats > 1 else ""))
    payload = result if args.repeats > 1 else result["runs"][0]
    atomic_write_text(out / f"{name}.json", json.dumps(payload, indent=1) + "\n")
    for line in summary(result["runs"][-1]):
        print(line)
    if args.repeats > 1:
        print(repeats_summary(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
