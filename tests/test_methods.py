"""Federated methods around the aggregators: payloads, client loading, reply checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fedlora.adapters import FACTOR_A, FACTOR_B, adapter_state, load_adapter_state
from fedlora.aggregation import ReplyShapeError, get_method, refit_state, state_rank
from fedlora.models import LoraSpec, build_lora_model

from .test_simulation import run_in_process


def _spec(path, rank=4, **kw):
    base = dict(model_path=str(path), num_labels=2, rank=rank, alpha=8.0, dropout=0.0,
                target_modules=("query", "value"), train_head=True)
    base.update(kw)
    return LoraSpec(**base)


def _randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n or "modules_to_save" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _logits(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = {"input_ids": torch.randint(0, 1000, (4, 9), generator=g),
         "attention_mask": torch.ones(4, 9, dtype=torch.long)}
    model.eval()
    with torch.no_grad():
        return model(**x).logits


def _delta(state, module, scale):
    return scale * state[module + FACTOR_B].astype(np.float64) @ state[module + FACTOR_A]


def test_refit_keeps_the_update_when_padding_and_truncates_in_order(tiny_model_dir):
    model = build_lora_model(_spec(tiny_model_dir, rank=4))
    _randomise(model, 1)
    state = adapter_state(model)
    module = next(k[: -len(FACTOR_A)] for k in state if k.endswith(FACTOR_A))
    padded = refit_state(state, rank=8, from_scale=2.0, to_scale=1.0)
    assert state_rank(padded) == 8
    np.testing.assert_allclose(_delta(padded, module, 1.0), _delta(state, module, 2.0), atol=1e-6)
    cut = refit_state(state, rank=2, from_scale=2.0, to_scale=4.0)
    assert cut[module + FACTOR_A].shape[0] == 2
    np.testing.assert_allclose(cut[module + FACTOR_A], state[module + FACTOR_A][:2])


def test_same_seed_gives_the_same_initialisation(tiny_model_dir):
    a = adapter_state(build_lora_model(_spec(tiny_model_dir, init_seed=3)))
    b = adapter_state(build_lora_model(_spec(tiny_model_dir, init_seed=3)))
    c = adapter_state(build_lora_model(_spec(tiny_model_dir, init_seed=4)))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not all(np.array_equal(a[k], c[k]) for k in a)


def test_ffa_never_sends_a_and_trains_only_b(tiny_model_dir):
    method = get_method("ffa", alpha=8.0, rank=4)
    model = build_lora_model(_spec(tiny_model_dir, freeze_a=True))
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".lora_A." in n)
    state = adapter_state(model)
    payload = method.payload(state)
    assert payload and not any(k.endswith(FACTOR_A) for k in payload)
    reply = method.reply(model)
    assert not any(k.endswith(FACTOR_A) for k in reply)
    method.check_reply(reply, state)
    with pytest.raises(ReplyShapeError, match="unexpected"):
        method.check_reply(state, state)  # a reply that sends A is refused
    with pytest.raises(ReplyShapeError, match="global rank"):
        method.load(model, payload, client_rank=2)


def test_ffa_aggregate_is_exact(tiny_model_dir):
    method = get_method("ffa", alpha=8.0, rank=4)
    global_state = adapter_state(build_lora_model(_spec(tiny_model_dir, freeze_a=True)))
    rng = np.random.default_rng(0)
    replies = [{k: rng.normal(size=v.shape).astype(np.float32)
                for k, v in global_state.items() if not k.endswith(FACTOR_A)} for _ in range(3)]
    weights = [10, 30, 60]
    out = method.aggregate(replies, weights, global_state)
    module = next(k[: -len(FACTOR_A)] for k in global_state if k.endswith(FACTOR_A))
    p = np.asarray(weights) / 100
    exact = sum(pk * _delta({**global_state, **r}, module, 2.0) for pk, r in zip(p, replies))
    np.testing.assert_allclose(_delta(out, module, 2.0), exact, rtol=1e-5, atol=1e-6)


def test_svd_aggregate_is_the_exact_sum_when_rank_allows(tiny_model_dir):
    # Two rank-2 clients: the exact sum has rank <= 4 = the global rank, so svd is exact
    # while fedavg is not.
    template = adapter_state(build_lora_model(_spec(tiny_model_dir, rank=4)))
    rng = np.random.default_rng(1)
    def client():
        s = refit_state(template, rank=2, from_scale=2.0, to_scale=4.0)
        return {k: rng.normal(size=v.shape).astype(np.float32) for k, v in s.items()}
    replies, weights = [client(), client()], [1, 3]
    module = next(k[: -len(FACTOR_A)] for k in template if k.endswith(FACTOR_A))
    exact = 0.25 * _delta(replies[0], module, 4.0) + 0.75 * _delta(replies[1], module, 4.0)
    for name in ("svd", "fedavg"):
        method = get_method(name, alpha=8.0, rank=4)
        for r in replies:
            assert method.check_reply(r, template) == 2
        out = method.aggregate(replies, weights, template)
        assert state_rank(out) == 4
        err = np.linalg.norm(_delta(out, module, 2.0) - exact) / np.linalg.norm(exact)
        if name == "svd":
            assert err < 1e-5
        else:
            assert err > 1e-2


def test_stack_fold_equals_a_peft_adapter_of_the_stacked_factors(tiny_model_dir):
    method = get_method("stack", alpha=8.0, rank=4)
    template = adapter_state(build_lora_model(_spec(tiny_model_dir)))
    rng = np.random.default_rng(2)
    replies = [{k: (rng.normal(size=v.shape) * 0.2).astype(np.float32) for k, v in template.items()}
               for _ in range(3)]
    global_state = method.aggregate(replies, [1, 1, 2], template)
    global_state = method.aggregate(replies[:2], [1, 1], global_state)  # two rounds stacked
    payload = method.payload(global_state)
    assert state_rank(payload) == 3 * 4 + 2 * 4
    folded = build_lora_model(_spec(tiny_model_dir))
    method.load(folded, payload, client_rank=4)
    rank, alpha, exported = method.export(global_state)
    reference = build_lora_model(_spec(tiny_model_dir, rank=rank, alpha=alpha))
    load_adapter_state(reference, exported)
    torch.testing.assert_close(_logits(folded), _logits(reference), rtol=1e-4, atol=1e-5)
    # The client's own adapter restarts from the fresh initialisation (B = 0).
    assert all(not v.any() for k, v in adapter_state(folded).items() if k.endswith(FACTOR_B))


def test_reply_checks_name_the_problem(tiny_model_dir):
    method = get_method("fedavg", alpha=8.0, rank=4)
    template = adapter_state(build_lora_model(_spec(tiny_model_dir)))
    key_a = next(k for k in template if k.endswith(FACTOR_A))
    with pytest.raises(ReplyShapeError, match="shape"):
        method.check_reply({**template, key_a: np.zeros((4, 5), np.float32)}, template)
    with pytest.raises(ReplyShapeError, match=r"shape \(3, 32\), expected \(4, 32\)"):
        method.check_reply({**template, key_a: np.zeros((3, 32), np.float32)}, template)
    extra = {**template, "base_model.model.bert.embeddings.word_embeddings.weight": np.zeros(2)}
    with pytest.raises(ReplyShapeError, match="word_embeddings"):
        method.check_reply(extra, template)


@pytest.mark.slow
@pytest.mark.parametrize("aggregator,wire", [("fedavg", "int4"), ("svd", "int8"),
                                              ("ffa", "int4"), ("stack", "int8"),
                                              ("fedsa", "float16")])
def test_every_aggregator_runs_in_process(custom_task, aggregator, wire):
    """Each aggregator end to end, on a wire other than float32 (float32 is what every
    other run uses); stack's broadcast grows every round."""
    overrides = dict(custom_task, aggregator=aggregator, **{
        "run-name": aggregator, "fraction-evaluate": 0.0, "wire-dtype": wire,
        "wire-block-size": 16})
    run_dir = run_in_process(overrides, num_nodes=4)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [r.get("clients_accepted") for r in metrics["rounds"][1:]] == [2, 2]
    assert np.isfinite(metrics["rounds"][-1]["test_loss"])
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    comms = json.loads((run_dir / "comms.json").read_text())
    assert comms["measured_equals_analytic"]
    rows = (run_dir / "comms.csv").read_text().splitlines()
    header = rows[0].split(",")
    dtypes = {r.split(",")[header.index("wire_dtype")] for r in rows[1:]}
    directions = {r.split(",")[header.index("direction")] for r in rows[1:]}
    assert dtypes == {wire} and directions == {"up", "down"}


@pytest.mark.slow
@pytest.mark.parametrize("aggregator", ["fedavg", "svd", "stack"])
def test_heterogeneous_ranks(custom_task, aggregator):
    overrides = dict(custom_task, aggregator=aggregator, **{
        "run-name": f"het-{aggregator}", "fraction-train": 1.0, "fraction-evaluate": 0.0})
    run_dir = run_in_process(overrides, num_nodes=4, node_ranks=[2, 4, 8, 4])
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    assert [r["clients_accepted"] for r in rounds[1:]] == [4, 4]
    rows = (run_dir / "comms.csv").read_text().splitlines()[1:]
    up_sizes = {int(r.split(",")[4]) for r in rows if ",up,train," in r}
    assert len(up_sizes) == 3  # three ranks, three message sizes


@pytest.mark.slow
def test_ffa_refuses_a_site_with_another_rank(custom_task):
    overrides = dict(custom_task, aggregator="ffa", **{
        "run-name": "ffa-het", "fraction-train": 1.0, "fraction-evaluate": 0.0})
    run_dir = run_in_process(overrides, num_nodes=4, node_ranks=[4, 4, 4, 2])
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    assert [r["clients_accepted"] for r in rounds[1:]] == [3, 3]
    assert all("global rank" in r["refused"][0]["reason"] for r in rounds[1:])


@pytest.mark.slow
def test_svd_error_feedback_runs_in_process(custom_task):
    overrides = dict(custom_task, aggregator="svd", **{
        "svd-error-feedback": True, "run-name": "svd-ef", "fraction-train": 1.0,
        "fraction-evaluate": 0.0, "num-server-rounds": 3})
    run_dir = run_in_process(overrides, num_nodes=4, node_ranks=[4, 8])
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    assert [r["clients_accepted"] for r in rounds[1:]] == [4, 4, 4]


def test_svd_error_feedback_keeps_what_truncation_drops(tiny_model_dir):
    template = adapter_state(build_lora_model(_spec(tiny_model_dir, rank=2)))
    module = next(k[: -len(FACTOR_A)] for k in template if k.endswith(FACTOR_A))
    rng = np.random.default_rng(5)
    method = get_method("svd", alpha=4.0, rank=2, error_feedback=True)
    total_exact, total_sent = 0.0, 0.0
    for _ in range(3):
        replies = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in template.items()}
                   for _ in range(3)]
        total_exact = total_exact + sum(_delta(r, module, 2.0) for r in replies) / 3
        out = method.aggregate(replies, [1, 1, 1], template)
        total_sent = total_sent + _delta(out, module, 2.0)
    residual = method.feedback.residual(module)
    kept = np.asarray(residual.B, np.float64) @ np.asarray(residual.A) * residual.scale
    np.testing.assert_allclose(total_sent + kept, total_exact, rtol=1e-4, atol=1e-4)


def _fedsa_mod(path):
    """Writes, per training message: the partition, round, the keys broadcast, the digest of
    the B this client keeps before training and of the B it released."""
    import hashlib

    from fedlora.app.client.client_app import PERSONAL_STATE_KEY
    from fedlora.protocol import CONFIG_KEY, LORA_KEY
    from fedlora.wire import from_record

    def digest(state):
        h = hashlib.sha256()
        for k in sorted(state):
            if k.endswith(FACTOR_B):
                h.update(k.encode() + np.ascontiguousarray(state[k]).tobytes())
        return h.hexdigest()

    def mod(msg, context, call_next):
        kept = context.state.get(PERSONAL_STATE_KEY)
        reply = call_next(msg, context)
        if msg.metadata.message_type == "train":
            with open(path, "a") as f:
                f.write(json.dumps({
                    "partition": context.node_config["partition-id"],
                    "round": int(msg.content[CONFIG_KEY]["server-round"]),
                    "down": sorted(msg.content[LORA_KEY].keys()),
                    "kept": None if kept is None else digest(from_record(kept)),
                    "sent": digest(from_record(reply.content[LORA_KEY]))}) + "\n")
        return reply

    return mod


@pytest.mark.slow
def test_fedsa_shares_a_and_each_client_trains_its_own_b(custom_task, tmp_path):
    overrides = dict(custom_task, aggregator="fedsa", **{
        "run-name": "fedsa", "fraction-train": 1.0, "fraction-evaluate": 0.0,
        "num-server-rounds": 3})
    log = tmp_path / "fedsa.jsonl"
    run_dir = run_in_process(overrides, num_nodes=4, mods=[_fedsa_mod(str(log))])
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(rows) == 12
    for r in rows:  # the broadcast carries A and the head, never B
        assert r["down"] and not any(k.endswith(FACTOR_B) for k in r["down"])
        assert any(k.endswith(FACTOR_A) for k in r["down"])
    by = {(r["partition"], r["round"]): r for r in rows}
    for p in range(4):
        assert by[(p, 1)]["kept"] is None
        for rnd in (2, 3):  # each client starts from the B it released last round
            assert by[(p, rnd)]["kept"] == by[(p, rnd - 1)]["sent"]
    assert len({by[(p, 3)]["sent"] for p in range(4)}) == 4  # four personal Bs
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    assert [r["clients_accepted"] for r in rounds[1:]] == [4, 4, 4]
    # The exported adapter holds the averaged B the server evaluated with (not zeros).
    from safetensors.numpy import load_file

    exported = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert any(np.abs(v).max() > 0 for k, v in exported.items() if "lora_B" in k)
