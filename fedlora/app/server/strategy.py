"""The fedlora strategy: sample nodes, send the global adapter, validate replies, aggregate.

A Flower :class:`~flwr.serverapp.strategy.Strategy` (through
:class:`fedlora.app.server.round_outcome.RoundStrategy`, whose ``train_round`` returns each round's
:class:`~fedlora.app.server.round_outcome.RoundOutcome`). Aggregation itself is the method's pure
math (:mod:`fedlora.aggregation`), the checks every reply passes first are
:mod:`fedlora.app.server.reply_checks` and the order and sampling of nodes
:mod:`fedlora.app.server.node_sampling`; this file is the glue between messages and arrays.
User-level DP wraps this strategy (:class:`fedlora.app.server.user_level_strategy.UserLevelDpStrategy`),
as Flower's DP wrappers wrap theirs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid

from fedlora.adapters import state_digest
from fedlora.aggregation import Method
from fedlora.comms import CommsLog
from fedlora.privacy import from_metrics, released_metrics
from fedlora.protocol import (
    CONFIG_KEY,
    LORA_KEY,
    METRICS_KEY,
)
from fedlora.quantization import ErrorFeedback
from fedlora.wire import WireFormat, from_record, to_record

from .node_sampling import NodeSampling
from .reply_checks import ForeignKeysError, ReplyChecks
from .round_outcome import RoundOutcome, RoundStrategy, weighted_metrics
from .round_outcome import short_reason as _short

log = logging.getLogger("fedlora.server")


class LoraStrategy(NodeSampling, ReplyChecks, RoundStrategy):
    """Federated averaging of LoRA adapters through a pluggable factor aggregator.

    ``method`` (a :class:`fedlora.aggregation.Method`) says what is sent and how replies
    are checked and aggregated; ``template`` is a fresh adapter state at the global rank,
    whose keys and shapes replies must match. ``fraction_train`` and ``fraction_evaluate``
    are the shares of connected nodes sampled per round (at least ``min_train_nodes`` for
    training; a round with fewer valid replies is skipped), drawn from ``seed`` so that a
    run is reproducible (user-level DP samples with OS entropy in its wrapper). ``wire`` (a
    :class:`fedlora.wire.WireFormat` or a float dtype name) is how tensors travel; the
    global adapter stays float32 here, and with error feedback the broadcast's rounding
    residual is kept (``downlink_feedback``, in the checkpoint). ``comms_log`` records the
    bytes of every message. ``reply_weights`` is what a reply's ``num-examples`` may be:
    ``claimed`` (up to ``max_num_examples``), ``released-once`` (a site's noised count, the
    same in every reply: the first one seen is kept) or ``uniform`` (1 for every site).
    ``reply_bound(server_round, released_count, reply_state, start_norm)``, under a DP mode
    whose clients noise what they send, is the largest change an honest reply can make
    (:func:`fedlora.privacy.reply_norm_bound`); it replaces ``max_update_norm`` for those
    replies (``max_update_norm = 0`` still turns the check off). ``central_release`` builds
    the inner strategy of user-level DP, whose wrapper noises the aggregate.
    """

    def __init__(
        self,
        *,
        method: Method,
        template: dict[str, np.ndarray],
        fraction_train: float,
        fraction_evaluate: float,
        min_train_nodes: int = 1,
        wire: WireFormat | str = "float32",
        seed: int = 0,
        comms_log: CommsLog | None = None,
        foreign_keys: str = "fail",
        max_update_norm: float = 0.0,
        max_num_examples: int = 10_000_000,
        reply_bound: Callable[..., float | None] | None = None,
        reply_weights: str = "claimed",
        dp_on: bool = False,
        central_release: bool = False,
    ) -> None:
        for ok, what, value in (
                (0 < fraction_train <= 1, "fraction_train must be in (0, 1]", fraction_train),
                (0 <= fraction_evaluate <= 1, "fraction_evaluate must be in [0, 1]",
                 fraction_evaluate),
                (min_train_nodes >= 1, "min_train_nodes must be >= 1", min_train_nodes),
                (foreign_keys in ("fail", "refuse"), "foreign_keys must be 'fail' or 'refuse'",
                 foreign_keys),
                (max_update_norm >= 0, "max_update_norm must be >= 0", max_update_norm)):
            if not ok:
                raise ValueError(f"{what}, got {value!r}")
        self.method, self.template, self.foreign_keys = method, template, foreign_keys
        self.max_update_norm = float(max_update_norm)
        self.reply_bound = reply_bound
        if reply_weights not in ("claimed", "released-once", "uniform"):
            raise ValueError(f"reply_weights must be claimed, released-once or uniform, got "
                             f"{reply_weights!r}")
        self.reply_weights = reply_weights
        self.counts: dict[int, int] = {}  # node -> the count it released (released-once)
        self.server_round = 0  # the round being trained (set by send_train)
        self.max_num_examples = int(max_num_examples)
        # What may ever leave a client: LoRA factors and the head tensors this run trains.
        self.allowed_keys = frozenset(template)
        self.fraction_train, self.fraction_evaluate = fraction_train, fraction_evaluate
        self.min_train_nodes = min_train_nodes
        self.wire = wire if isinstance(wire, WireFormat) else WireFormat(dtype=wire)
        self.wire_dtype = self.wire.dtype
        self.downlink_feedback = ErrorFeedback() if self.wire.feedback_for(method) else None
        self.seed, self.rng = int(seed), np.random.default_rng(seed)
        self.comms_log = comms_log
        # Any DP: keep only released metrics. Under a central release (user-level DP, a
        # wrapper noises the aggregate) it also hides which nodes took part (outputs name
        # node 0 for all) and measures no update norms (the release clips them, and a norm
        # would be released un-noised).
        self.dp_on = dp_on or central_release
        self.hide_nodes, self.measure_norms = central_release, not central_release
        self.outcome = RoundOutcome()  # the current round's, returned by train_round
        self.global_state: dict[str, np.ndarray] = {}
        # The global adapter as this round's clients received it (rounded by the wire):
        # what their updates are measured against.
        self.received: dict[str, np.ndarray] = {}
        self._sent_train: list[Message] = []
        self.node_keys: dict[int, int] = {}  # node id -> partition-id, from identify_nodes

    # -- wire ------------------------------------------------------------------------
    def _messages(
        self, server_round: int, state: dict[str, np.ndarray], config: ConfigRecord,
        nodes: list[int], kind: str,
    ) -> list[Message]:
        config = ConfigRecord({**dict(config), "server-round": server_round})
        # Training broadcasts carry the rounding residual forward; evaluation ones, and
        # a broadcast to nobody, do not.
        train = kind == MessageType.TRAIN
        feedback = self.downlink_feedback if train and nodes else None
        sent: dict[str, np.ndarray] = {}
        arrays = to_record(self.method.payload(state), self.wire,
                           feedback=feedback, decoded=sent,
                           rng=np.random.default_rng([self.seed, server_round, 0x317E]))
        if train:
            self.received = {k: sent[k] if k in sent and sent[k].shape == v.shape else v
                             for k, v in self.global_state.items()}
        record = RecordDict({LORA_KEY: arrays, CONFIG_KEY: config})
        msgs = [Message(content=record, message_type=kind, dst_node_id=n) for n in nodes]
        if self.comms_log is not None:
            for n in nodes:
                self.comms_log.record(server_round, self.public_node(n), "down", kind, arrays)
        return msgs

    # -- Strategy API -----------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample ``fraction-train`` of the nodes and send each the global adapter."""
        nodes = self._sample(grid, self.fraction_train, self.min_train_nodes)
        return self.send_train(server_round, arrays, config, nodes, grid)

    def send_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                   nodes: list[int], grid: Grid) -> list[Message]:
        """The training messages to ``nodes``; starts the round's outcome."""
        self.global_state = from_record(arrays)
        self.server_round = int(server_round)
        self.outcome = RoundOutcome(sampled=len(nodes), sampled_nodes=list(nodes))
        log.info("round %d: training on %d of %d nodes", server_round, len(nodes),
                 len(list(grid.get_node_ids())))
        self._sent_train = self._messages(server_round, self.global_state, config, nodes,
                                          MessageType.TRAIN)
        return self._sent_train

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate every reply, aggregate the valid ones; None if too few remain."""
        states, weights, metrics = self.collect_train(server_round, replies)
        if len(states) < self.min_train_nodes:
            log.warning("round %d: %d valid replies, fewer than min-train-nodes = %d; "
                        "the global adapter is left unchanged", server_round, len(states),
                        self.min_train_nodes)
            return None, None
        merged = self.method.aggregate(states, weights, self.global_state)
        return to_record(merged), weighted_metrics(metrics, weights)  # float32 at the server

    def collect_train(self, server_round: int, replies: Iterable[Message]
                      ) -> tuple[list[dict[str, np.ndarray]], list[int], list[MetricRecord]]:
        """The valid replies' states, weights and metrics, in an order fixed by their
        contents; every reply's fate (accepted, refused, dropped) goes to the outcome."""
        states, weights, metrics = [], [], []
        outcome = self.outcome
        replies = list(replies)
        for msg in replies:
            node = int(msg.metadata.src_node_id)
            if msg.has_error():
                self._dropped(server_round, self._error_node(msg), _short(msg.error.reason))
                continue
            if self.comms_log is not None and LORA_KEY in msg.content and not self.hide_nodes:
                self.comms_log.record(server_round, self.public_node(node), "up", MessageType.TRAIN,
                                   msg.content[LORA_KEY])
            values = from_metrics(msg.content.get(METRICS_KEY) or {})
            if "epsilon" in values and not self.hide_nodes:
                outcome.privacy.append((self.public_node(node), values))
            try:
                state, n = self._check_reply(msg)
            except ForeignKeysError as e:
                log.error("round %d: %s; stopping the run (set foreign-keys = 'refuse' to drop "
                          "such replies instead)", server_round, e)
                raise
            except ValueError as e:
                outcome.refused.append((node, str(e)))
                if not self.hide_nodes:
                    log.warning("round %d: refused reply from %s: %s", server_round,
                                self._who(node), e)
                continue
            outcome.accepted.append(node)
            states.append(state)
            weights.append(n)
            m = msg.content[METRICS_KEY]
            metrics.append(MetricRecord(released_metrics(m)) if self.dp_on else m)
            outcome.metrics.append(metrics[-1])
        answered = {n for n, _ in outcome.dropped} | set(outcome.accepted) | \
            {n for n, _ in outcome.refused}
        for node in outcome.sampled_nodes:
            if node not in answered:
                self._dropped(server_round, node, "no reply before the round's timeout "
                              "(round-timeout)")
        # Aggregate in an order fixed by the replies' contents, not by their arrival: float
        # sums depend on order, and Adam turns last-bit differences into lr-sized ones, so
        # this is what makes a run repeat exactly.
        order = sorted(range(len(states)), key=lambda i: state_digest(states[i]))
        states = [states[i] for i in order]
        weights = [weights[i] for i in order]
        metrics = [metrics[i] for i in order]
        return states, weights, metrics

    def _error_node(self, msg: Message) -> int:
        """The node an error reply stands for: errors made by the SuperLink (node
        unavailable, reply expired) come from the SuperLink itself; map them back through
        the instruction they reply to (the Grid gave each sent message its id in place)."""
        node = int(msg.metadata.src_node_id)
        if node in self.outcome.sampled_nodes:
            return node
        sent = {m.metadata.message_id: int(m.metadata.dst_node_id) for m in self._sent_train}
        return sent.get(msg.metadata.reply_to_message_id, node)

    def _dropped(self, server_round: int, node: int, reason: str) -> None:
        self.outcome.dropped.append((node, reason))
        if not self.hide_nodes:
            log.warning("round %d: %s dropped out of the round: %s", server_round,
                        self._who(node), reason)

    def public_node(self, node: int) -> int:
        """The node id as outputs show it: 0 for every node under user-level DP."""
        return 0 if self.hide_nodes else int(node)

    def _who(self, node: int) -> str:
        return "a node" if self.hide_nodes else f"node {node}"

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample ``fraction-evaluate`` of the nodes for federated evaluation."""
        if self.fraction_evaluate == 0:
            return []
        rng = np.random.default_rng([self.seed, server_round, 0xE7A1])  # not training's stream
        nodes = self._sample(grid, self.fraction_evaluate, 1, rng)
        return self._messages(server_round, from_record(arrays), config, nodes,
                              MessageType.EVALUATE)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Example-weighted mean of the clients' evaluation metrics."""
        metrics, weights = [], []
        for msg in replies:
            if msg.has_error():
                log.warning("round %d: evaluation failed on node %d: %s", server_round,
                            msg.metadata.src_node_id, msg.error.reason)
                continue
            m = msg.content.get(METRICS_KEY)
            n = m.get("num-examples", 0) if m is not None else 0
            if m is None or not n or n <= 0:
                continue
            metrics.append(m)
            weights.append(int(n))
        self.outcome.metrics.extend(metrics)  # their timings join the round's
        return weighted_metrics(metrics, weights) if metrics else None

    # -- checkpoint state ---------------------------------------------------------------
    def state_dict(self) -> dict:
        """What a resumed run needs to go on as the uninterrupted one would: the sampling
        generator's state and the broadcast's rounding residual (arrays)."""
        return {"rng": self.rng.bit_generator.state,
                "wire": (self.downlink_feedback.state()
                         if self.downlink_feedback is not None else {}),
                "counts": {str(k): v for k, v in self.counts.items()}}

    def load_state_dict(self, state: dict) -> None:
        if state.get("rng"):
            self.rng.bit_generator.state = state["rng"]
        self.counts = {int(k): int(v) for k, v in (state.get("counts") or {}).items()}
        if self.downlink_feedback is not None:
            self.downlink_feedback = ErrorFeedback(state.get("wire") or None)

    def summary(self) -> None:
        log.info("LoraStrategy: method=%s fraction-train=%.2f fraction-evaluate=%.2f "
                 "min-train-nodes=%d wire-dtype=%s", self.method.name, self.fraction_train,
                 self.fraction_evaluate, self.min_train_nodes, self.wire_dtype)
