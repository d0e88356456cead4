"""A site's side of secure aggregation (``secure-aggregation = true``).

The server runs each training round as the six stages of SecAgg+ (:mod:`fedlora.secagg`),
one Flower train action each (:data:`fedlora.secure_sum.ACTIONS`). The stage that
carries the global adapter, ``train.secagg_masked_input``, is where the site trains: the
ClientApp's own training (``train_fn``: its site policy, its DP mechanism and ledger,
exactly as in a plain round), after which the site sends its update clipped, quantised
(:class:`fedlora.secure_sum.SecureSum`: on the ``int8``/``int4`` wire, that wire's integers)
and masked, in the smallest unsigned dtype that holds the round's modulus, and nothing else: no adapter, no
metrics, no example count. The other stages answer with protocol messages only.
At setup a site checks that the round's public parameters (degree, threshold, modulus,
round) are the ones the run-config implies for the cohort it names, and that it trains at
the global rank (a reply of another shape cannot be summed).

A ClientApp keeps nothing between messages and each may run in another process: the
site's secrets for the round (its keys, the shares it holds, its self-mask seed) live in
``context.state``, which stays on the node; each stage reads and writes it under the
node's round lock (:mod:`fedlora.app.client.round_lock`) and is taken once, in order, in
a file the node locks in a folder of its own (:mod:`fedlora.app.client.stage_claims`;
the masked input once per round), so that two stage messages
delivered at once cannot both advance it, even when each was handed its own copy of the
node state. A stage the site refuses (a malformed or
inconsistent request: :class:`~fedlora.secagg.ProtocolError`) is answered with a status
saying why; the site then refuses the round's later stages. Whether training went well is
not such a reason: a site whose update has non-finite entries, or whose training failed,
masks update 0 there (:func:`zero_update`) and stays in the sum, the details in its own
log only. A deployed site that relies on secure aggregation takes part only with pinned
identities (:meth:`fedlora.privacy.site_policy.SitePolicy.check_pinned`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedlora import distributed_dp, runtime
from fedlora.adapters import adapter_state
from fedlora.models import cached_lora_model
from fedlora.privacy.site_policy import PolicyRefusal, SitePolicy
from fedlora.privacy.skellam import check_share
from fedlora.protocol import CONFIG_KEY, LORA_KEY, STATUS_KEY, NodeInfo, with_overrides
from fedlora.secagg import ProtocolError, RoundConfig, SecAggClient, encode
from fedlora.secagg.floor import Floor
from fedlora.secagg.identity import load_identity, load_peers
from fedlora.secagg.state import dump_client, flatten, load_client, unflatten
from fedlora.secure_sum import (
    ACTIONS,
    SecureSum,
    from_records,
    resolve_graph,
    to_records,
)
from fedlora.wire import from_record

from .round_lock import round_lock
from .stage_claims import take

__all__ = ["STATE_KEY", "check_round", "masked_reply", "ready_to_train", "register",
           "stage_fn", "zero_update"]

log = logging.getLogger("fedlora.client")

STATE_KEY = "fedlora-secagg"  # this node's protocol state for the current round
SEEN_KEY = "fedlora-secagg-seen"  # the last round this node set up (rounds only go forward)
ZERO_KEY = "fedlora-secagg-zero-update"  # a reply standing for no update (its noise's sigma)


def zero_update(sigma: float = 0.0) -> dict[str, np.ndarray]:
    """The reply of a site whose training failed: it sends update 0, masked as any other
    (in a distributed DP round with its noise share of ``sigma``), so that whether a site
    trained never shows in the clear."""
    return {ZERO_KEY: np.asarray([sigma], np.float64)}


def _finite(reply: Mapping[str, Any], received: Mapping[str, np.ndarray], cfg,
            server_round: int) -> dict[str, Any]:
    """What a site masks: ``reply`` with every non-finite entry replaced by the received
    one (update 0 there; in a distributed DP vector, 0), or update 0 throughout for
    :func:`zero_update`. That an update was not finite is said in the site's own log only:
    a refusal in the clear would tell the server something about this site's data."""
    if ZERO_KEY in reply:
        sigma = float(np.asarray(reply[ZERO_KEY]).ravel()[0])
        release = distributed_dp.release_for(cfg, runtime.method_for(cfg).payload(received),
                                             server_round)
        if release is not None:
            return {distributed_dp.VECTOR_KEY: np.zeros(release.spec.length, np.int64),
                    distributed_dp.SIGMA_KEY: np.asarray([sigma])}
        return {k: np.asarray(received[k]) for k, _ in SecureSum.from_config(cfg).layout(received)}
    out = dict(reply)
    for key, value in reply.items():
        value = np.asarray(value)
        finite = np.isfinite(value.astype(np.float64))
        if key == distributed_dp.SIGMA_KEY or finite.all():
            continue
        log.error("Secure aggregation: %d non-finite entries of %s sent as update 0 (the "
                  "sum keeps this site; nothing of this goes to the server)",
                  int((~finite).sum()), key)
        fill = 0 if key == distributed_dp.VECTOR_KEY or key not in received else received[key]
        out[key] = np.where(finite, value, fill)
    return out


def _own_settings(context: Context) -> dict[str, Any]:
    """This site's long-term identity and its peers' (node-config ``secagg-identity`` and
    ``secagg-peers``, :mod:`fedlora.secagg.identity`) and its floor on the cohort and the
    threshold (``secagg-min-cohort``, ``secagg-min-threshold``), all read from its
    node-config at every stage; ``ProtocolError`` naming the key for a bad value."""
    identity, peers = (context.node_config.get(k) for k in ("secagg-identity", "secagg-peers"))
    try:
        policy = SitePolicy.from_node_config(context.node_config)
        policy.check_pinned()
        return {"identity": load_identity(identity) if identity else None,
                "trusted": load_peers(peers) if peers else None,
                "floor": Floor(policy.secagg_min_cohort or 2, policy.secagg_min_threshold or 1,
                               cohort_key="node-config key 'secagg-min-cohort'",
                               threshold_key="node-config key 'secagg-min-threshold'")}
    except ValueError as e:  # (PolicyRefusal is one)
        raise ProtocolError(str(e)) from None


def _load(context: Context) -> SecAggClient:
    stored = context.state.get(STATE_KEY)
    if stored is None:
        raise ProtocolError("this node holds no secure aggregation round (no setup seen)")
    if "done-round" in stored:
        raise ProtocolError(f"this node finished round {stored['done-round']}: it is not "
                            "ready for any stage without a new setup")
    return load_client(unflatten(dict(stored)), **_own_settings(context))


def _save(context: Context, client: SecAggClient) -> None:
    """Keep the round's state on the node; a finished round keeps only that it finished
    (its secrets, the self-mask seed and the shares it held, are dropped)."""
    if client.stage == "done":
        context.state[STATE_KEY] = ConfigRecord({"done-round": int(client.config.round_id)})
        return
    context.state[STATE_KEY] = ConfigRecord(flatten(dump_client(client)))


def _refuse(msg: Message, reason: str) -> Message:
    log.error("Secure aggregation: this site refuses the stage: %s", reason)
    return Message(content=RecordDict({STATUS_KEY: ConfigRecord(
        {"status": "could-not-train", "reason": f"secure aggregation: {reason}"[:2000]})}),
        reply_to=msg)


def _answer(msg: Message, body: Mapping[str, Any], bits: int | None = None) -> Message:
    content = RecordDict({**to_records(body, bits), STATUS_KEY: ConfigRecord({"status": "ok"})})
    return Message(content=content, reply_to=msg)


def check_round(body: Mapping[str, Any], msg: Message, context: Context) -> None:
    """The round config must be the one the run-config implies for its cohort (degree,
    threshold, modulus) and name the round of the message: ``ProtocolError`` otherwise."""
    cfg = runtime.resolve_config(context.run_config)
    config = RoundConfig.from_message(body)
    n = len(config.cohort)
    degree, threshold = resolve_graph(cfg, n)
    server_round = int(msg.content[CONFIG_KEY].get("server-round", -1))
    bits, round_context = SecureSum.from_config(cfg).bits(n), b""
    # This site's own tensors, not the server's word for them (said before any budget is spent)
    release = (distributed_dp.release_for(cfg, _own_payload(cfg, context), server_round)
               if distributed_dp.is_distributed_round(cfg, server_round) else None)
    if release is not None:
        if n < distributed_dp.min_honest(cfg, n):
            raise ProtocolError(f"a cohort of {n} cannot hold dp-min-honest = "
                                f"{cfg.dp_min_honest:g} contributors")
        try:
            t = distributed_dp.share_divisor(cfg, n)
        except ValueError as e:
            raise ProtocolError(str(e)) from None
        spec = release.spec
        if config.length != spec.length:
            raise ProtocolError(f"the round sums {config.length} entries; this site's "
                                f"{release.kind} makes {spec.length}")
        try:  # a share numpy draws exactly (a function of the run-config alone)
            check_share(spec.variance(release.sigma), t)
        except ValueError as e:
            raise ProtocolError(str(e)) from None
        own = spec.gaussian_equivalent(spec.variance(release.sigma) / t)  # its share alone
        try:  # the site's own floors on its share of the noise
            SitePolicy.from_node_config(context.node_config).check_noise_share(t, own)
        except PolicyRefusal as e:
            raise ProtocolError(str(e)) from None
        bits = distributed_dp.round_bits(cfg, release, n)
        round_context = distributed_dp.round_context(cfg, release, n)
    expected = {"round_id": server_round, "degree": degree, "threshold": threshold,
                "bits": bits, "context": round_context}
    wrong = {k: v for k, v in expected.items() if getattr(config, k) != v}
    if not cfg.secure_aggregation or wrong:
        raise ProtocolError(f"the round config does not follow the run-config: expected "
                            f"{wrong or 'secure-aggregation = true'}")
    rank = NodeInfo.from_node_config(context.node_config, cfg).lora_rank
    if rank not in (None, cfg.lora_rank):  # said before training: no budget spent on it
        raise ProtocolError(f"this site trains at lora-rank {rank} (its node-config), and a "
                            f"secure sum needs every site at the global rank {cfg.lora_rank}")


def _own_payload(cfg, context: Context) -> dict[str, Any]:
    """The tensors this site's model sends (its shapes: the adapter as built locally)."""
    rank = NodeInfo.from_node_config(context.node_config, cfg).lora_rank
    model = cached_lora_model(runtime.model_spec(cfg, rank=rank))
    return runtime.method_for(cfg).payload(adapter_state(model))


def stage_fn(stage: str, msg: Message, context: Context) -> Message:
    """One protocol stage other than the masked input, under the node's round lock."""
    with round_lock(context):
        return _stage(stage, msg, context)


def _stage(stage: str, msg: Message, context: Context) -> Message:
    client = None
    try:
        body = from_records(msg.content)
        if stage == "setup":
            check_round(body, msg, context)
            config = RoundConfig.from_message(body)
            seen = context.state.get(SEEN_KEY)
            if seen is not None and config.round_id <= int(seen["round"]):
                raise ProtocolError(f"round {config.round_id} was set up here already "
                                    f"(last: {int(seen['round'])}): a round runs once")
            take(context, config.digest, stage)
            context.state[SEEN_KEY] = ConfigRecord({"round": config.round_id})
            loaded = SecAggClient(int(context.node_id), **_own_settings(context))
        else:
            loaded = _load(context)
            if loaded.stage == stage:  # (any other stage is refused by the client itself)
                take(context, loaded.config.digest, stage)
        client = loaded
        if stage == "consistency":
            try:
                check_contributors(body, client, context)
            except ProtocolError:
                client.abort()  # and every later stage of the round
                raise
        out = getattr(client, stage)(body)
    except (ProtocolError, ValueError, KeyError) as e:
        if client is not None:
            _save(context, client)  # a client that refused refuses every later stage
        return _refuse(msg, str(e))
    _save(context, client)
    return _answer(msg, out)


def check_contributors(body: Mapping[str, Any], client: SecAggClient,
                       context: Context) -> None:
    """In a distributed DP round, ``ProtocolError`` (this site reveals nothing) unless the
    sum holds at least the cohort less ``dp-max-dropouts`` sites: the server decides who
    counts as dropped, and with more missing (every one perhaps an honest site) the honest
    noise shares would not make up the planned noise."""
    cfg = runtime.resolve_config(context.run_config)
    if not distributed_dp.is_distributed_round(cfg, client.config.round_id):
        return
    need = distributed_dp.min_contributors(cfg, len(client.config.cohort))
    u3 = body.get("u3")
    cohort = set(client.config.cohort)
    if not isinstance(u3, (list, tuple)) or len(set(u3) & cohort) < need:
        raise ProtocolError(f"fewer than {need} sites in the sum (the cohort less "
                            f"dp-max-dropouts = {cfg.dp_max_dropouts:g}): the honest noise "
                            "shares in it would not make up the planned noise "
                            f"(dp-min-honest = {cfg.dp_min_honest:g})")
    if client.trusted is not None:  # only parties this site pinned count: its neighbours
        verified = len(set(u3) & set(client.neighbours)) + 1
        if verified < need:
            raise ProtocolError(f"only {verified} pinned sites (this one included) in the "
                                f"sum, fewer than the {need} it needs (dp-min-honest, "
                                "dp-max-dropouts)")


def ready_to_train(msg: Message, context: Context) -> None:
    """``ProtocolError`` unless this node is in this round, at the masked-input stage, with
    a U2 it accepts (its floor included): checked before it trains, so that no training (no
    privacy budget) goes to a stage it would refuse."""
    with round_lock(context):
        _ready(msg, context)


def _ready(msg: Message, context: Context) -> None:
    client = _load(context)
    server_round = int(msg.content[CONFIG_KEY].get("server-round", -1))
    if client.stage != "masked_input" or client.config.round_id != server_round:
        raise ProtocolError(f"this node is at stage {client.stage!r} of round "
                            f"{client.config.round_id}, not ready for the masked input of "
                            f"round {server_round}")
    try:
        client.check_u2(from_records(msg.content))
    except (ProtocolError, ValueError, KeyError):
        client.abort()  # a U2 under the site's floor (or malformed): the round ends here
        _save(context, client)
        raise
    take(context, client.config.digest, "masked_input")  # once, whatever copy of the state


def masked_reply(msg: Message, context: Context, cfg, reply: Mapping[str, Any]) -> Message:
    """What a site that trained sends: its update, quantised and masked (the ``respond``
    of the ClientApp's training), under the node's round lock."""
    with round_lock(context):
        return _masked(msg, context, cfg, reply)


def _masked(msg: Message, context: Context, cfg, reply: Mapping[str, Any]) -> Message:
    client = None
    try:
        client = _load(context)
        received = from_record(msg.content[LORA_KEY])
        reply = _finite(reply, received, cfg, client.config.round_id)
        release = distributed_dp.release_for(cfg, runtime.method_for(cfg).payload(received),
                                             client.config.round_id)
        if (release is None) != (distributed_dp.VECTOR_KEY not in reply):
            raise ProtocolError("a distributed DP round masks the site's noised vector, and "
                                "only such a round")
        if release is not None:  # its noise share, then the ring
            sigma = float(np.asarray(reply[distributed_dp.SIGMA_KEY]).ravel()[0])
            if sigma != release.sigma:  # what it charged is what the round binds
                raise ProtocolError("the plan's noise multiplier is not the round's")
            vector = encode(distributed_dp.noised(
                reply[distributed_dp.VECTOR_KEY], sigma=sigma,
                cohort=len(client.config.cohort), cfg=cfg, spec=release.spec,
                bits=client.config.bits), client.config.bits)
        else:
            vector = SecureSum.from_config(cfg).quantise(reply, received, client.config.bits)
        out = client.masked_input(from_records(msg.content), vector)
    except (ProtocolError, ValueError, KeyError) as e:
        if client is not None:
            _save(context, client)
        return _refuse(msg, str(e))
    _save(context, client)
    return _answer(msg, out, client.config.bits)


def register(app: ClientApp, overrides: Mapping[str, Any] | None,
             train_fn: Callable[..., Message]) -> None:
    """Register the stages on ``app``; ``train_fn(msg, context, respond)`` trains."""

    def handler(stage: str) -> Callable[[Message, Context], Message]:
        def run(msg: Message, context: Context) -> Message:
            context = with_overrides(context, overrides)
            if stage == "masked_input":  # one lock from the check to the masked reply
                with round_lock(context):
                    try:
                        ready_to_train(msg, context)
                    except (ProtocolError, ValueError, KeyError) as e:
                        return _refuse(msg, str(e))
                    return train_fn(msg, context, masked_reply)
            return stage_fn(stage, msg, context)

        return run

    for stage, action in ACTIONS.items():
        app.train(action)(handler(stage))
