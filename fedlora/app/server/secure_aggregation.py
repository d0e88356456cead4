"""Secure aggregation as a wrapper around the fedlora strategy (``secure-aggregation = true``).

As :class:`fedlora.app.server.user_level_strategy.UserLevelDpStrategy` does, this wraps a
:class:`fedlora.app.server.strategy.LoraStrategy` and uses its public methods: the inner strategy
samples the cohort and prepares the global adapter as usual; the wrapper then runs the
round as the six stages of SecAgg+ (:mod:`fedlora.secagg`), each a Flower train action
sent to the sites still in the round (:data:`fedlora.secure_sum.ACTIONS`), the global
adapter going out with the masked-input stage, where sites train. The server learns the
sum of the survivors' quantised updates (:class:`fedlora.secure_sum.SecureSum`) and
nothing else about any one site: the new global adapter is the received one plus their
mean, every site weighing the same.

What the server sees of a site: protocol messages (public keys, encrypted shares, the
masked vector, signatures, the shares it reveals) and a status; no training metrics.
A site that stops answering after it shared its keys is removed by reconstruction; a round
with too few survivors (``secagg-threshold``) releases nothing and leaves the global
adapter as it was. The round's stages together wait no longer than ``round-timeout``.

The reply checks of :mod:`fedlora.app.server.reply_checks` (update norms, shapes of each reply) cannot
look at a masked vector: the public ``secagg-clip`` bounds what each site adds to each
coordinate instead, so they do not run under secure aggregation.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedlora import distributed_dp
from fedlora.config import ConfigError
from fedlora.privacy import epsilon_of_history, site_mechanism
from fedlora.privacy.distributed_user_level import participation_cap
from fedlora.privacy.skellam import check_share
from fedlora.privacy.user_level import check_population
from fedlora.protocol import CONFIG_KEY, LORA_KEY, STATUS_KEY
from fedlora.secagg import COMPLETE, RoundAborted, RoundConfig, SecAggServer
from fedlora.secagg_bytes import expected_bytes
from fedlora.secure_sum import (
    SecureSum,
    from_records,
    message_type,
    protocol_bytes,
    resolve_graph,
    to_records,
    transport_dtype,
)
from fedlora.timing import RoundTimer
from fedlora.wire import to_record

from .round_outcome import RoundOutcome, WrappingStrategy, short_reason
from .strategy import LoraStrategy

if TYPE_CHECKING:
    from fedlora.run_config import RunConfig

log = logging.getLogger("fedlora.server")

__all__ = ["SecureAggregationStrategy"]

RELEASED_NOTHING = "secure aggregation released nothing"


class SecureAggregationStrategy(WrappingStrategy):
    """``strategy`` whose training rounds aggregate by SecAgg+: the server sees only a sum."""

    def __init__(self, strategy: LoraStrategy, cfg: RunConfig) -> None:
        super().__init__(strategy)
        self.strategy: LoraStrategy = strategy
        self.cfg = cfg
        self.sum = SecureSum.from_config(cfg)
        # Norms and shapes of single replies are not seen: the public clip bounds them.
        strategy.measure_norms = False
        payload = strategy.method.payload(strategy.template)
        self.layout = SecureSum.layout(payload)
        self.length = SecureSum.length(self.layout)
        self.payload = payload
        # Distributed DP rounds sum one step of the head (sample) or the sites' clipped
        # updates (client) instead, each site adding a share of the noise
        # (fedlora.distributed_dp).
        self.dp_step = distributed_dp.ServerStep(cfg) if cfg.dp_mode == "sample" else None
        if self.dp_step is not None and cfg.probe_rounds < cfg.num_server_rounds:
            log.warning("distributed DP: rounds %d-%d are full-batch LoRA steps, measured once "
                        "to collapse the model at Adam 0.02 (docs/privacy.md, distributed DP); "
                        "not a recipe yet", cfg.probe_rounds + 1, cfg.num_server_rounds)
        self.user_level = cfg.dp_mode == "client"
        self.cap = participation_cap(cfg) if self.user_level else 0
        self.site_plan = site_mechanism(cfg).plan(cfg, None) if self.user_level else None
        self.participations: dict[int, int] = {}  # node -> rounds it was sent to train in

    def cohort_size(self, num_nodes: int) -> int:
        """How many sites a training round samples out of ``num_nodes``."""
        s = self.strategy
        return min(num_nodes, max(s.min_train_nodes, round(num_nodes * s.fraction_train)))

    def identify_nodes(self, grid: Grid, timeout: float | None = None) -> int:
        """The inner strategy's, then the graph checked against the cohort (before round 1:
        ``ConfigError`` naming the key)."""
        found = self.strategy.identify_nodes(grid, timeout=timeout)
        num_nodes = len(list(grid.get_node_ids()))
        cohort = self.cohort_size(num_nodes)
        degree, threshold = resolve_graph(self.cfg, cohort)
        if self.user_level:
            check_population(target_delta=self.cfg.target_delta, num_clients=num_nodes)
        release = distributed_dp.release_for(self.cfg, self.payload, 1)
        if release is not None:
            try:
                divisor = distributed_dp.share_divisor(self.cfg, cohort)
            except ValueError as e:
                raise ConfigError("dp-max-dropouts", self.cfg.dp_max_dropouts,
                                  f"fewer missing sites than honest ones: {e}") from None
            try:
                check_share(release.spec.variance(release.sigma), divisor)
            except ValueError as e:
                raise ConfigError("target-epsilon", self.cfg.target_epsilon, str(e)) from None
            need = distributed_dp.min_contributors(self.cfg, cohort)
            if degree + 1 < need:
                log.warning("distributed DP: %d neighbours per site, and a site with pinned "
                            "identities counts only itself and its pinned neighbours towards "
                            "the %d a sum needs: such sites will refuse every round (raise "
                            "secagg-degree)", degree, need)
            log.info("distributed DP (%s): cohorts of %d sites, %d neighbours each, %d shares "
                     "to rebuild a secret; each round sums %d integers, each site adding "
                     "1/%d of the noise, modulus 2^%d%s", release.kind, cohort, degree,
                     threshold, release.spec.length, divisor,
                     distributed_dp.round_bits(self.cfg, release, cohort),
                     f"; at most {self.cap} rounds per site" if self.user_level else "")
            return found
        bits = self.sum.bits(cohort)
        log.info("secure aggregation: cohorts of %d sites, %d neighbours each, %d shares to "
                 "rebuild a secret, %d coordinates clipped to %g in steps of %.3g, modulus "
                 "2^%d (masked vectors as %s)", cohort, degree, threshold, self.length,
                 self.sum.clip, self.sum.step, bits, transport_dtype(bits).name)
        return found

    # -- a training round ---------------------------------------------------------------
    def train_round(self, grid: Grid, server_round: int, arrays: ArrayRecord,
                    config: ConfigRecord, *, timeout: float | None,
                    timer: RoundTimer) -> RoundOutcome:
        """Sample, then run the protocol's stages; the new adapter from the revealed sum."""
        with timer.phase("train_exchange"):
            if self.user_level:
                nodes = self._capped_cohort(grid, server_round)
                sent = self.strategy.send_train(server_round, arrays, config, nodes, grid)
                self.strategy.outcome.privacy.extend(
                    (node, self._planned_spend(node)) for node in nodes)
            else:
                sent = list(self.strategy.configure_train(server_round, arrays, config, grid))
            outcome = self.strategy.outcome
            if not sent:
                return outcome
            nodes = [int(m.metadata.dst_node_id) for m in sent]
            exchange = _Exchange(self, grid, server_round, timeout, sent[0].content)
            release = distributed_dp.release_for(self.cfg, self.payload, server_round)
            distributed = release is not None
            try:
                degree, threshold = resolve_graph(self.cfg, len(nodes))
                length, bits, context = self.length, self.sum.bits(len(nodes)), b""
                if distributed:
                    length = release.spec.length
                    bits = distributed_dp.round_bits(self.cfg, release, len(nodes))
                    context = distributed_dp.round_context(self.cfg, release, len(nodes))
                server = SecAggServer(RoundConfig.create(
                    server_round, nodes, length=length, bits=bits,
                    degree=COMPLETE if degree == len(nodes) - 1 else degree,
                    threshold=threshold, context=context))
                exchange.server = server
                stage = server.collect_commitments(exchange.run("setup", server.setup()))
                stage = server.collect_keys(exchange.run("advertise", stage))
                stage = server.collect_shares(exchange.run("share_keys", stage))
                stage = server.collect_masked(exchange.run("masked_input", stage))
                need = (distributed_dp.min_contributors(self.cfg, len(nodes))
                        if distributed else 0)
                if len(stage) < need:
                    raise RoundAborted(f"{len(stage)} sites sent their share, fewer than the "
                                       f"{need} the sites require (dp-min-honest, "
                                       "dp-max-dropouts): the noise could be short")
                stage = server.collect_signatures(exchange.run("consistency", stage))
                revealed = exchange.run("unmask", stage)
            except (RoundAborted, ValueError) as e:
                return self._released_nothing(server_round, exchange, str(e))
        with timer.phase("aggregation"):
            try:
                total = server.aggregate(revealed)
            except RoundAborted as e:
                return self._released_nothing(server_round, exchange, str(e))
            if len(total.survivors) < self.strategy.min_train_nodes:
                return self._released_nothing(server_round, exchange, (
                    f"{len(total.survivors)} sites in the sum, fewer than min-train-nodes = "
                    f"{self.strategy.min_train_nodes}"))
            exchange.settle(total.survivors)
            outcome.accepted = list(total.survivors)
            received = {k: self.strategy.received[k] for k, _ in self.layout}
            if self.user_level:  # the noised mean of the clipped updates
                update = distributed_dp.update_mean(release, received, total.signed(),
                                                    len(total.survivors))
            elif distributed:  # one DP-SGD step on the noised sum
                update = self.dp_step.apply(release, received, total.signed())
            else:
                update = self.sum.mean(total.signed(), len(total.survivors), received)
            merged = {**self.strategy.global_state, **update}
            outcome.arrays = to_record(merged)
            log.info("round %d: secure sum of %d of %d sampled sites", server_round,
                     len(total.survivors), len(nodes))
        return outcome

    def _capped_cohort(self, grid: Grid, server_round: int) -> list[int]:
        """A cohort among the sites sent fewer than ``participation-cap`` rounds, the least
        used first (ties in a seeded order: no privacy rests on this choice). Each one
        counts as used: it may charge its ledger whatever happens after."""
        nodes = self.strategy.ordered_nodes(grid)
        rng = np.random.default_rng([self.cfg.seed, server_round, 0xCA9])
        order = rng.permutation(len(nodes))
        eligible = [nodes[int(i)] for i in order if self.participations.get(nodes[int(i)], 0)
                    < self.cap]
        eligible.sort(key=lambda n: self.participations.get(n, 0))  # stable: keeps the ties
        picked = eligible[:self.cohort_size(len(nodes))]
        if len(picked) < self.cohort_size(len(nodes)):
            log.warning("round %d: %d sites are under participation-cap = %d, fewer than a "
                        "cohort of %d", server_round, len(eligible), self.cap,
                        self.cohort_size(len(nodes)))
        for node in picked:
            self.participations[node] = self.participations.get(node, 0) + 1
        chosen = set(picked)
        return [n for n in nodes if n in chosen]  # in sampling order

    def _planned_spend(self, node: int) -> dict[str, Any]:
        """What a site's ledger holds after the rounds it was sent so far, from the plan and
        the public count alone (each is charged when the site trains, whatever follows)."""
        rounds = self.participations.get(node, 0)
        sigma = self.site_plan.noise_multiplier
        eps = epsilon_of_history([(sigma, 1.0, rounds)], delta=self.cfg.target_delta,
                                 accountant=self.site_plan.accountant)
        return {"mode": "client", "epsilon": eps, "delta": self.cfg.target_delta,
                "noise-multiplier": sigma, "sample-rate": 1.0, "steps": rounds,
                "target-epsilon": self.cfg.target_epsilon}

    def _released_nothing(self, server_round: int, exchange: _Exchange,
                          reason: str) -> RoundOutcome:
        """A round that aborted: nothing about any site was revealed, nothing changes."""
        why = f"{RELEASED_NOTHING} ({reason})"
        exchange.settle((), why)
        log.warning("round %d: %s; the global adapter is left unchanged", server_round, why)
        return self.strategy.outcome

    # -- the rest is the inner strategy's -------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        raise NotImplementedError("under secure aggregation a round runs through train_round")

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        raise NotImplementedError("under secure aggregation a round runs through train_round")

    def summary(self) -> None:
        self.strategy.summary()
        log.info("SecureAggregationStrategy: secagg-clip %g, %d levels (wire-dtype %s), "
                 "secagg-degree %s, secagg-threshold %s", self.sum.clip, self.sum.levels,
                 self.cfg.wire_dtype, self.cfg.secagg_degree or "default",
                 self.cfg.secagg_threshold or "default")
        if self.cfg.fraction_evaluate > 0 and self.cfg.dp_mode == "off":
            log.info("federated evaluation is off under secure aggregation: each site's "
                     "validation loss, accuracy and example count would reach the server in "
                     "the clear (the centralised test set is evaluated as usual)")


class _Exchange:
    """One round's messages: sends a stage, keeps the answers, notes who left and why."""

    def __init__(self, owner: SecureAggregationStrategy, grid: Grid, server_round: int,
                 timeout: float | None, content: RecordDict) -> None:
        self.grid, self.server_round = grid, server_round
        # One deadline for the whole round (every stage together), as a plain round has.
        self.deadline = time.monotonic() + timeout if timeout else None
        self.outcome = owner.strategy.outcome
        self.comms_log = owner.strategy.comms_log
        self.lora, self.config = content[LORA_KEY], content[CONFIG_KEY]
        self.left: set[int] = set()  # sites whose departure is noted in the outcome
        self.server: SecAggServer | None = None  # whose state predicts each message's bytes

    def run(self, stage: str, messages: Mapping[int, Mapping[str, Any]]) -> dict[int, Any]:
        """Send ``messages`` (node -> body) as ``stage``; the well-formed answers."""
        out = []
        for node, body in messages.items():
            records: dict[str, Any] = {**to_records(body), CONFIG_KEY: self.config}
            if stage == "masked_input":  # the global adapter goes with it: sites train now
                records[LORA_KEY] = self.lora
            msg = Message(content=RecordDict(records), message_type=message_type(stage),
                          dst_node_id=int(node))
            out.append(msg)
            self._count(node, "down", stage, msg.content)
        if stage == "masked_input" and self.comms_log is not None:  # the adapter went to these
            self.comms_log.forget(self.server_round, set(self.outcome.sampled_nodes) - set(messages),
                               "down", "train")
        timeout = None if self.deadline is None else max(0.0, self.deadline - time.monotonic())
        replies = list(self.grid.send_and_receive(out, timeout=timeout)) if out else []
        sent = {m.metadata.message_id: int(m.metadata.dst_node_id) for m in out}
        answers: dict[int, Any] = {}
        for reply in replies:
            node = int(reply.metadata.src_node_id)
            if node not in messages:  # an error made by the SuperLink, for the site it names
                node = sent.get(reply.metadata.reply_to_message_id, node)
            if reply.has_error():
                self._leave(node, short_reason(reply.error.reason), dropped=True)
                continue
            status = reply.content.get(STATUS_KEY)
            ok = status is not None and status.get("status") == "ok"
            self._count(node, "up", stage, reply.content, expected=ok)
            if not ok:
                reason = str(status.get("reason", "")) if status is not None else ""
                self._leave(node, reason or "no status in its reply", dropped=False)
                continue
            try:
                answers[node] = from_records(reply.content)
            except (KeyError, ValueError, TypeError) as e:
                self._leave(node, f"a malformed {stage} reply ({e})", dropped=False)
        for node in messages:
            if node not in answers and node not in self.left:
                self._leave(node, "no reply before the round's timeout (round-timeout)",
                            dropped=True)
        return answers

    def _count(self, node: int, direction: str, stage: str, content: RecordDict, *,
               expected: bool = True) -> None:
        """Log a message's protocol bytes and what the round's state predicts for it (a
        refusal, ``expected = False``, carries a status only: none)."""
        if self.comms_log is not None:
            analytic = expected_bytes(self.server, stage, direction, node) \
                if expected and self.server is not None else 0
            self.comms_log.record_bytes(self.server_round, node, direction, message_type(stage),
                                        protocol_bytes(content), analytic)

    def _leave(self, node: int, reason: str, *, dropped: bool, quiet: bool = False) -> None:
        self.left.add(node)
        (self.outcome.dropped if dropped else self.outcome.refused).append((node, reason))
        if not quiet:
            log.warning("round %d: node %d %s the secure aggregation round: %s",
                        self.server_round, node, "dropped out of" if dropped else "left", reason)

    def settle(self, survivors: Iterable[int], why: str | None = None) -> None:
        """Every sampled site not in the sum and not yet noted: its answers were not valid
        for the protocol (or, with ``why``, the round released nothing)."""
        keep = set(survivors)
        # A survivor that left after its masked update arrived is in the sum all the same.
        self.outcome.dropped = [(n, r) for n, r in self.outcome.dropped if n not in keep]
        self.outcome.refused = [(n, r) for n, r in self.outcome.refused if n not in keep]
        for node in self.outcome.sampled_nodes:
            if node not in keep and node not in self.left:
                self._leave(node, why or "its answer to a stage was not valid for the "
                            "protocol", dropped=False, quiet=why is not None)
