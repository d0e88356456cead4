"""The DP mechanisms against an attacker who holds the run-config and every message.

The attacker knows ``seed`` and everything else in the run-config (as the server, every
site and anyone with ``config.json`` do), the message a site received, the site's
node-config, and even the site's data. Replaying the site's computation with all of
that must not reproduce what the site released: the difference must be the full noise.
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from fedlora import privacy, runtime
from fedlora.adapters import adapter_state
from fedlora.models import build_lora_model
from fedlora.protocol import CONFIG_KEY, LORA_KEY, METRICS_KEY, STATUS_KEY
from fedlora.runtime import parse_run_config
from fedlora.wire import from_record, to_record

from .conftest import assert_noise_std, write_reviews


def _train_message(run_config: dict, server_round: int = 1) -> Message:
    """The message the server sends: the global adapter (the method's payload) and config."""
    cfg = runtime.resolve_config(run_config)
    state = adapter_state(build_lora_model(runtime.model_spec(cfg)))
    payload = runtime.method_for(cfg).payload(state)
    return Message(content=RecordDict({
        LORA_KEY: to_record(payload, cfg.wire_dtype),
        CONFIG_KEY: ConfigRecord({"server-round": server_round, "resumed-after": 0})}),
        message_type=MessageType.TRAIN, dst_node_id=1)


def _run_site(run_config: dict, node_config: dict, msg: Message) -> Message:
    from fedlora.app.client.client_app import train_fn

    context = Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(),
                      run_config=run_config)
    return train_fn(msg, context)


def _released(reply: Message) -> dict[str, np.ndarray]:
    assert reply.content[STATUS_KEY]["status"] == "ok", reply.content[STATUS_KEY]
    return from_record(reply.content[LORA_KEY])


def _update_noise_std(run_config: dict) -> float:
    """The per-entry noise std an ``update``-mode site adds (its plan needs no count)."""
    cfg = parse_run_config(run_config)
    return privacy.update_noise_std(noise_multiplier=privacy.plan_for(cfg, 100).noise_multiplier,
                                    max_norm=cfg.update_max_norm)


def _diff(a: dict, b: dict) -> np.ndarray:
    return np.concatenate([(a[k].astype(np.float64) - b[k]).ravel() for k in sorted(a)])


def _node_configs(tmp_path: Path, run_config: dict) -> list[dict]:
    """Two sites with equal data: simulated (same partition) or deployed (same file)."""
    return [{"data-path": run_config["data-path"], "accept-dp-modes": "sample,update",
             "privacy-state-path": str(tmp_path / f"site{i}" / "privacy.json")} for i in (0, 1)]


@pytest.mark.parametrize("deployed", [False, True], ids=["simulated", "deployed"])
def test_update_noise_cannot_be_replayed_or_cancelled(identity, site, tmp_path, deployed):
    run_config = dict(site, **{"dp-mode": "update"})
    msg = _train_message(run_config)
    nodes = _node_configs(tmp_path, run_config) if deployed else \
        [{"partition-id": 0, "num-partitions": 2}] * 2
    received = from_record(msg.content[LORA_KEY])
    observed = _released(_run_site(run_config, nodes[0], msg))
    # The attacker replays the site with the same run-config, message and data (deployed:
    # a second site with equal data, whose reply the server subtracts from the first).
    replay = _released(_run_site(run_config, nodes[1], msg))
    std = _update_noise_std(run_config)
    residual = _diff(observed, replay)  # = noise_1 - noise_2 if the updates are equal
    assert_noise_std(residual, math.sqrt(2) * std)
    # Subtracting what was received leaves clip(update) + noise: far longer than C.
    assert np.linalg.norm(_diff(observed, received)) > 50 * run_config["update-max-norm"]


@pytest.mark.parametrize("deployed", [False, True], ids=["simulated", "deployed"])
def test_dp_sgd_noise_and_sampling_cannot_be_replayed(identity, site, tmp_path, deployed):
    run_config = dict(site, **{"dp-mode": "sample", "optimizer": "sgd", "learning-rate": 0.5,
                               "dp-recipe": "none"})  # LoRA DP-SGD in round 1
    msg = _train_message(run_config)
    nodes = _node_configs(tmp_path, run_config) if deployed else \
        [{"partition-id": 0, "num-partitions": 2}] * 2
    observed = _released(_run_site(run_config, nodes[0], msg))
    replay = _released(_run_site(run_config, nodes[1], msg))
    for k in observed:
        assert not np.array_equal(observed[k], replay[k]), k


def test_user_level_release_cannot_be_replayed(site):
    from fedlora.aggregation import get_method

    cfg = parse_run_config(dict(site, **{"dp-mode": "client", "fraction-train": 0.5}))
    method = get_method("fedavg", alpha=8.0, rank=4)
    rng = np.random.default_rng(0)
    g = {"m.lora_A.weight": rng.normal(size=(4, 64)).astype(np.float32),
         "m.lora_B.weight": rng.normal(size=(64, 4)).astype(np.float32)}
    replies = [{k: (v + 0.01 * rng.normal(size=v.shape)).astype(np.float32) for k, v in g.items()}
               for _ in range(3)]

    def release():
        central = privacy.server_hook(cfg)
        central.start_round(1, num_nodes=40)
        return central, central.release(1, g, replies, method)

    central, released = release()
    _, replayed = release()  # everything the attacker knows, the replies included
    clipped = privacy.user_level.clip_and_sum(
        [{k: r[k].astype(np.float64) - g[k] for k in g} for r in replies], g,
        clip=central.clip)
    # W (G[r+1] - G[r]) - (what a replay gives) is still the whole noise, of std sigma C.
    residual = central.denominator * _diff(released, replayed)
    assert_noise_std(residual, math.sqrt(2) * central.noise_multiplier * central.clip)
    noise = central.denominator * _diff(released, g) - np.concatenate(
        [clipped[k].ravel() for k in sorted(g)])
    assert_noise_std(noise, central.noise_multiplier * central.clip)
    # The node sampling's coins are not the run's seed either.
    picks = {tuple(central.sample(list(range(40)))) for _ in range(5)}
    assert len(picks) > 1


def test_update_noise_is_calibrated_for_sensitivity_2c_by_independent_accounting():
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    def eps(noise_multiplier: float, rounds: int) -> float:
        acc = RdpAccountant()
        acc.compose(dp_accounting.SelfComposedDpEvent(
            dp_accounting.GaussianDpEvent(noise_multiplier), rounds))
        return acc.get_epsilon(1e-5)

    for target in (1.0, 8.0):
        cfg = parse_run_config({"dp-mode": "update", "target-epsilon": target,
                                "num-server-rounds": 8, "update-max-norm": 0.5})
        plan = privacy.plan_for(cfg, 10_000)
        std = privacy.update_noise_std(noise_multiplier=plan.noise_multiplier, max_norm=0.5)
        # dp_accounting's Gaussian mechanism: noise std / sensitivity, sensitivity 2C.
        assert 0.97 * target <= eps(std / (2 * 0.5), 8) <= target * 1.001
        # Calibrated for sensitivity C instead, the same std would spend far more.
        assert eps(std / (2 * 0.5) / 2, 8) > 1.8 * target
        # And the noise actually added has that std.
        zeros = {"a": np.zeros((400, 100), np.float32)}
        out = privacy.privatize_reply(zeros, zeros, max_norm=0.5,
                                      noise_multiplier=plan.noise_multiplier)
        assert out["a"].std() == pytest.approx(std, rel=0.02)


def test_a_site_under_local_dp_sends_nothing_data_dependent_and_does_not_evaluate(
        identity, site):
    from fedlora.app.client.client_app import evaluate_fn

    for mode in ("sample", "update", "client"):
        run_config = dict(site, **{"dp-mode": mode})
        node = {"partition-id": 0, "num-partitions": 2}
        reply = _run_site(run_config, node, _train_message(run_config))
        sent = dict(reply.content[METRICS_KEY])
        assert set(sent) <= {"num-examples", "train-steps"} | {k for k in sent
                                                             if k.startswith("dp-")}, mode
        assert not {"train-loss", "train-seconds", "update-norm"} & set(sent), mode
        ev = Message(content=_train_message(run_config).content,
                     message_type=MessageType.EVALUATE, dst_node_id=1)
        context = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(),
                          run_config=run_config)
        answer = evaluate_fn(ev, context)
        assert answer.content[STATUS_KEY]["status"] != "ok"
        assert set(answer.content[METRICS_KEY]) == {"num-examples"}


def test_a_deployed_site_without_a_ledger_file_refuses_to_train(identity, site):
    run_config = dict(site, **{"dp-mode": "sample"})
    node = {"data-path": site["data-path"], "accept-dp-modes": "sample"}
    reply = _run_site(run_config, node, _train_message(run_config))
    assert reply.content[STATUS_KEY]["status"] == "could-not-train"
    assert "privacy-state-path" in reply.content[STATUS_KEY]["reason"]
    assert LORA_KEY not in reply.content


def test_a_second_process_cannot_spend_a_held_ledger(identity, site, tmp_path):
    path = tmp_path / "site" / "privacy.json"
    held, release = tmp_path / "held", tmp_path / "release"
    holder = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from fedlora import privacy
        from fedlora.runtime import parse_run_config
        plan = privacy.plan_for(parse_run_config({{"dp-mode": "sample", "dp-recipe": "none",
                                                  "target-delta": 1e-3}}), 120)
        with privacy.Ledger(plan, path={str(path)!r}, state=None).session() as ledger:
            ledger.check()
            Path({str(held)!r}).touch()
            while not Path({str(release)!r}).exists():
                time.sleep(0.05)
            ledger.spend()
    """)
    proc = subprocess.Popen([sys.executable, "-c", holder], cwd=Path(__file__).parents[1])
    try:
        for _ in range(3600):  # (a busy machine may take a while to import fedlora)
            if held.exists() or proc.poll() is not None:
                break
            import time
            time.sleep(0.05)
        assert held.exists(), "the first process did not get the ledger"
        run_config = dict(site, **{"dp-mode": "sample", "dp-recipe": "none"})
        node = {"data-path": site["data-path"], "privacy-state-path": str(path),
                "accept-dp-modes": "sample"}
        reply = _run_site(run_config, node, _train_message(run_config))
        assert reply.content[STATUS_KEY]["status"] == "could-not-train"
        assert "in use by another run" in reply.content[STATUS_KEY]["reason"]
    finally:
        release.touch()
        proc.wait(timeout=60)
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    # The first run's spend was saved; now the site trains (the lock is gone).
    spent = privacy.load_state(path).total_steps
    assert spent == 10  # the holder's plan: the default 10 local steps
    reply = _run_site(run_config, node, _train_message(run_config))
    assert reply.content[STATUS_KEY]["status"] == "ok"
    assert privacy.load_state(path).total_steps == spent + 2


def test_an_empty_poisson_batch_still_adds_noise(tiny_model_dir, tmp_path, monkeypatch):
    from fedlora import entropy
    from fedlora.data import EncodedDataset, read_table
    from fedlora.dp_sgd import train_private
    from fedlora.models import LoraSpec, load_tokenizer

    class NoneSampled(np.random.Generator):
        def random(self, size=None):  # every Poisson coin says "not sampled"
            return np.ones(size)

    monkeypatch.setattr(entropy, "private_numpy_rng",
                        lambda: NoneSampled(np.random.PCG64(0)))
    model = build_lora_model(LoraSpec(str(tiny_model_dir), 2, 4, 8.0, 0.0, ("query", "value"),
                                      True))
    data = read_table(write_reviews(tmp_path / "r.csv", 32), text_column="text",
                      label_column="label", label_names=("negative", "positive"))
    enc = EncodedDataset(data, load_tokenizer(str(tiny_model_dir)), 16)
    before = adapter_state(model)
    result = train_private(model, enc, np.arange(32), steps=1, batch_size=8, learning_rate=0.1,
                           noise_multiplier=1.0, max_grad_norm=1.0, optimizer="sgd")
    assert result.examples == 0
    after = adapter_state(model)
    assert all(not np.array_equal(before[k], after[k]) for k in before)  # noise was added


def test_a_causal_lm_loss_is_a_mean_per_example(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from fedlora.dp_sgd import per_example_lm_loss

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=1)).eval()
    ids = torch.randint(0, 50, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 3:] = 0  # a short example beside a long one
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        losses = per_example_lm_loss(model(input_ids=ids, attention_mask=mask).logits, labels)
        alone = [model(input_ids=ids[i:i + 1, :n], labels=ids[i:i + 1, :n]).loss
                 for i, n in ((0, 12), (1, 3))]
    torch.testing.assert_close(losses, torch.stack(alone), rtol=1e-4, atol=1e-5)
    # transformers' batch loss weighs tokens, so the long example would dominate the short one
    with torch.no_grad():
        token_mean = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert not torch.isclose(token_mean, losses.mean(), rtol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_sample_mode_trains_on_a_gpu_with_the_noise_generator_there(tiny_model_dir, tmp_path):
    from fedlora.data import EncodedDataset, read_table
    from fedlora.dp_sgd import train_private
    from fedlora.models import LoraSpec, load_tokenizer

    assert privacy.private_torch_generator("cuda").device.type == "cuda"
    spec = LoraSpec(str(tiny_model_dir), 2, 4, 8.0, 0.0, ("query", "value"), True,
                    device="cuda")
    model = build_lora_model(spec)
    data = read_table(write_reviews(tmp_path / "r.csv", 64), text_column="text",
                      label_column="label", label_names=("negative", "positive"))
    enc = EncodedDataset(data, load_tokenizer(str(tiny_model_dir)), 16)
    before = adapter_state(model)
    train_private(model, enc, np.arange(64), steps=2, batch_size=16, learning_rate=1e-2,
                  noise_multiplier=1.0, max_grad_norm=1.0)
    after = adapter_state(model)
    assert all(not np.array_equal(before[k], after[k]) for k in before)


def test_under_dp_a_failing_site_does_not_quote_its_data(identity, site, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\nmy diagnosis is confidential,maybe-cancer\n")
    node = {"partition-id": 0, "num-partitions": 2}
    reasons = {}
    for mode in ("off", "sample"):
        run_config = dict(site, **{"dp-mode": mode, "data-path": str(bad)})
        reply = _run_site(run_config, node, _train_message(run_config))
        assert reply.content[STATUS_KEY]["status"] == "could-not-train"
        reasons[mode] = reply.content[STATUS_KEY]["reason"]
    assert "maybe-cancer" in reasons["off"]  # without DP the site says what is wrong
    assert "maybe-cancer" not in reasons["sample"] and "own log" in reasons["sample"]


def test_fedsa_keeps_the_b_it_released_not_the_one_it_trained(identity, site):
    """FedSA-LoRA: a client's own B goes into its next round's starting point, and from
    there into what it releases next; under update DP it must be the noised B it released,
    or the next release would carry this round's update un-noised."""
    from fedlora.app.client.client_app import PERSONAL_STATE_KEY, train_fn

    run_config = dict(site, **{"dp-mode": "update", "aggregator": "fedsa"})
    msg = _train_message(run_config)
    assert not any("lora_B" in k for k in msg.content[LORA_KEY])  # B is never broadcast
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 2},
                      state=RecordDict(), run_config=run_config)
    released = _released(train_fn(msg, context))
    kept = from_record(context.state[PERSONAL_STATE_KEY])
    assert kept and all("lora_B" in k for k in kept)
    for k, v in kept.items():
        np.testing.assert_array_equal(v, released[k])
    std = _update_noise_std(run_config)
    b = np.concatenate([v.ravel() for v in kept.values()])
    assert_noise_std(b, std)  # B started at zero: what is kept is noise
