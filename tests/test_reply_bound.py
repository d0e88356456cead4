"""The server's bound on a private reply follows the plan: honest private replies of every
phase, budget and site size pass it; a poisoned one (10x the bound) is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedlora import privacy
from fedlora.adapters import adapter_state
from fedlora.aggregation import get_method
from fedlora.data import EncodedDataset, read_table
from fedlora.models import LoraSpec, build_lora_model, load_tokenizer
from fedlora.privacy.count import noised_count
from fedlora.privacy.reply_bound import adam_step_factor, displacement
from fedlora.runtime import parse_run_config
from fedlora.wire import WireFormat, from_record, to_record

from .conftest import write_reviews
from .test_wire_quantization import _config, _reply_message


def test_adams_step_factor_bounds_every_coordinate_whatever_the_gradients():
    """Adversarial gradient sequences (a spike after silence, alternating signs, growth):
    no coordinate moves further than lr * sum of K_t."""
    torch.manual_seed(0)
    assert adam_step_factor(1) == pytest.approx(1.0)
    steps, lr = 12, 0.01
    patterns = [lambda t: 1e-8 if t < steps - 1 else 1.0, lambda t: (-1.0) ** t,
                lambda t: 10.0 ** t, lambda t: 1.0, lambda t: 10.0 ** (-t)]
    worst = 0.0
    for pattern in patterns + [None] * 20:
        p = torch.zeros(64, requires_grad=True)
        opt = torch.optim.AdamW([p], lr=lr, weight_decay=0.0)
        for t in range(steps):
            p.grad = (torch.full((64,), pattern(t)) if pattern else torch.randn(64))
            opt.step()
        worst = max(worst, float(p.detach().abs().max()))
    bound = displacement(optimizer="adamw", steps=steps, learning_rate=lr, grad_bound=0.0,
                         dims=1)
    assert worst <= bound
    assert worst > 0.5 * bound  # the spike after silence comes close: the bound is not loose


def _tiny_setup(tiny_model_dir, tmp_path, n: int):
    rows = read_table(write_reviews(tmp_path / f"r{n}.csv", n, seed=n), text_column="text",
                      label_column="label", label_names=("negative", "positive"))
    return EncodedDataset(rows, load_tokenizer(str(tiny_model_dir)), 16)


def _cfg(tiny_model_dir, eps: float, optimizer: str):
    return parse_run_config({
        "task": "custom", "model-path": str(tiny_model_dir), "labels": "negative,positive",
        "dp-mode": "sample", "target-epsilon": eps, "num-server-rounds": 4, "probe-rounds": 2,
        "local-steps": 5, "batch-size": 32, "optimizer": optimizer,
        "learning-rate": 0.002 if optimizer == "adamw" else 0.05, "lora-rank": 4})


@pytest.mark.parametrize("n", [50, 500, 5000])
def test_honest_private_replies_pass_and_a_poisoned_one_is_refused(tiny_model_dir, tmp_path, n,
                                                                   identity):
    from fedlora.app.server.strategy import LoraStrategy

    data = _tiny_setup(tiny_model_dir, tmp_path, n)
    idx = np.arange(n)
    method = get_method("fedavg", alpha=8.0, rank=4)
    mechanism = privacy.client_mechanism("sample")
    ratios = []
    for eps in (0.5, 1.0, 8.0):
        for optimizer, rnd in (("adamw", 1), ("adamw", 3), ("sgd", 3)):  # probe, LoRA, LoRA
            cfg = _cfg(tiny_model_dir, eps, optimizer)
            spec = LoraSpec(str(tiny_model_dir), 2, 4, 8.0, 0.0, ("query", "value"), True)
            model = build_lora_model(spec)
            start = adapter_state(model)
            released = noised_count(n)
            plan = mechanism.plan(cfg, released)
            if rnd <= cfg.probe_rounds:
                mechanism.train_head(model, data, idx, plan=plan, cfg=cfg)
            else:
                mechanism.train(model, data, idx, plan=plan, cfg=cfg, seed=0)
            reply = adapter_state(model)
            norm = method.update_norm(reply, start, rank=4)
            bound = privacy.reply_norm_bound(cfg)(rnd, released, reply,
                                                  privacy.global_norm(start))
            assert 0 < norm <= bound, (n, eps, optimizer, rnd, norm, bound)
            ratios.append(bound / norm)

            # Through the server's own check: the honest reply is accepted; one moved
            # (in the direction it moved) to 10x the bound is refused.
            strategy = LoraStrategy(method=method, template=start, fraction_train=1.0,
                                    fraction_evaluate=0.0, wire=WireFormat("float32"),
                                    max_update_norm=50.0,
                                    reply_bound=privacy.reply_norm_bound(cfg))
            strategy.global_state = start
            strategy._messages(rnd, from_record(to_record(start)), _config(), [1], "train")
            strategy.server_round = rnd

            def message(state):
                msg = _reply_message(to_record(state))
                msg.content["metrics"]["num-examples"] = released
                return msg

            strategy._check_reply(message(reply))
            scale = 10 * bound / norm
            poisoned = {k: start[k] + scale * (v - start[k]) for k, v in reply.items()}
            with pytest.raises(ValueError, match="honest private reply"):
                strategy._check_reply(message(poisoned))
    # The bound is a bound, not a blanket: DP-SGD rounds within a few times the honest
    # norms. (Probe rounds are looser here: their worst case has every example's clipped
    # gradient aligned, and a random tiny model's features are not.)
    assert max(ratios[1::3] + ratios[2::3]) < 10, ratios


def test_the_bound_grows_with_the_noise_a_plan_adds(tiny_model_dir):
    """Smaller epsilon (more noise), fewer released examples (larger probe steps), more
    noised dimensions: each makes the bound larger."""
    bound_of = {eps: privacy.reply_norm_bound(_cfg(tiny_model_dir, eps, "sgd"))
                for eps in (1.0, 8.0)}
    head = {"classifier.weight": np.zeros((2, 32), np.float32)}
    big_head = {"classifier.weight": np.zeros((2, 3200), np.float32)}
    assert bound_of[1.0](1, 500, head) > bound_of[8.0](1, 500, head)
    assert bound_of[8.0](1, 100, head) > bound_of[8.0](1, 2000, head)
    assert bound_of[8.0](1, 500, big_head) > bound_of[8.0](1, 500, head)
    # A probe round counts only the head as noised; a LoRA round counts every tensor.
    lora = {"m.lora_A.weight": np.zeros((4, 3200), np.float32), **head}
    assert bound_of[8.0](1, 500, lora) == bound_of[8.0](1, 500, head)
    assert bound_of[8.0](3, 500, lora) > bound_of[8.0](3, 500, head)
    assert privacy.reply_norm_bound(parse_run_config({"dp-mode": "off"})) is None


@pytest.mark.parametrize("wire", ["float32", "float16", "bfloat16"])
def test_a_single_adam_step_on_a_half_precision_wire_is_not_refused(tiny_model_dir, tmp_path,
                                                                    wire, identity):
    """One AdamW step moves every coordinate by exactly the learning rate, the bound's own
    value; rounding on the wire (and in the client's float32 arithmetic) must not tip it."""
    from fedlora.app.server.strategy import LoraStrategy

    data = _tiny_setup(tiny_model_dir, tmp_path, 200)
    cfg = parse_run_config({
        "task": "custom", "model-path": str(tiny_model_dir), "labels": "negative,positive",
        "dp-mode": "sample", "dp-recipe": "none", "target-epsilon": 1.0, "local-steps": 1,
        "batch-size": 32, "lora-rank": 4, "wire-dtype": wire})
    mechanism = privacy.client_mechanism("sample")
    method = get_method("fedavg", alpha=8.0, rank=4)
    spec = LoraSpec(str(tiny_model_dir), 2, 4, 8.0, 0.0, ("query", "value"), True)
    for _ in range(3):
        model = build_lora_model(spec)
        start = adapter_state(model)
        released = noised_count(200)
        mechanism.train(model, data, np.arange(200), plan=mechanism.plan(cfg, released),
                        cfg=cfg, seed=0)
        strategy = LoraStrategy(method=method, template=start, fraction_train=1.0,
                                fraction_evaluate=0.0, wire=WireFormat(wire),
                                max_update_norm=50.0, reply_bound=privacy.reply_norm_bound(cfg))
        strategy.global_state = start
        sent = from_record(to_record(start, WireFormat(wire)))
        strategy._messages(1, sent, _config(), [1], "train")
        strategy.server_round = 1
        msg = _reply_message(to_record(adapter_state(model), WireFormat(wire)))
        msg.content["metrics"]["num-examples"] = released
        strategy._check_reply(msg)


def test_a_reply_cannot_claim_a_larger_weight_than_its_released_count(identity):
    """Under sample a site's weight is its noised count, released once: a later reply
    claiming another is refused. Under update every reply weighs 1."""
    from fedlora.app.server.strategy import LoraStrategy

    rng = np.random.default_rng(0)
    template = {"m.lora_A.weight": rng.normal(size=(4, 64)).astype(np.float32),
                "m.lora_B.weight": np.zeros((64, 4), np.float32)}
    method = get_method("fedavg", alpha=8.0, rank=4)

    def check(weights, n):
        strategy = LoraStrategy(method=method, template=template, fraction_train=1.0,
                                fraction_evaluate=0.0, reply_weights=weights)
        strategy.global_state = template
        strategy._messages(1, from_record(to_record(template)), _config(), [1], "train")
        msg = _reply_message(to_record(template))
        msg.content["metrics"]["num-examples"] = n
        return strategy, msg

    strategy, msg = check("released-once", 480)
    strategy._check_reply(msg)
    _, later = check("released-once", 99_999)
    with pytest.raises(ValueError, match="not the count this node released"):
        strategy._check_reply(later)
    strategy._check_reply(msg)  # the same count again: fine
    strategy, msg = check("uniform", 2)
    with pytest.raises(ValueError, match="every reply weighs 1"):
        strategy._check_reply(msg)
    strategy, msg = check("claimed", 99_999)
    strategy._check_reply(msg)  # no DP: a count is just a count
