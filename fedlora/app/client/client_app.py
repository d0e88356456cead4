"""fedlora ClientApp: trains the LoRA adapter on the data where it lives.

Thin glue over :mod:`fedlora`: the frozen base model comes from a per-process cache,
the received adapter tensors are loaded into it, training runs locally and only the
adapter tensors (LoRA factors, plus the head when ``train-head`` is on) are sent back.
A site that cannot train (missing or bad data) replies with the reason instead of
crashing the run.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

from fedlora import distributed_dp, distributed_grads, privacy, runtime
from fedlora.adapters import adapter_state, load_adapter_state
from fedlora.config import ConfigError
from fedlora.data import DataError
from fedlora.models import cached_lora_model
from fedlora.privacy import BudgetExhausted, PrivacyStateError
from fedlora.privacy.site_policy import PolicyRefusal, SitePolicy, hold_reply
from fedlora.probe import is_probe_round, train_head_as_configured
from fedlora.protocol import (
    CONFIG_KEY,
    LORA_KEY,
    METRICS_KEY,
    STATUS_BUDGET_EXHAUSTED,
    STATUS_KEY,
    NodeInfo,
    could_not_train,
    identity_reply,
    with_overrides,
)
from fedlora.quantization import ErrorFeedback
from fedlora.training import TrainResult, evaluate, train_as_configured
from fedlora.wire import WireFormat, from_record, to_record

from . import secure_aggregation
from .simulated_failures import simulate_failure, simulated_fate  # noqa: F401  (tests use it)

if TYPE_CHECKING:
    from fedlora.run_config import RunConfig

log = logging.getLogger("fedlora.client")

def _setup(msg: Message, context: Context):
    cfg = runtime.resolve_config(context.run_config)
    runtime.set_threads_once(cfg.client_num_threads)
    node = NodeInfo.from_node_config(context.node_config, cfg)
    spec = runtime.model_spec(cfg, rank=node.lora_rank)
    model = cached_lora_model(spec)
    method = runtime.method_for(cfg)
    method.load(model, from_record(msg.content[LORA_KEY]), client_rank=spec.rank)
    personal = context.state.get(PERSONAL_STATE_KEY)
    if personal is not None:  # what this client keeps for itself (FedSA-LoRA's own B)
        load_adapter_state(model, {**adapter_state(model), **from_record(personal)})
    data = runtime.client_data(
        cfg,
        partition_id=node.partition_id,
        num_partitions=node.num_partitions,
        data_path=node.data_path,
    )
    return cfg, node, model, data, method


PRIVACY_STATE_KEY = "fedlora-privacy"
PERSONAL_STATE_KEY = "fedlora-personal"


def _ledger(cfg: RunConfig, node: NodeInfo, context: Context, num_examples: int,
            server_round: int, policy: SitePolicy) -> privacy.Ledger | None:
    """This client's privacy ledger for the run's local DP mechanism (None without one).

    A deployed site (no simulation partition-id) must keep its ledger in a file: its
    SuperNode may restart, and a ledger in memory would forget the budget it spent. The
    plan follows from the site's example count as the ledger released it (noised, once:
    :mod:`fedlora.privacy.count`), never from ``num_examples`` itself.
    """
    mechanism = privacy.site_mechanism(cfg)
    if mechanism is None:
        return None
    if node.partition_id is None and node.privacy_state_path is None:
        raise PrivacyStateError(
            f"dp-mode = '{cfg.dp_mode}' on a deployed site needs a persistent privacy ledger: "
            "start the SuperNode with --node-config \"privacy-state-path='<file>'\" (its "
            "spent budget would otherwise be forgotten when the SuperNode restarts)")
    stored = context.state.get(PRIVACY_STATE_KEY)
    return privacy.Ledger(lambda count: mechanism.plan(cfg, count),
                          path=node.privacy_state_path,
                          state=dict(stored) if stored is not None else None,
                          server_round=server_round,
                          examples=num_examples if mechanism.releases_count else None,
                          terms=(mechanism.plan_accountant(cfg), cfg.target_epsilon,
                                 cfg.target_delta),
                          site_cap=policy.max_epsilon,
                          worst_probe_round=(functools.partial(mechanism.worst_probe_round, cfg)
                                             if cfg.probe_rounds else None))


def train_fn(msg: Message, context: Context, respond=None) -> Message:
    """Train the received adapter on this node's data and send the adapter back (or what
    ``respond(msg, context, cfg, reply)`` makes of it: secure aggregation); under a site
    policy with ``min-reply-seconds`` the reply (trained or refused) leaves no sooner than
    that after the instruction arrived."""
    started = time.monotonic()
    try:
        reply = _train(msg, context, respond)
    finally:  # a failure is held too: Flower makes its error reply after this
        hold_reply(started, context.node_config)
    # Flower stamps a message when it is made (created_at, ttl): the reply is made now.
    return Message(content=reply.content, reply_to=msg)


def _train(msg: Message, context: Context, respond=None) -> Message:
    t0 = time.perf_counter()
    server_round = int(msg.content[CONFIG_KEY].get("server-round", 0))
    policy = _site_policy(context)  # before the site touches its data
    if isinstance(policy, str):
        return Message(content=could_not_train(policy), reply_to=msg)
    if respond is None and runtime.resolve_config(context.run_config).secure_aggregation:
        return Message(content=could_not_train(PLAIN_IN_SECURE_RUN), reply_to=msg)
    try:
        cfg, node, model, data, method = _setup(msg, context)
        ledger = _ledger(cfg, node, context, data.num_train, server_round, policy)
    except Exception as e:  # noqa: BLE001  (under DP no error's text leaves the site)
        if _dp_off(context) and not isinstance(
                e, (DataError, FileNotFoundError, ValueError, PrivacyStateError)):
            raise
        log.error("This site could not train: %s", e)
        return Message(content=could_not_train(_public_reason(e, context)), reply_to=msg)
    simulate_failure(cfg, server_round, node.partition_id)
    resumed_after = int(msg.content[CONFIG_KEY].get("resumed-after", 0))
    seed = cfg.seed * 1_000_003 + server_round * 7919 + (node.partition_id or 0)  # not for noise
    if ledger is None:
        t1 = time.perf_counter()
        try:
            reply, result = _train_and_release(cfg, model, data, method, None, seed,
                                               server_round)
        except Exception:  # noqa: BLE001  (under secure aggregation it must not show)
            if respond is None:
                raise
            log.exception("Training failed at this site; update 0 is masked instead")
            return respond(msg, context, cfg, secure_aggregation.zero_update())
        t2 = time.perf_counter()
        metrics = {"num-examples": data.num_train, "train-loss": result.loss,
                   "train-steps": result.steps, "train-seconds": t2 - t0,
                   "setup-seconds": t1 - t0, "compute-seconds": t2 - t1}
        return _reply(msg, context, cfg, method, reply, metrics, respond)
    try:
        # With a ledger file, the session holds its lock from the check to the spend.
        with ledger.session():
            missed = ledger.fresh and resumed_after > 0 and node.privacy_state_path is None
            if missed:
                # The rounds before the restart, and the interrupted one: its reply may have
                # reached the server before the crash.
                log.warning("The run resumed after round %d and this client's privacy ledger "
                            "did not survive the restart (no privacy-state-path): charging "
                            "%d rounds as if it trained in every one and in the interrupted "
                            "round", resumed_after, resumed_after + 1)
            try:
                if missed:
                    ledger.charge_missed_rounds(resumed_after + 1)
                ledger.check()  # releases the count first, only if its charge fits
            except BudgetExhausted as e:
                # Nothing derived from the count goes with the refusal.
                context.state[PRIVACY_STATE_KEY] = ConfigRecord(ledger.record())
                log.warning("Not training this round: %s", e)
                return Message(content=could_not_train(str(e), STATUS_BUDGET_EXHAUSTED),
                               reply_to=msg)
            context.state[PRIVACY_STATE_KEY] = ConfigRecord(ledger.record())  # its count
            policy.check_plan(ledger.plan)
            # The round is charged (and a ledger file written) before training starts:
            # whether training fails, or the process dies, may depend on the data or on
            # noisy steps already taken, so every outcome is paid for as a release.
            ledger.spend()
            context.state[PRIVACY_STATE_KEY] = ConfigRecord(ledger.record())
            try:
                reply, result = _train_and_release(cfg, model, data, method, ledger.plan, seed,
                                                   server_round)
            except Exception:  # noqa: BLE001  (whatever it was, it stays here)
                # e.g. a diverged (non-finite) update: nothing is released,
                # and the details stay here (they are about this site's data).
                log.exception("Private training failed at this site; the round was charged "
                              "and %s", "update 0 is masked" if respond else "nothing sent")
                if respond is None:
                    return Message(content=could_not_train(PRIVATE_FAILURE), reply_to=msg)
                # Under secure aggregation a failure must not show: update 0, masked.
                reply = secure_aggregation.zero_update(ledger.plan.noise_multiplier)
            dp_metrics = privacy.to_metrics(ledger.metrics())
    except (PrivacyStateError, PolicyRefusal) as e:  # the ledger is busy or unreadable, or
        # the plan is weaker than the site's floor: neither says anything about the data
        log.error("This site could not train: %s", e)
        return Message(content=could_not_train(str(e)), reply_to=msg)
    except ValueError as e:  # no plan for the released count (e.g. target-delta >= 1/count)
        if ledger.budget is not None:  # the count's release stays charged
            context.state[PRIVACY_STATE_KEY] = ConfigRecord(ledger.record())
        log.error("This site could not train: %s", e)  # the message may quote the count
        return Message(content=could_not_train(NO_PLAN), reply_to=msg)
    # The weight is the released count (or the same for every site), never num_train; the
    # steps are the configured ones.
    steps = ledger.plan.probe_steps if is_probe_round(cfg, server_round) else cfg.local_steps
    return _reply(msg, context, cfg, method, reply, {
        "num-examples": ledger.plan.weight, "train-steps": steps, **dp_metrics}, respond)


PLAIN_IN_SECURE_RUN = ("this run aggregates securely (secure-aggregation = true): the site "
                       "answers only its secure-aggregation stages")
PRIVATE_FAILURE = "this site could not train (under DP the details stay in the site's own log)"
NO_PLAN = ("this site cannot plan the run's privacy for its released count (e.g. target-delta "
           "too large); the details stay in the site's own log")


def _site_policy(context: Context) -> SitePolicy | str:
    """The site's policy, if the run is one it accepts; else the reason it refuses. Reads
    the run-config and the node-config only, never the data."""
    try:
        policy = SitePolicy.from_node_config(context.node_config)
        policy.check_run(runtime.resolve_config(context.run_config))
    except (PolicyRefusal, ConfigError) as e:
        log.error("This site refuses the run: %s", e)
        return str(e)
    return policy


def _dp_off(context: Context) -> bool:
    """Whether the run asks for no DP at all (then a site's errors may say what they are)."""
    return str(context.run_config.get("dp-mode", "off")) == "off"


def _public_reason(error: Exception, context: Context) -> str:
    """What a site may tell the server about a failure: everything without DP; under DP only
    configuration and ledger problems, not messages that may quote its data (a bad row)."""
    if _dp_off(context) or isinstance(error, (PrivacyStateError, ConfigError)):
        return str(error)
    return PRIVATE_FAILURE


def _train_and_release(cfg: RunConfig, model, data, method, plan, seed: int, server_round: int):
    """Local training by the run's client mechanism (plain training without one; the head
    alone in a linear-probe round), then what the mechanism releases of the adapter.
    Returns ``(reply tensors, TrainResult)``."""
    mechanism = privacy.site_mechanism(cfg)  # None: plain training, nothing noised
    received = method.reply(model)  # the starting point, as it would be sent back
    release = distributed_dp.release_for(cfg, received, server_round)
    if release is not None and release.kind != "user-update":  # noised when masked
        vector = distributed_grads.step_vector(model, data.data, data.train_idx, cfg=cfg,
                                               payload=received, release=release)
        return ({distributed_dp.VECTOR_KEY: vector,
                 distributed_dp.SIGMA_KEY: np.asarray([plan.noise_multiplier])},
                TrainResult(loss=float("nan"), steps=1, examples=len(data.train_idx)))
    probe = is_probe_round(cfg, server_round)
    if mechanism is None:
        result = (train_head_as_configured(model, data.data, data.train_idx, cfg) if probe
                  else train_as_configured(model, data.data, data.train_idx, cfg, seed))
        return method.reply(model), result
    if probe:
        result = mechanism.train_head(model, data.data, data.train_idx, plan=plan, cfg=cfg)
    else:
        result = mechanism.train(model, data.data, data.train_idx, plan=plan, cfg=cfg,
                                 seed=seed)
    return mechanism.release(method.reply(model), received, plan=plan, cfg=cfg), result


WIRE_STATE_KEY = "fedlora-wire-residual"


def _encode_reply(msg: Message, context: Context, cfg: RunConfig, method,
                  reply) -> ArrayRecord:
    """The reply in the run's wire format. With int8/int4 and error feedback, this node's
    rounding residual (kept in ``context.state``: it sees only the released values, so it
    is post-processing under DP) is added first and updated."""
    wire = WireFormat.from_config(cfg)
    server_round = int(msg.content[CONFIG_KEY].get("server-round", 0))
    who = context.node_config.get("partition-id", context.node_id)  # stable across runs
    rng = np.random.default_rng([cfg.seed, server_round, int(who) % 2**63, 0x317F])
    if not wire.feedback_for(method):
        return to_record(reply, wire, rng=rng)
    stored = context.state.get(WIRE_STATE_KEY)
    feedback = ErrorFeedback(from_record(stored) if stored is not None else None)
    record = to_record(reply, wire, feedback=feedback, rng=rng)
    context.state[WIRE_STATE_KEY] = to_record(feedback.state())
    return record


DIVERGED = ("training diverged: the update has non-finite values (nothing was sent; a "
            "lower learning-rate usually helps)")


def _reply(msg: Message, context: Context, cfg: RunConfig, method, reply, metrics: dict,
           respond=None) -> Message:
    if respond is not None:  # secure aggregation: the masked update alone, no metrics;
        # a non-finite entry goes as update 0 (a refusal in the clear would single out
        # this site's data), said in this site's log only
        personal = method.personal_keys(reply)
        if personal:
            context.state[PERSONAL_STATE_KEY] = to_record({k: reply[k] for k in personal})
        return respond(msg, context, cfg, reply)
    if not all(np.isfinite(np.asarray(v)).all() for v in reply.values()):
        # Said as a refusal, on every wire format (int8/int4 could not even encode it); under
        # DP the details stay here, as for any failure of private training.
        log.error("Not replying with the update: %s", DIVERGED)
        return Message(content=could_not_train(
            PRIVATE_FAILURE if cfg.dp_mode != "off" else DIVERGED), reply_to=msg)
    personal = method.personal_keys(reply)
    if personal:  # kept as released (under DP: the noised values), for the next round
        context.state[PERSONAL_STATE_KEY] = to_record({k: reply[k] for k in personal})
    if cfg.dp_mode != "off":  # under any DP mode: nothing about the data outside the guarantee
        metrics = privacy.released_metrics(metrics)
    content = RecordDict(
        {
            LORA_KEY: _encode_reply(msg, context, cfg, method, reply),
            METRICS_KEY: MetricRecord(metrics),
            STATUS_KEY: ConfigRecord({"status": "ok"}),
        }
    )
    return Message(content=content, reply_to=msg)


def evaluate_fn(msg: Message, context: Context) -> Message:
    """Evaluate the received adapter on this node's held-out examples (never under DP: the
    loss and accuracy on private data would leave the site un-noised)."""
    policy = _site_policy(context)
    if isinstance(policy, str):
        return Message(content=could_not_train(policy), reply_to=msg)
    if not policy.allows_plain_evaluation():
        log.warning("Not evaluating: this site's policy (node-config 'accept-dp-modes') "
                    "releases nothing un-noised about its data")
        return Message(content=could_not_train(
            "federated evaluation is off: this site's node-config 'accept-dp-modes' does not "
            "include 'off'"), reply_to=msg)
    cfg = runtime.resolve_config(context.run_config)
    if cfg.secure_aggregation:
        return Message(content=could_not_train(PLAIN_IN_SECURE_RUN), reply_to=msg)
    if cfg.dp_mode != "off":
        log.warning("Not evaluating: with dp-mode = '%s' this site releases nothing about its "
                    "data outside the privacy guarantee", cfg.dp_mode)
        return Message(content=could_not_train(
            f"federated evaluation is off under dp-mode = '{cfg.dp_mode}'"), reply_to=msg)
    t0 = time.perf_counter()
    try:
        cfg, _, model, data, _ = _setup(msg, context)
    except (DataError, FileNotFoundError, ValueError) as e:
        log.error("This site could not evaluate: %s", e)
        return Message(content=could_not_train(str(e)), reply_to=msg)
    t1 = time.perf_counter()
    res = evaluate(model, data.data, data.val_idx, batch_size=cfg.eval_batch_size)
    metrics = MetricRecord(
        {"num-examples": res.examples, "eval-loss": res.loss, "eval-accuracy": res.accuracy,
         "setup-seconds": t1 - t0, "eval-seconds": time.perf_counter() - t1}
    )
    content = RecordDict({METRICS_KEY: metrics, STATUS_KEY: ConfigRecord({"status": "ok"})})
    return Message(content=content, reply_to=msg)


def query_fn(msg: Message, context: Context) -> Message:
    """Answer the server's identity query (no model, no data is touched)."""
    return Message(content=identity_reply(context.node_config), reply_to=msg)


def build_app(
    overrides: Mapping[str, Any] | None = None, mods: list | None = None
) -> ClientApp:
    """A ClientApp; ``overrides`` are merged over the run-config (for in-process runs) and
    ``mods`` are Flower client mods (e.g. to inspect or alter messages in tests)."""
    client_app = ClientApp(mods=mods or [])

    @client_app.train()
    def _train(msg: Message, context: Context) -> Message:
        return train_fn(msg, with_overrides(context, overrides))

    @client_app.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        return evaluate_fn(msg, with_overrides(context, overrides))

    @client_app.query()
    def _query(msg: Message, context: Context) -> Message:
        return query_fn(msg, context)

    secure_aggregation.register(client_app, overrides, train_fn)
    return client_app


app = build_app()
