"""Distributed DP-SGD of the head on the secure sum (``dp-mode = "sample"`` with
``secure-aggregation = true``).

Every round is one DP-SGD step of the classification head over the union of the sampled
sites' data, released by the Skellam mechanism (:mod:`fedlora.privacy.skellam`) through
the secure sum:

* a site reads what the head reads (the encoder once, as a probe round does), takes every
  example's gradient of the head (``torch.func``, the head's dropout off), and encodes
  their clipped, scaled, rounded sum with the count appended (:func:`site_vector`); just
  before masking it adds its share of the noise, ``v / t`` per coordinate, ``t`` the
  round's :func:`min_honest` (:func:`noised`);
* the server unmasks only the sum of at least ``t`` contributors (a round with fewer
  releases nothing; the sites refuse to reveal shares for fewer), divides the gradient by
  the noised count and takes an Adam step on the head (:class:`HeadStep`): post-processing.

The round's public parameters follow from the run-config alone, so every site and the
server derive the same ones: the noise multiplier of the plan (the same for every site:
every round is a full-batch step), the vector length (the head's entries plus one) and
the modulus (no sum of a cohort can wrap: :func:`round_bits`).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from .adapters import is_factor_key
from .dp_sgd import dropout_off
from .heads import head_module
from .privacy import get_mechanism, site_mechanism
from .privacy.distributed_user_level import update_spec
from .privacy.skellam import SIGMA_KEY, VECTOR_KEY, SkellamSum, skellam_share
from .probe import features, is_probe_round
from .secagg import bits_for

if TYPE_CHECKING:
    from .run_config import RunConfig

__all__ = ["HeadStep", "Release", "SIGMA_KEY", "VECTOR_KEY", "head_keys", "is_distributed_round",
           "min_honest", "noised", "release_for", "round_bits", "round_context", "site_vector",
           "spec_for", "update_mean"]

log = logging.getLogger("fedlora.client")



def is_distributed_round(cfg: RunConfig, server_round: int) -> bool:
    """Whether the sites release ``server_round`` together, each adding a share of the
    noise: a DP-SGD step of the head (``sample``) or their clipped updates (``client``)."""
    if not cfg.secure_aggregation:
        return False
    return cfg.dp_mode == "client" or (cfg.dp_mode == "sample"
                                       and is_probe_round(cfg, server_round))


@dataclass(frozen=True)
class Release:
    """What a distributed round sums: the encoding, its noise multiplier, and what one
    site's vector may hold (examples of a step; one update under ``client``)."""

    kind: str  # "head-step" or "user-update"
    spec: SkellamSum
    sigma: float
    clip: float
    max_terms: int


def release_for(cfg: RunConfig, payload: Mapping[str, Any], server_round: int) -> Release | None:
    """The round's release, from the run-config and the sent tensors' shapes alone (so every
    site and the server derive the same one); None: not a distributed round."""
    if not is_distributed_round(cfg, server_round):
        return None
    if cfg.dp_mode == "client":
        return Release("user-update", update_spec(payload), site_mechanism(cfg).sigma(cfg),
                       float(cfg.update_max_norm), 1)
    return Release("head-step", spec_for(payload), get_mechanism("sample").distributed_sigma(cfg),
                   float(cfg.max_grad_norm), int(cfg.max_num_examples))


def min_honest(cfg: RunConfig, cohort: int) -> int:
    """``dp-min-honest`` for a cohort: a count, or a fraction of the cohort (rounded up)."""
    value = float(cfg.dp_min_honest)
    t = int(value) if value > 1 else math.ceil(value * cohort - 1e-9)
    return max(1, t)


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
              f"cohort={cohort}|dims={spec.dims}|units={spec.units}|count={spec.count_weight}|"
              f"clip={release.clip!r}|max-terms={release.max_terms}|"
              f"eps={float(cfg.target_epsilon)!r}|delta={float(cfg.target_delta)!r}|"
              f"rounds={int(cfg.num_server_rounds)}|cap={int(cfg.participation_cap)}")
    return hashlib.sha256(fields.encode()).digest()


def round_bits(cfg: RunConfig, release: Release, cohort: int) -> int:
    """Modulus bits: ``cohort`` sites' vectors (at most ``max_terms`` examples or updates
    each) with their noise shares cannot wrap."""
    spec = release.spec
    share = spec.variance(release.sigma) / min_honest(cfg, cohort)
    return bits_for(cohort, spec.max_abs(release.max_terms, share), signed=True)


# -- a site -------------------------------------------------------------------------------
def _param_keys(head: nn.Module, keys: list[str]) -> list[tuple[str, str]]:
    """(head parameter name, adapter key) pairs in adapter-key order."""
    names = [n for n, p in head.named_parameters() if p.requires_grad]
    pairs = []
    for key in keys:
        match = [n for n in names if key.endswith("." + n)]
        if len(match) != 1:
            raise ValueError(f"cannot match adapter key {key!r} to one head parameter")
        pairs.append((match[0], key))
    if sorted(n for n, _ in pairs) != sorted(names):
        raise ValueError("the head's parameters and the adapter's head keys differ")
    return pairs


def per_example_grads(head: nn.Module, feats: torch.Tensor, labels: torch.Tensor,
                      names: list[str]) -> np.ndarray:
    """``(n, dims)`` gradients of each example's cross-entropy, in ``names`` order."""
    params = {n: p.detach() for n, p in head.named_parameters()}

    def loss(p: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = functional_call(head, p, (x.unsqueeze(0),))
        return nn.functional.cross_entropy(out, y.unsqueeze(0))

    with dropout_off(head):
        g = vmap(grad(loss), in_dims=(None, 0, 0))(params, feats, labels)
    out = torch.cat([g[n].reshape(len(labels), -1) for n in names], 1).double().cpu().numpy()
    # A row with a non-finite entry (a head the server crafted to overflow on some inputs)
    # counts as an example that adds nothing: never an error, whose presence would be a
    # noiseless answer about the data.
    out[~np.isfinite(out).all(axis=1)] = 0.0
    return out


#: Examples per chunk: what the head reads and its per-example gradients are taken this many
#: examples at a time, so a chunk's memory is bounded by public settings (the chunk, the
#: run's max-length, the model), not by the site's data.
CHUNK = 64


def _chunk_gradients(model: nn.Module, head: nn.Module, data: Any, idx: np.ndarray, *,
                     names: list[str], spec: SkellamSum, clip: float,
                     batch_size: int) -> np.ndarray:
    """The encoded sum of the gradients of examples ``idx`` (without the count)."""
    feats = features(model, data, idx, min(batch_size, CHUNK)).float()
    labels = data.labels[torch.as_tensor(idx)].to(feats.device)
    head_dtype = next(head.parameters()).dtype
    grads = per_example_grads(head, feats.to(head_dtype), labels, names)
    return spec.encode(grads, clip)[:-1]


def site_vector(model: nn.Module, data: Any, indices: np.ndarray, *, cfg: RunConfig,
                payload: Mapping[str, Any], batch_size: int = 128) -> np.ndarray:
    """This site's encoded sum of clipped per-example head gradients and its count (no
    noise yet: :func:`noised` adds the share just before the vector is masked).

    Taken :data:`CHUNK` examples at a time. A chunk that fails for any reason is taken
    again one example at a time, and an example that fails on its own adds no gradient but
    still counts: a failure changes the sum by at most what one example could, and the
    site answers whatever its data hold (a refusal would be a noiseless answer)."""
    spec = spec_for(payload)
    head = head_module(model)
    names = [n for n, _ in _param_keys(head, head_keys(payload))]  # the model's shape only
    idx = np.asarray(indices, dtype=np.int64)
    total = np.zeros(spec.dims, dtype=np.int64)
    clip, failed = float(cfg.max_grad_norm), 0
    for start in range(0, len(idx), CHUNK):
        part = idx[start:start + CHUNK]
        try:
            total += _chunk_gradients(model, head, data, part, names=names, spec=spec,
                                      clip=clip, batch_size=batch_size)
            continue
        except Exception:  # noqa: BLE001  (whatever it was: one example at a time)
            pass
        for one in part:
            try:
                total += _chunk_gradients(model, head, data, np.array([one]), names=names,
                                          spec=spec, clip=clip, batch_size=batch_size)
            except Exception:  # noqa: BLE001  (it adds no gradient; it still counts)
                failed += 1
    if failed:  # the details stay in this site's log
        log.error("Distributed DP: the gradients of %d examples could not be taken; they "
                  "count, with no gradient, this round", failed)
    vector = np.concatenate([total, [np.int64(spec.count_weight) * len(idx)]])
    return spec.bound_sum(vector, int(cfg.max_num_examples))


def noised(vector: np.ndarray, *, sigma: float, cohort: int, cfg: RunConfig,
           spec: SkellamSum, bits: int | None = None) -> np.ndarray:
    """``vector`` plus this site's Skellam share (variance ``v / t``, from OS entropy);
    with ``bits``, as signed values of that ring (a noise draw beyond the modulus' tail
    bound wraps instead of failing: whether a site answers never depends on the draw)."""
    vector = np.asarray(vector, dtype=np.int64)
    if vector.shape != (spec.length,):
        raise ValueError(f"a distributed DP vector of {spec.length} entries, got {vector.shape}")
    share = skellam_share(spec.variance(sigma), min_honest(cfg, cohort), spec.length)
    out = vector + share
    if bits is not None and bits < 63:  # (a sum that wide cannot reach int64's edge)
        half = np.int64(1) << np.int64(bits - 1)
        out = (out + half) % (half * 2) - half
    return out


# -- the server ---------------------------------------------------------------------------
class HeadStep:
    """The server's step on the head from a revealed sum: Adam at ``probe-learning-rate``
    on the noised mean gradient (post-processing of the released sum)."""

    BETAS = (0.9, 0.999)
    EPS = 1e-8

    def __init__(self, cfg: RunConfig, payload: Mapping[str, Any]) -> None:
        self.lr = float(cfg.probe_learning_rate)
        self.clip = float(cfg.max_grad_norm)
        self.keys = head_keys(payload)
        self.spec = spec_for(payload)
        self.m = np.zeros(self.spec.dims)
        self.v = np.zeros(self.spec.dims)
        self.t = 0

    def apply(self, state: Mapping[str, np.ndarray], total: np.ndarray) -> dict[str, np.ndarray]:
        """The head's tensors after one step on the summed vector ``total`` (signed)."""
        grad_sum, count = self.spec.decode(total, self.clip)
        g = grad_sum / max(count, 1.0)
        self.t += 1
        b1, b2 = self.BETAS
        self.m = b1 * self.m + (1 - b1) * g
        self.v = b2 * self.v + (1 - b2) * g * g
        step = self.lr * (self.m / (1 - b1 ** self.t)) / (
            np.sqrt(self.v / (1 - b2 ** self.t)) + self.EPS)
        out, at = {}, 0
        for key in self.keys:
            cur = np.asarray(state[key], dtype=np.float64)
            out[key] = (cur - step[at:at + cur.size].reshape(cur.shape)).astype(np.float32)
            at += cur.size
        return out


def update_mean(release: Release, state: Mapping[str, np.ndarray], total: np.ndarray,
                survivors: int) -> dict[str, np.ndarray]:
    """``client`` on the secure sum: the sent tensors (sorted keys of ``state``) plus the
    noised mean update, ``clip / units x total / survivors`` (the number in the sum is
    public): post-processing of the released sum."""
    update, _ = release.spec.decode(total, release.clip)
    update /= max(int(survivors), 1)
    out, at = {}, 0
    for key in sorted(state):
        cur = np.asarray(state[key], dtype=np.float64)
        out[key] = (cur + update[at:at + cur.size].reshape(cur.shape)).astype(np.float32)
        at += cur.size
    return out
