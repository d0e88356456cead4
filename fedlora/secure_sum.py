"""Secure aggregation of adapter updates (``secure-aggregation = true``): what the server
and the sites agree on, outside the protocol itself (:mod:`fedlora.secagg`).

What a site sums is its update, the adapter it trained (or, under a local DP mode, what
its mechanism releases) minus the adapter it received, over the tensors the method sends
(:meth:`~fedlora.aggregation.Method.payload`, in sorted key order). Each coordinate is
clipped to ``[-secagg-clip, secagg-clip]`` and stochastically rounded, with coins from OS
entropy, to an integer multiple of the public step ``secagg-clip / levels``: an integer in
``[-levels, levels]``, unbiased. ``levels`` is ``secagg-levels`` on a float wire and the
integer range of fedlora's integer wire under ``wire-dtype = "int8"`` (127) or ``"int4"``
(7): one public scale for the round, the clip, so the sum dequantises exactly. The modulus
2^k is ``bits_for(cohort, levels, signed=True)``: no sum of a cohort's integers can wrap.
The masked vector travels as the smallest unsigned integer dtype that holds k bits
(:func:`transport_dtype`). Every site weighs the same (a public constant): the new global
adapter is the received one plus ``step * sum / survivors``, so no example count leaves a
site.

Which runs can use it is checked before round 1 (:func:`check_config`,
:func:`resolve_graph`), with errors naming the key.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from .aggregation import METHODS
from .config import ConfigError
from .entropy import stochastic_round
from .quantization import QMAX
from .run_config import KEYS_BY_NAME
from .secagg import bits_for, encode
from .secagg.graph import COMPLETE, resolve_degree, resolve_threshold
from .secagg.state import flatten, unflatten
from .wire import STYPE

if TYPE_CHECKING:
    from .run_config import RunConfig

__all__ = ["ACTIONS", "MASKED_KEY", "SECAGG_KEY", "SecureSum", "add_flat", "check_config",
           "flat_update", "from_records",
           "message_type", "protocol_bytes", "resolve_graph", "to_records", "transport_dtype"]

#: The protocol's client stages and the train actions that carry them (``train.<action>``).
ACTIONS = {"setup": "secagg_setup", "advertise": "secagg_advertise",
           "share_keys": "secagg_share_keys",
           "masked_input": "secagg_masked_input", "consistency": "secagg_consistency",
           "unmask": "secagg_unmask"}
SECAGG_KEY = "secagg"  # a stage's message (ConfigRecord, flattened)
MASKED_KEY = "secagg-masked"  # the masked vector (ArrayRecord)

#: Aggregators whose new global adapter is not the mean of what sites send.
REFUSED_AGGREGATORS = {
    "svd": "its new adapter re-factorises the exact sum of B @ A products, which needs "
           "each site's factors, not their sum",
    "stack": "it concatenates each site's factors, which would show every one of them",
    "fedsa": "its server-side B is the mean of each site's own B, which starts from where "
             "only that site knows, not from a shared adapter",
}


def message_type(stage: str) -> str:
    return f"train.{ACTIONS[stage]}"


def check_config(cfg: RunConfig) -> None:
    """``ConfigError`` for a run that cannot aggregate securely (before round 1)."""
    if not cfg.secure_aggregation:
        return
    method = METHODS.get(cfg.aggregator)
    if cfg.aggregator in REFUSED_AGGREGATORS or (method is not None and not method.linear):
        reason = REFUSED_AGGREGATORS.get(cfg.aggregator, "its new adapter is not the mean of "
                                                         "what sites send")
        raise ConfigError("aggregator", cfg.aggregator,
                          "fedavg or ffa when secure-aggregation = true: the server learns only "
                          f"the sum of the updates, and '{cfg.aggregator}' cannot use it: "
                          f"{reason}")
    if "client" in cfg.dp_mode.split("+") and cfg.dp_mode != "client":
        raise ConfigError("dp-mode", cfg.dp_mode,
                          "off, sample, update or client when secure-aggregation = true: with "
                          "client the sites clip their updates and add the noise in shares "
                          "(distributed user-level DP); a local mechanism under it is not "
                          "built")
    wire_levels = QMAX.get(cfg.wire_dtype)
    default_levels = KEYS_BY_NAME["secagg-levels"].default
    if wire_levels is not None and cfg.secagg_levels not in (default_levels, wire_levels):
        raise ConfigError("secagg-levels", cfg.secagg_levels,
                          f"{wire_levels} or left at its default when wire-dtype = "
                          f"'{cfg.wire_dtype}' and secure-aggregation = true: the sum is taken "
                          f"on the {cfg.wire_dtype} wire's integers, [-{wire_levels}, "
                          f"{wire_levels}] in steps of secagg-clip / {wire_levels} (a float "
                          "wire-dtype takes secagg-levels)")


def resolve_graph(cfg: RunConfig, cohort: int) -> tuple[int, int]:
    """``(degree, threshold)`` of a round's neighbour graph for ``cohort`` sampled sites;
    ``ConfigError`` naming the key when they do not fit the cohort."""
    if cohort < 2:
        raise ConfigError("fraction-train", cfg.fraction_train,
                          f"a share that samples at least 2 sites when secure-aggregation = "
                          f"true (it samples {cohort})")
    degree: int | str | None = cfg.secagg_degree or None
    if degree is not None and degree >= cohort - 1:
        degree = COMPLETE
    try:
        degree = resolve_degree(cohort, degree)
    except ValueError as e:
        raise ConfigError("secagg-degree", cfg.secagg_degree,
                          f"0, an even number, or at least the cohort size minus one "
                          f"({cohort - 1}): {e}") from None
    value = cfg.secagg_threshold
    threshold = None if value == 0 else (value if value <= 1 else int(value))
    try:
        return degree, resolve_threshold(degree, threshold)
    except ValueError as e:
        raise ConfigError("secagg-threshold", value,
                          f"a count or fraction of the {degree} neighbours of a site in a "
                          f"cohort of {cohort}: {e}") from None


@dataclass(frozen=True)
class SecureSum:
    """The public quantisation of a round: ``clip`` per coordinate, ``levels`` steps."""

    clip: float
    levels: int

    @classmethod
    def from_config(cls, cfg: RunConfig) -> SecureSum:
        """``secagg-clip`` in ``secagg-levels`` steps, or in the integer range of the
        ``int8``/``int4`` wire (127 or 7) when ``wire-dtype`` names one."""
        return cls(float(cfg.secagg_clip), int(QMAX.get(cfg.wire_dtype, cfg.secagg_levels)))

    @property
    def step(self) -> float:
        return self.clip / self.levels

    def bits(self, cohort: int) -> int:
        """Modulus bits: a sum of ``cohort`` integers in [-levels, levels] cannot wrap."""
        return bits_for(cohort, self.levels, signed=True)

    @staticmethod
    def layout(payload: Mapping[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
        """The summed tensors (sorted keys) and their shapes."""
        return [(k, tuple(int(s) for s in np.shape(payload[k]))) for k in sorted(payload)]

    @staticmethod
    def length(layout: list[tuple[str, tuple[int, ...]]]) -> int:
        return sum(math.prod(shape) for _, shape in layout)

    def quantise(self, reply: Mapping[str, np.ndarray], received: Mapping[str, np.ndarray],
                 bits: int) -> np.ndarray:
        """A site's update as ring elements mod 2^bits (``ValueError`` if its tensors are
        not exactly the received ones' keys and shapes)."""
        layout = self.layout(received)
        if sorted(reply) != [k for k, _ in layout] or any(
                tuple(np.shape(reply[k])) != shape for k, shape in layout):
            raise ValueError("secure aggregation needs a reply with exactly the tensors and "
                             "shapes received (every site at the global rank)")
        update = flat_update(reply, received, [k for k, _ in layout])
        scaled = np.clip(update, -self.clip, self.clip) / self.step
        values = np.clip(stochastic_round(scaled), -self.levels, self.levels)
        return encode(values, bits)

    def mean(self, total: np.ndarray, survivors: int,
             received: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``received + step * total / survivors`` per tensor (``total``: the signed sum)."""
        delta = np.asarray(total, np.float64) * (self.step / survivors)
        return add_flat(received, [k for k, _ in self.layout(received)], delta)


def flat_update(reply: Mapping[str, Any], received: Mapping[str, Any],
                keys: list[str]) -> np.ndarray:
    """``reply - received`` over ``keys``, as one float64 vector in that order."""
    if not keys:
        return np.zeros(0)
    return np.concatenate([(np.asarray(reply[k], np.float64)
                            - np.asarray(received[k], np.float64)).ravel() for k in keys])


def add_flat(received: Mapping[str, Any], keys: list[str] | tuple[str, ...],
             delta: np.ndarray) -> dict[str, np.ndarray]:
    """``received`` plus the flat vector ``delta`` laid over ``keys`` in order (float32)."""
    out, at = {}, 0
    for key in keys:
        cur = np.asarray(received[key], np.float64)
        out[key] = (cur + delta[at:at + cur.size].reshape(cur.shape)).astype(np.float32)
        at += cur.size
    return out


def transport_dtype(bits: int) -> np.dtype:
    """The smallest unsigned integer dtype that holds every element of the ring mod
    2^``bits``: what a masked vector travels as (uint16 for k <= 16, uint32 for k <= 32)."""
    return next(np.dtype(t) for t in ("uint8", "uint16", "uint32", "uint64")
                if bits <= 8 * np.dtype(t).itemsize)


def to_records(body: Mapping[str, Any], bits: int | None = None) -> dict[str, Any]:
    """A stage's message as records: the masked vector apart, in
    :func:`transport_dtype` of the round's modulus ``bits``; the rest flattened."""
    rest = {k: v for k, v in body.items() if k != "masked"}
    out: dict[str, Any] = {SECAGG_KEY: ConfigRecord(flatten(rest))}
    if "masked" in body:
        if bits is None:
            raise ValueError("a masked vector travels in the dtype of the round's modulus: "
                             "give its bits")
        vector = np.asarray(body["masked"], dtype=np.uint64)
        if vector.size and int(vector.max()) >> bits:
            raise ValueError(f"a masked vector holds an entry of 2^{bits} or more")
        dtype = transport_dtype(bits)
        out[MASKED_KEY] = ArrayRecord({"masked": Array(
            dtype=dtype.name, shape=(int(vector.size),), stype=STYPE,
            data=vector.astype(dtype.newbyteorder("<")).tobytes())})
    return out


def _masked(array: Array) -> np.ndarray:
    """A masked vector as :func:`to_records` wrote it (raw little-endian unsigned integers),
    as uint64; ``ValueError`` for another form."""
    if array.stype != STYPE or array.dtype not in ("uint8", "uint16", "uint32", "uint64") \
            or len(array.shape) != 1:
        raise ValueError(f"a masked vector must be a 1-d array of raw unsigned integers "
                         f"({STYPE}), got {array.dtype} {tuple(array.shape)} ({array.stype})")
    dtype = np.dtype(array.dtype).newbyteorder("<")
    if len(array.data) != array.shape[0] * dtype.itemsize:
        raise ValueError(f"a masked vector of {array.shape[0]} {array.dtype} holds "
                         f"{len(array.data)} bytes")
    return np.frombuffer(array.data, dtype=dtype).astype(np.uint64)


def from_records(content: RecordDict) -> dict[str, Any]:
    """Inverse of :func:`to_records` (``ValueError``/``KeyError`` for a malformed one)."""
    body = unflatten(dict(content[SECAGG_KEY]))
    if MASKED_KEY in content:
        body["masked"] = _masked(content[MASKED_KEY]["masked"])
    return body


def protocol_bytes(content: RecordDict) -> int:
    """Bytes of the protocol's records in a message: keys, byte strings and strings as
    written, 8 per integer, and the masked vector's raw bytes."""
    total = 0
    if SECAGG_KEY in content:
        for key, value in content[SECAGG_KEY].items():
            total += len(key.encode()) + (len(value) if isinstance(value, bytes) else
                                          len(value.encode()) if isinstance(value, str) else 8)
    if MASKED_KEY in content:
        total += sum(len(a.data) for a in content[MASKED_KEY].values())
    return total
