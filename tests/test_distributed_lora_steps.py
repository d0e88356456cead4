"""Distributed DP-SGD of LoRA (``dp-mode = "sample"`` with ``secure-aggregation = true`` and
``probe-rounds`` below ``num-server-rounds``): after the probe rounds every round is one
full-batch step of every tensor the aggregator sends, each example's gradient through the
whole model clipped at the site. The tests check the per-example gradients against plain
autograd, one example's effect on a site's vector, and real Flower rounds."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedlora import distributed_dp
from fedlora.adapters import adapter_parameters, adapter_state
from fedlora.distributed_grads import example_gradients, lora_step_vector
from fedlora.models import build_lora_model
from fedlora.privacy.skellam import SkellamSum
from fedlora.runtime import client_data, method_for, model_spec, parse_run_config
from fedlora.secagg import SecAggServer

from .test_simulation import run_in_process


@pytest.fixture()
def site(custom_task):
    cfg = parse_run_config({**custom_task, "dp-mode": "sample", "secure-aggregation": True,
                            "num-server-rounds": 3, "probe-rounds": 1})
    model = build_lora_model(model_spec(cfg))
    for p in adapter_parameters(model, sorted(adapter_state(model))):  # B away from 0
        p.data.normal_(0, 0.1)
    data = client_data(cfg, partition_id=0, num_partitions=4, data_path=None)
    payload = method_for(cfg).payload(adapter_state(model))
    return cfg, model, data, payload


def test_each_examples_gradient_is_its_own_and_dropout_is_off(site):
    cfg, model, data, payload = site
    keys = sorted(payload)
    idx = np.asarray(data.train_idx[:5])
    together = example_gradients(model, data.data, idx, keys)
    params = adapter_parameters(model, keys)
    for row, i in enumerate(idx):  # plain autograd on the example alone, dropout off
        model.eval()
        model.zero_grad(set_to_none=True)
        model(**data.data.collate(np.array([i]))).loss.backward()
        alone = np.concatenate([p.grad.detach().double().numpy().ravel() for p in params])
        err = np.abs(together[row] - alone).max()
        assert err <= 1e-4 * np.abs(alone).max(), (err, np.abs(alone).max())
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())  # unwrapped
    again = example_gradients(model, data.data, idx, keys)
    assert np.allclose(together, again, atol=1e-7)  # no dropout mask differs between calls


def test_one_example_moves_a_sites_vector_by_at_most_the_sensitivity(site):
    cfg, model, data, payload = site
    release = distributed_dp.release_for(cfg, payload, 2)
    assert release.kind == "lora-step"
    spec = release.spec
    idx = np.asarray(data.train_idx)
    without = lora_step_vector(model, data.data, idx[1:], cfg=cfg, payload=payload, spec=spec)
    with_it = lora_step_vector(model, data.data, idx, cfg=cfg, payload=payload, spec=spec)
    diff = (with_it - without).astype(np.float64)
    assert diff[-1] == spec.count_weight  # it counts once
    # The rest is its clipped gradient plus the rounding of every example (< 1 per
    # coordinate each): bounded by the sensitivity plus the others' rounding.
    others = len(idx) - 1
    assert np.linalg.norm(diff) <= spec.l2_sensitivity + 2 * others * np.sqrt(spec.dims)
    grads = example_gradients(model, data.data, idx[:1], sorted(payload))
    clipped = grads[0] * min(1.0, cfg.max_grad_norm / np.linalg.norm(grads[0]))
    expected = clipped * spec.units / cfg.max_grad_norm
    assert np.linalg.norm(diff[:-1] - expected) < 3 * np.sqrt(spec.dims * (others + 1))


def test_a_non_finite_example_adds_nothing_and_still_counts(site, monkeypatch):
    cfg, model, data, payload = site
    spec = SkellamSum.for_dims(sum(int(np.size(v)) for v in payload.values()))
    import fedlora.distributed_grads as grads_module

    real = grads_module._grads_in

    def poisoned(gsm, params, data, idx, width):
        out = real(gsm, params, data, idx, width)
        out[0] = np.inf  # the first example of every chunk overflows
        return grads_module._rows_finite(out)

    monkeypatch.setattr(grads_module, "_grads_in", poisoned)
    idx = np.asarray(data.train_idx[:10])
    vector = lora_step_vector(model, data.data, idx, cfg=cfg, payload=payload, spec=spec)
    assert vector[-1] == 10 * spec.count_weight and np.isfinite(vector).all()


@pytest.mark.slow
def test_lora_rounds_step_every_sent_tensor_on_the_noised_sum(custom_task, monkeypatch):
    revealed = []
    aggregate = SecAggServer.aggregate

    def spy(self, replies):
        total = aggregate(self, replies)
        revealed.append((self.config.round_id, self.config.length, total.signed()))
        return total

    monkeypatch.setattr(SecAggServer, "aggregate", spy)
    overrides = {**custom_task, "num-server-rounds": 2, "probe-rounds": 1,
                 "fraction-train": 1.0, "fraction-evaluate": 0.0, "secure-aggregation": True,
                 "dp-mode": "sample", "target-epsilon": 8.0, "learning-rate": 0.01,
                 "dp-min-honest": 1.0, "run-name": "dlora"}
    run_dir = run_in_process(overrides, num_nodes=4)
    assert [r for r, _, _ in revealed] == [1, 2]
    head_len, lora_len = revealed[0][1], revealed[1][1]
    assert lora_len > head_len  # round 2 sums the factors too
    _, count = SkellamSum.for_dims(lora_len - 1).decode(revealed[1][2], 1.0)
    assert 100 < count < 300, count  # 200 examples over the 4 sites, through the noise
    adapter = run_dir / "adapter"
    from safetensors.numpy import load_file

    saved = load_file(str(next(adapter.glob("*.safetensors"))))
    b = [v for k, v in saved.items() if "lora_B" in k]
    assert b and all(np.abs(v).max() > 0 for v in b)  # B moved off its zero init
    assert json.loads((run_dir / "comms.json").read_text())["measured_equals_analytic"]


def test_the_fixed_width_stays_within_the_models_positions(custom_task):
    """A server asking for max-length 4096 on a 128-position model must not make every
    example fail (its LoRA rounds would release pure noise)."""
    cfg = parse_run_config({**custom_task, "dp-mode": "sample", "secure-aggregation": True,
                            "max-length": 4096})
    model = build_lora_model(model_spec(cfg))
    data = client_data(cfg, partition_id=0, num_partitions=4, data_path=None)
    assert data.data.max_length <= 128
    keys = sorted(method_for(cfg).payload(adapter_state(model)))
    grads = example_gradients(model, data.data, np.asarray(data.train_idx[:3]), keys,
                              data.data.max_length)
    assert grads.shape[0] == 3 and np.abs(grads).sum() > 0
