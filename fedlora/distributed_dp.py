"""Distributed DP on the secure sum: what a round sums, its public parameters, a site's
noise share and what the server makes of the revealed sum.

With ``secure-aggregation = true``:

* ``dp-mode = "sample"``: every round is one DP-SGD step over the union of the sampled
  sites' data, released by the Skellam mechanism (:mod:`fedlora.privacy.skellam`). A probe
  round steps the head, a later round every tensor the aggregator sends (LoRA factors and
  head). Each site encodes its examples' clipped, scaled, rounded gradients with the count
  appended (:mod:`fedlora.distributed_grads`); just before masking it adds its share of the
  noise, ``v / (t - d)`` per coordinate (:func:`share_divisor`: ``t`` honest sites assumed
  in the cohort, at most ``d`` missing from a sum, every missing one counted as honest).
  The server unmasks only the sum of at least ``cohort - d`` contributors (a round with fewer
  releases nothing; the sites refuse to reveal shares for fewer), divides the gradient by
  the noised count and takes an Adam step (:class:`ServerStep`): post-processing.
* ``dp-mode = "client"``: the sites' clipped updates, each with its noise share
  (:mod:`fedlora.privacy.distributed_user_level`); the server adds their mean
  (:func:`update_mean`).

A round's public parameters follow from the run-config and the sent tensors' shapes alone
(:func:`release_for`), so every site and the server derive the same ones: the noise
multiplier of the plan, the vector's length and the modulus (no sum of a cohort can wrap:
:func:`round_bits`); a digest of them is in the round config every site signs
(:func:`round_context`).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .adapters import is_factor_key
from .privacy import get_mechanism, site_mechanism
from .privacy.distributed_user_level import update_spec
from .privacy.skellam import SIGMA_KEY, VECTOR_KEY, SkellamSum, skellam_share
from .probe import is_probe_round
from .secagg import bits_for
from .secure_sum import add_flat

if TYPE_CHECKING:
    from .run_config import RunConfig

__all__ = ["ServerStep", "Release", "SIGMA_KEY", "VECTOR_KEY", "head_keys", "is_distributed_round",
           "max_dropouts", "min_contributors", "min_honest", "noised", "share_divisor", "release_for", "round_bits", "round_context",
           "spec_for", "update_mean"]

log = logging.getLogger("fedlora.client")



def is_distributed_round(cfg: RunConfig, server_round: int) -> bool:
    """Whether the sites release ``server_round`` together, each adding a share of the
    noise: a DP-SGD step (``sample``) or their clipped updates (``client``)."""
    return cfg.secure_aggregation and cfg.dp_mode in ("sample", "client")


@dataclass(frozen=True)
class Release:
    """What a distributed round sums: the encoding, its noise multiplier, and what one
    site's vector may hold (examples of a step; one update under ``client``)."""

    kind: str  # "head-step", "lora-step" or "user-update"
    spec: SkellamSum
    sigma: float
    clip: float
    max_terms: int
    keys: tuple[str, ...]  # the tensors summed, in order


def release_for(cfg: RunConfig, payload: Mapping[str, Any], server_round: int) -> Release | None:
    """The round's release, from the run-config and the sent tensors' shapes alone (so every
    site and the server derive the same one); None: not a distributed round."""
    if not is_distributed_round(cfg, server_round):
        return None
    if cfg.dp_mode == "client":
        return Release("user-update", update_spec(payload), site_mechanism(cfg).sigma(cfg),
                       float(cfg.update_max_norm), 1, tuple(sorted(payload)))
    sigma = get_mechanism("sample").distributed_sigma(cfg)
    if is_probe_round(cfg, server_round):
        return Release("head-step", spec_for(payload), sigma, float(cfg.max_grad_norm),
                       int(cfg.max_num_examples), tuple(head_keys(payload)))
    dims = sum(int(np.prod(np.shape(payload[k]))) for k in payload)
    return Release("lora-step", SkellamSum.for_dims(dims), sigma, float(cfg.max_grad_norm),
                   int(cfg.max_num_examples), tuple(sorted(payload)))


def min_honest(cfg: RunConfig, cohort: int) -> int:
    """``dp-min-honest`` for a cohort: a count, or a fraction of the cohort (rounded up)."""
    value = float(cfg.dp_min_honest)
    t = int(value) if value > 1 else math.ceil(value * cohort - 1e-9)
    return max(1, t)


def max_dropouts(cfg: RunConfig, cohort: int) -> int:
    """``dp-max-dropouts`` for a cohort: a count, or a fraction of it (rounded down)."""
    value = float(cfg.dp_max_dropouts)
    return int(value) if value >= 1 else math.floor(value * cohort + 1e-9)


def min_contributors(cfg: RunConfig, cohort: int) -> int:
    """The fewest sites a released sum may hold: the cohort less ``dp-max-dropouts``."""
    return cohort - max_dropouts(cfg, cohort)


def share_divisor(cfg: RunConfig, cohort: int) -> int:
    """Each site adds ``v / share_divisor`` of the noise: the honest sites any sum of at
    least :func:`min_contributors` holds, counting every missing site as an honest one (the
    server decides who is dropped). ``ValueError`` when none would be left."""
    left = min(min_honest(cfg, cohort), cohort) - max_dropouts(cfg, cohort)
    if left < 1:
        raise ValueError(f"dp-max-dropouts = {cfg.dp_max_dropouts:g} of a cohort of {cohort} "
                         f"with dp-min-honest = {cfg.dp_min_honest:g} leaves no honest site "
                         "in a sum")
    return left


def head_keys(payload: Mapping[str, Any]) -> list[str]:
    """The adapter keys of the head's tensors (every key that is not a LoRA factor)."""
    return sorted(k for k in payload if not is_factor_key(k))


def spec_for(payload: Mapping[str, Any]) -> SkellamSum:
    """The encoding of a step of the head (the head's entries and the count)."""
    return SkellamSum.for_dims(sum(int(np.prod(np.shape(payload[k])))
                                   for k in head_keys(payload)))


def round_context(cfg: RunConfig, release: Release, cohort: int) -> bytes:
    """A digest of every parameter the round's noise and sensitivity rest on. It goes into
    the signed round config (:class:`fedlora.secagg.RoundConfig`): a site refuses a round
    whose digest is not its own, and sites given different parameters refuse each other's
    keys, so no site can be made to add less noise than another site's ledger assumes."""
    spec = release.spec
    fields = (f"skellam|{release.kind}|sigma={release.sigma!r}|t={min_honest(cfg, cohort)}|"
              f"dropouts={max_dropouts(cfg, cohort)}|"
              f"cohort={cohort}|dims={spec.dims}|units={spec.units}|count={spec.count_weight}|"
              f"clip={release.clip!r}|max-terms={release.max_terms}|"
              f"eps={float(cfg.target_epsilon)!r}|delta={float(cfg.target_delta)!r}|"
              f"rounds={int(cfg.num_server_rounds)}|cap={int(cfg.participation_cap)}")
    return hashlib.sha256(fields.encode()).digest()


def round_bits(cfg: RunConfig, release: Release, cohort: int) -> int:
    """Modulus bits: ``cohort`` sites' vectors (at most ``max_terms`` examples or updates
    each) with their noise shares cannot wrap."""
    spec = release.spec
    share = spec.variance(release.sigma) / share_divisor(cfg, cohort)
    return bits_for(cohort, spec.max_abs(release.max_terms, share), signed=True)


# -- a site ------------------------------------------------------------------------------
def noised(vector: np.ndarray, *, sigma: float, cohort: int, cfg: RunConfig,
           spec: SkellamSum, bits: int | None = None) -> np.ndarray:
    """``vector`` plus this site's Skellam share (variance ``v / t``, from OS entropy);
    with ``bits``, as signed values of that ring (a noise draw beyond the modulus' tail
    bound wraps instead of failing: whether a site answers never depends on the draw)."""
    vector = np.asarray(vector, dtype=np.int64)
    if vector.shape != (spec.length,):
        raise ValueError(f"a distributed DP vector of {spec.length} entries, got {vector.shape}")
    share = skellam_share(spec.variance(sigma), share_divisor(cfg, cohort), spec.length)
    out = vector + share
    if bits is not None and bits < 63:  # (a sum that wide cannot reach int64's edge)
        half = np.int64(1) << np.int64(bits - 1)
        out = (out + half) % (half * 2) - half
    return out


# -- the server ---------------------------------------------------------------------------
class ServerStep:
    """The server's DP-SGD steps from revealed sums: Adam on the noised mean gradient
    (post-processing of the released sum), at ``probe-learning-rate`` for the head and
    ``learning-rate`` for the LoRA factors, each tensor's moments kept across rounds."""

    BETAS = (0.9, 0.999)
    EPS = 1e-8

    def __init__(self, cfg: RunConfig) -> None:
        self.head_lr = float(cfg.probe_learning_rate)
        self.lora_lr = float(cfg.learning_rate)
        self.moments: dict[str, tuple[np.ndarray, np.ndarray, int]] = {}

    def apply(self, release: Release, state: Mapping[str, np.ndarray],
              total: np.ndarray) -> dict[str, np.ndarray]:
        """The released tensors after one step on the summed vector ``total`` (signed)."""
        grad_sum, count = release.spec.decode(total, release.clip)
        g = grad_sum / max(count, 1.0)
        b1, b2 = self.BETAS
        out, at = {}, 0
        for key in release.keys:
            cur = np.asarray(state[key], dtype=np.float64)
            gk = g[at:at + cur.size].reshape(cur.shape)
            at += cur.size
            m, v, t = self.moments.get(key, (np.zeros(cur.shape), np.zeros(cur.shape), 0))
            m, v, t = b1 * m + (1 - b1) * gk, b2 * v + (1 - b2) * gk * gk, t + 1
            self.moments[key] = (m, v, t)
            lr = self.lora_lr if is_factor_key(key) else self.head_lr
            step = lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + self.EPS)
            out[key] = (cur - step).astype(np.float32)
        return out


def update_mean(release: Release, state: Mapping[str, np.ndarray], total: np.ndarray,
                survivors: int) -> dict[str, np.ndarray]:
    """``client`` on the secure sum: the sent tensors (sorted keys of ``state``) plus the
    noised mean update, ``clip / units x total / survivors`` (the number in the sum is
    public): post-processing of the released sum."""
    update, _ = release.spec.decode(total, release.clip)
    return add_flat(state, release.keys, update / max(int(survivors), 1))
