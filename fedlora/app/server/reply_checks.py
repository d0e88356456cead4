"""What the server checks in every training reply before it aggregates it.

:class:`ReplyChecks` is a part of :class:`fedlora.app.server.strategy.LoraStrategy`: the status, the
claimed weight (``num-examples``, as the run's DP mode allows it), the array keys, dtypes,
serialisation and shapes, finite values, and the norm of the change against
``max-update-norm`` or, for a reply its sender noised, the largest change an honest private
reply of the round can make (:mod:`fedlora.privacy.reply_bound`). A failed check raises
``ValueError`` with the reason (the reply is refused); a foreign array key raises
:class:`ForeignKeysError` unless ``foreign-keys = "refuse"``.

Under secure aggregation (:mod:`fedlora.app.server.secure_aggregation`) none of this runs: a masked
vector shows no keys, shapes or norm to check. The public ``secagg-clip`` bounds what each
site adds to each coordinate instead.
"""

from __future__ import annotations

import math

import numpy as np
from flwr.app import Message

from fedlora.privacy import global_norm
from fedlora.protocol import LORA_KEY, METRICS_KEY, STATUS_KEY, STATUS_OK
from fedlora.quantization import block_steps, header_block
from fedlora.wire import STYPE, from_record

__all__ = ["ForeignKeysError", "ReplyChecks"]


class ForeignKeysError(RuntimeError):
    """A client sent an array that is neither a LoRA factor nor the configured head."""


class ReplyChecks:
    """The reply checks of :class:`fedlora.app.server.strategy.LoraStrategy` (which holds the fields
    they read: ``method``, ``wire``, ``received``, ``allowed_keys``, the bounds)."""

    def _check_reply(self, msg: Message) -> tuple[dict[str, np.ndarray], int]:
        """Decode and validate one training reply; raises ValueError with the reason."""
        if msg.has_error():
            raise ValueError(f"client error: {msg.error.reason}")
        content = msg.content
        status = content.get(STATUS_KEY)
        if status is not None and status.get("status", STATUS_OK) != STATUS_OK:
            raise ValueError(f"{status.get('status')}: {status.get('reason', '')}")
        if METRICS_KEY not in content or "num-examples" not in content[METRICS_KEY]:
            raise ValueError("reply has no 'num-examples' metric")
        n = content[METRICS_KEY]["num-examples"]
        if isinstance(n, bool) or not isinstance(n, (int, float)) or not math.isfinite(n) \
                or n != int(n) or not 0 < n <= self.max_num_examples:
            raise ValueError(f"num-examples {n!r} is not an integer in [1, {self.max_num_examples}]")
        self._check_weight(int(msg.metadata.src_node_id), int(n))
        if LORA_KEY not in content:
            raise ValueError(f"reply has no '{LORA_KEY}' array record")
        foreign = sorted(set(content[LORA_KEY]) - self.allowed_keys)
        if foreign:
            reason = (f"array key(s) {foreign[:5]} are neither LoRA factors nor the configured "
                      "head")
            if self.foreign_keys == "fail":
                raise ForeignKeysError(f"audit failed: node {msg.metadata.src_node_id} sent {reason}")
            raise ValueError(reason)
        for k, a in sorted(content[LORA_KEY].items()):
            if a.dtype != self.wire_dtype:
                raise ValueError(f"array '{k}' has dtype {a.dtype}, expected {self.wire_dtype}")
            if a.stype != STYPE:
                raise ValueError(f"array '{k}' is serialised as {a.stype!r}, expected {STYPE!r}")
            if self.wire.quantized and header_block(a.data) != self.wire.block_size:
                raise ValueError(f"array '{k}' has block size {header_block(a.data)}, "
                                 f"expected wire-block-size {self.wire.block_size}")
        state = from_record(content[LORA_KEY])
        for k, a in state.items():
            if not np.isfinite(a).all():
                raise ValueError(f"array '{k}' has non-finite values")
        rank = self.method.check_reply(state, self.template)  # ReplyShapeError: a ValueError
        if not self.measure_norms:  # user-level DP: clipped at release, norms stay unseen
            return state, int(n)
        norm = self.method.update_norm(self._beyond_rounding(state, rank), self.received,
                                       rank=rank)
        bound, what = self.max_update_norm, f"max-update-norm {self.max_update_norm:g}"
        private = None if self.reply_bound is None else self.reply_bound(
            self.server_round, int(n), state, global_norm(self.received))
        if private is not None:
            private = private * (1 + 1e-6) + self._rounding_allowance(state)
            bound, what = private, (f"{private:.4g}, the largest change an honest private reply "
                                    "of this round can make (from the plan)")
        if self.max_update_norm > 0 and norm > bound:
            raise ValueError(f"update norm {norm:.4g} exceeds {what}")
        self.outcome.update_norms.append(norm)
        return state, int(n)

    def _check_weight(self, node: int, n: int) -> None:
        """A reply's weight as the run's DP mode allows it (see ``reply_weights``): a site
        cannot claim a larger share of the mean than its released count gives it."""
        if self.reply_weights == "uniform" and n != 1:
            raise ValueError(f"num-examples {n}: every reply weighs 1 under this dp-mode "
                             "(no count is released)")
        if self.reply_weights == "released-once":
            first = self.counts.setdefault(node, n)
            if n != first:
                raise ValueError(f"num-examples {n} is not the count this node released "
                                 f"earlier in the run ({first}); a site releases it once")

    def _rounding_allowance(self, state: dict[str, np.ndarray]) -> float:
        """How much float rounding can lengthen an honest reply beyond its plan's bound:
        the client's float32 arithmetic over its steps, and on a float16/bfloat16 wire half
        a unit in the last place of every value sent (relative to the values, not to
        their change). Integer wires are handled by :meth:`_beyond_rounding`."""
        relative = {"float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}.get(self.wire.dtype, 0.0)
        return (relative + 2.0 ** -18) * global_norm(state)

    def _beyond_rounding(self, state: dict[str, np.ndarray], rank: int) -> dict[str, np.ndarray]:
        """The smallest change a quantised reply can stand for: each value moved back towards
        its start by up to one rounding step of its block. Unchanged on float wires."""
        if not self.wire.quantized:
            return state
        start = self.method.start_state(self.received, rank=rank)
        out = {}
        for k, v in state.items():
            s = np.asarray(start.get(k, 0.0), dtype=np.float64)
            d = v.astype(np.float64) - s
            step = block_steps(v, self.wire.dtype, self.wire.block_size)
            out[k] = s + np.sign(d) * np.maximum(np.abs(d) - step, 0.0)
        return out

