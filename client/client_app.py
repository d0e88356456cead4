"""fedlora ClientApp: trains the LoRA adapter on the data where it lives.

Thin glue over :mod:`fedlora`: the frozen base model comes from a per-process cache,
the received adapter tensors are loaded into it, training runs locally and only the
adapter tensors (LoRA factors, plus the head when ``train-head`` is on) are sent back.
A site that cannot train (missing or bad data) replies with the reason instead of
crashing the run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedlora import dp, runtime
from fedlora.data import DataError
from fedlora.models import cached_lora_model
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
from fedlora.privacy import PrivacyStateError
from fedlora.training import evaluate, train, train_private
from fedlora.wire import from_record, to_record

log = logging.getLogger("fedlora.client")

def _setup(msg: Message, context: Context):
    cfg = runtime.resolve_config(context.run_config)
    runtime.set_threads_once(cfg.client_num_threads)
    node = NodeInfo.from_node_config(context.node_config, cfg)
    spec = runtime.model_spec(cfg, rank=node.lora_rank)
    model = cached_lora_model(spec)
    method = runtime.method_for(cfg)
    method.load(model, from_record(msg.content[LORA_KEY]), client_rank=spec.rank)
    data = runtime.client_data(
        cfg,
        partition_id=node.partition_id,
        num_partitions=node.num_partitions,
        data_path=node.data_path,
    )
    return cfg, node, model, data, method


PRIVACY_STATE_KEY = "fedlora-privacy"


def _ledger(cfg, node: NodeInfo, context: Context, num_examples: int) -> dp.Ledger | None:
    plan = dp.plan_for(cfg, num_examples)
    if plan is None:
        return None
    stored = context.state.get(PRIVACY_STATE_KEY)
    return dp.Ledger(plan, path=node.privacy_state_path,
                     state=dict(stored) if stored is not None else None)


class SimulatedFailure(RuntimeError):
    """A failure injected by ``dropout-fraction`` (simulation of a crashing site)."""


def simulated_fate(cfg, server_round: int, partition_id: int | None) -> str:
    """``"drop"``, ``"straggle"`` or ``"ok"`` for this client in this round.

    Drawn from (seed, round, partition): reproducible, independent across rounds, and the
    same whichever worker process serves the client.
    """
    if cfg.dropout_fraction <= 0 and cfg.straggler_fraction <= 0:
        return "ok"
    u = np.random.default_rng([cfg.seed, server_round, partition_id or 0, 0x5EED]).random()
    if u < cfg.dropout_fraction:
        return "drop"
    if u < cfg.dropout_fraction + cfg.straggler_fraction:
        return "straggle"
    return "ok"


def _simulate_failure(cfg, server_round: int, partition_id: int | None) -> None:
    """Fail or straggle as ``dropout-fraction`` / ``straggler-fraction`` ask (simulation)."""
    fate = simulated_fate(cfg, server_round, partition_id)
    if fate == "drop":
        raise SimulatedFailure(f"simulated failure of partition {partition_id} in round "
                               f"{server_round} (dropout-fraction {cfg.dropout_fraction})")
    if fate == "straggle":
        log.info("Straggling: replying %.1f s late (straggler-fraction)", cfg.straggler_delay)
        time.sleep(cfg.straggler_delay)


def train_fn(msg: Message, context: Context) -> Message:
    """Train the received adapter on this node's data and send the adapter back."""
    t0 = time.perf_counter()
    try:
        cfg, node, model, data, method = _setup(msg, context)
        ledger = _ledger(cfg, node, context, data.num_train)
    except (DataError, FileNotFoundError, ValueError, PrivacyStateError) as e:
        log.error("This site could not train: %s", e)
        return Message(content=could_not_train(str(e)), reply_to=msg)
    server_round = int(msg.content[CONFIG_KEY].get("server-round", 0))
    _simulate_failure(cfg, server_round, node.partition_id)
    resumed_after = int(msg.content[CONFIG_KEY].get("resumed-after", 0))
    if (ledger is not None and ledger.fresh and resumed_after > 0
            and node.privacy_state_path is None):
        log.warning("The run resumed after round %d and this client's privacy ledger did not "
                    "survive the restart (no privacy-state-path): charging those %d rounds as "
                    "if it trained in every one", resumed_after, resumed_after)
        ledger.charge_missed_rounds(resumed_after)
    if ledger is not None:
        try:
            ledger.check()
        except dp.BudgetExhausted as e:
            log.warning("Not training this round: %s", e)
            return Message(content=could_not_train(str(e), STATUS_BUDGET_EXHAUSTED,
                                                   {"dp-" + k: v for k, v in ledger.metrics().items()
                                                    if not isinstance(v, str)}),
                           reply_to=msg)
    seed = cfg.seed * 1_000_003 + server_round * 7919 + (node.partition_id or 0)
    received = method.reply(model)  # the starting point, as it would be sent back
    common = dict(batch_size=cfg.batch_size, learning_rate=cfg.learning_rate,
                  weight_decay=cfg.weight_decay, seed=seed, optimizer=cfg.optimizer)
    if ledger is not None and ledger.plan.mode == "sample":
        result = train_private(model, data.data, data.train_idx, steps=ledger.plan.steps,
                               noise_multiplier=ledger.plan.noise_multiplier,
                               max_grad_norm=cfg.max_grad_norm, **common)
    else:
        result = train(model, data.data, data.train_idx, steps=cfg.local_steps,
                       epochs=cfg.local_epochs, **common)
    reply = method.reply(model)
    metrics: dict = {
        "num-examples": data.num_train,
        "train-loss": result.loss,
        "train-steps": result.steps,
    }
    if ledger is not None:
        if ledger.plan.mode == "update":
            reply, norm = dp.privatize_reply(reply, received, max_norm=cfg.update_max_norm,
                                             noise_multiplier=ledger.plan.noise_multiplier,
                                             seed=seed + 17)
            metrics["update-norm"] = norm
        ledger.spend()  # persisted before anything leaves the site
        context.state[PRIVACY_STATE_KEY] = ConfigRecord(ledger.record())
        metrics.update({"dp-" + k: v for k, v in ledger.metrics().items()})
    metrics["train-seconds"] = time.perf_counter() - t0
    content = RecordDict(
        {
            LORA_KEY: to_record(reply, cfg.wire_dtype),
            METRICS_KEY: MetricRecord(metrics),
            STATUS_KEY: ConfigRecord({"status": "ok"}),
        }
    )
    return Message(content=content, reply_to=msg)


def evaluate_fn(msg: Message, context: Context) -> Message:
    """Evaluate the received adapter on this node's held-out examples."""
    try:
        cfg, _, model, data, _ = _setup(msg, context)
    except (DataError, FileNotFoundError, ValueError) as e:
        log.error("This site could not evaluate: %s", e)
        return Message(content=could_not_train(str(e)), reply_to=msg)
    res = evaluate(model, data.data, data.val_idx, batch_size=cfg.eval_batch_size)
    metrics = MetricRecord(
        {"num-examples": res.examples, "eval-loss": res.loss, "eval-accuracy": res.accuracy}
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

    return client_app


app = build_app()
