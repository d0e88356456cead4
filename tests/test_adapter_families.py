"""Adapter families (lora, dora, vera, c3a) and LoRA's inits: what each builds, sends and
saves, and which run-configs refuse them."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from fedlora.adapter_families import FAMILIES, as_plain_lora, get_family
from fedlora.adapters import adapter_state, load_adapter_state
from fedlora.config import ConfigError
from fedlora.models import LoraSpec, build_lora_model, initial_adapter_state


def _spec(path, family="lora", init="default", rank=4, head=True, **kw):
    return LoraSpec(model_path=str(path), num_labels=2, rank=rank, alpha=8.0, dropout=0.0,
                    target_modules=("query", "value"), train_head=head, family=family,
                    init=init, c3a_block_size=8, **kw)


def _base_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()
            if "base_layer" in n or not p.requires_grad}


def _randomise(model, seed=1, std=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(std * torch.randn(p.shape, generator=g))


def _batch():
    g = torch.Generator().manual_seed(3)
    return {"input_ids": torch.randint(0, 1000, (3, 9), generator=g),
            "attention_mask": torch.ones(3, 9, dtype=torch.long)}


@pytest.mark.parametrize("init", ["gaussian", "pissa", "olora"])
def test_two_builds_of_one_init_are_identical(tiny_model_dir, init):
    a, b = (build_lora_model(_spec(tiny_model_dir, init=init)) for _ in range(2))
    sa, sb = adapter_state(a), adapter_state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        np.testing.assert_array_equal(sa[k], sb[k], err_msg=k)
    wa, wb = _base_weights(a), _base_weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_derived_init_moves_part_of_the_base_into_the_adapter(tiny_model_dir, init):
    plain = build_lora_model(_spec(tiny_model_dir))
    derived = build_lora_model(_spec(tiny_model_dir, init=init))
    state = adapter_state(derived)
    assert any(np.abs(v).sum() > 0 for k, v in state.items() if k.endswith("lora_B.weight"))
    plain_w, derived_w = _base_weights(plain), _base_weights(derived)
    name = next(k for k in plain_w if "query.base_layer" in k)
    assert not torch.equal(plain_w[name], derived_w[name])  # the residual base
    # The residual plus the initial update is the original weight.
    with torch.no_grad():
        x = _batch()
        plain.eval()
        derived.eval()
        load_adapter_state(plain, {**adapter_state(plain),
                                   **{k: v for k, v in state.items() if "classifier" in k}})
        torch.testing.assert_close(derived(**x).logits, plain(**x).logits, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_plain_lora_on_the_original_base_is_the_residual_model(tiny_model_dir, init):
    spec = _spec(tiny_model_dir, init=init)
    trained = build_lora_model(spec)
    _randomise(trained)
    rank, alpha, state = as_plain_lora(adapter_state(trained), initial_adapter_state(spec),
                                       rank=spec.rank, alpha=spec.alpha,
                                       init_rank=spec.rank, init_alpha=spec.alpha)
    assert (rank, alpha) == (2 * spec.rank, 2 * spec.alpha)
    plain = build_lora_model(dataclasses.replace(spec, rank=rank, alpha=alpha, init="default"))
    load_adapter_state(plain, state)
    trained.eval()
    plain.eval()
    with torch.no_grad():
        x = _batch()
        torch.testing.assert_close(plain(**x).logits, trained(**x).logits, atol=1e-5, rtol=1e-4)


def test_each_family_sends_only_what_it_declares(tiny_model_dir):
    for name, family in FAMILIES.items():
        model = build_lora_model(_spec(tiny_model_dir, family=name))
        state = adapter_state(model)
        head = sorted(k for k in state if "classifier" in k)
        assert head == ["base_model.model.classifier.bias", "base_model.model.classifier.weight"]
        own = family.sent_keys(state)
        assert sorted(own) == sorted(set(state) - set(head)), name
        assert {s for s in family.sends for k in own if k.endswith(s)} == set(family.sends)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert trainable == sum(a.size for a in state.values()), name


def test_vera_projections_come_from_the_seed_and_are_never_sent(tiny_model_dir):
    a = build_lora_model(_spec(tiny_model_dir, family="vera"))
    b = build_lora_model(_spec(tiny_model_dir, family="vera"))
    c = build_lora_model(_spec(tiny_model_dir, family="vera", init_seed=5))
    buffers = {m: dict(x.named_buffers()) for m, x in (("a", a), ("b", b), ("c", c))}
    shared = [k for k in buffers["a"] if "vera_A" in k or "vera_B" in k]
    assert shared
    for k in shared:
        assert torch.equal(buffers["a"][k], buffers["b"][k])
        assert not torch.equal(buffers["a"][k], buffers["c"][k])
    assert not any("vera_A" in k or "vera_B" in k for k in adapter_state(a))


def _first_layer(model):
    return next(m for n, m in model.named_modules() if n.endswith("layer.0.attention.self.query"))


@pytest.mark.parametrize("seed", range(5))
def test_averaging_vera_vectors_is_exact_where_lambda_d_agrees(tiny_model_dir, seed):
    """The mean of sites' lambda_b with a shared lambda_d is exactly the mean of their
    updates (linear in lambda_b); with different lambda_d it is not (bilinear)."""
    model = build_lora_model(_spec(tiny_model_dir, family="vera"))
    layer = _first_layer(model)
    rng = np.random.default_rng(seed)
    n_sites = int(rng.integers(2, 6))
    p = rng.dirichlet(np.ones(n_sites))
    d_shared = torch.as_tensor(rng.normal(size=layer.vera_lambda_d["default"].shape),
                               dtype=torch.float32)

    def delta(lb, ld):
        with torch.no_grad():
            layer.vera_lambda_b["default"].copy_(lb)
            layer.vera_lambda_d["default"].copy_(ld)
            return layer.get_delta_weight("default").double()

    lbs = [torch.as_tensor(rng.normal(size=layer.vera_lambda_b["default"].shape),
                           dtype=torch.float32) for _ in range(n_sites)]
    mean_of_deltas = sum(pk * delta(lb, d_shared) for pk, lb in zip(p, lbs))
    mean_lb = torch.as_tensor(sum(pk * lb.double() for pk, lb in zip(p, lbs)),
                              dtype=torch.float32)
    torch.testing.assert_close(delta(mean_lb, d_shared), mean_of_deltas, atol=1e-6, rtol=1e-5)
    lds = [torch.as_tensor(rng.normal(size=d_shared.shape), dtype=torch.float32)
           for _ in range(n_sites)]
    mean_of_deltas = sum(pk * delta(lb, ld) for pk, lb, ld in zip(p, lbs, lds))
    mean_ld = torch.as_tensor(sum(pk * ld.double() for pk, ld in zip(p, lds)),
                              dtype=torch.float32)
    gap = (delta(mean_lb, mean_ld) - mean_of_deltas).abs().max().item()
    assert gap > 1e-3 * mean_of_deltas.abs().max().item()
    assert not get_family("vera").exact_mean


@pytest.mark.parametrize("seed", range(5))
def test_averaging_c3a_kernels_is_the_mean_of_the_updates(tiny_model_dir, seed):
    """C3A's update is linear in its kernel: the weighted mean of the sites' kernels gives
    exactly the weighted mean of their updates."""
    model = build_lora_model(_spec(tiny_model_dir, family="c3a"))
    layer = _first_layer(model)
    rng = np.random.default_rng(seed)
    n_sites = int(rng.integers(2, 6))
    p = rng.dirichlet(np.ones(n_sites))
    shape = layer.c3a_kernel["default"].shape

    def delta(w):
        with torch.no_grad():
            layer.c3a_kernel["default"].copy_(w)
            return layer.get_delta_weight("default").double()

    kernels = [torch.as_tensor(rng.normal(size=shape), dtype=torch.float32)
               for _ in range(n_sites)]
    mean_of_deltas = sum(pk * delta(w) for pk, w in zip(p, kernels))
    mean_kernel = torch.as_tensor(sum(pk * w.double() for pk, w in zip(p, kernels)),
                                  dtype=torch.float32)
    torch.testing.assert_close(delta(mean_kernel), mean_of_deltas, atol=1e-6, rtol=1e-5)
    assert get_family("c3a").exact_mean


def test_a_block_size_that_does_not_divide_names_the_key(tiny_model_dir):
    with pytest.raises(ValueError, match="c3a-block-size"):
        build_lora_model(dataclasses.replace(_spec(tiny_model_dir, family="c3a"),
                                             c3a_block_size=7))


def _parse(overrides):
    from fedlora import aggregation
    from fedlora.runtime import parse_run_config
    from fedlora.tasks import TASKS

    return parse_run_config({}, overrides, known_tasks=TASKS,
                            known_aggregators=aggregation.METHODS)


@pytest.mark.parametrize("overrides, key, names", [
    ({"adapter": "vera", "aggregator": "svd"}, "aggregator", "*.vera_lambda_b"),
    ({"adapter": "dora", "aggregator": "ffa"}, "aggregator", "*.lora_magnitude_vector"),
    ({"adapter": "dora", "aggregator": "stack"}, "aggregator", "fedavg"),
    ({"adapter": "vera", "lora-init": "pissa"}, "lora-init", "default"),
    ({"adapter": "dora", "lora-init": "olora"}, "lora-init", "gaussian"),
    ({"adapter": "vera", "dp-mode": "sample"}, "adapter", "*.vera_lambda_d"),
    ({"adapter": "dora", "dp-mode": "sample"}, "adapter", "*.lora_magnitude_vector"),
    ({"lora-init": "pissa", "aggregator": "stack"}, "lora-init", "stack"),
    ({"adapter": "c3a", "aggregator": "fedsa"}, "aggregator", "*.c3a_kernel"),
    ({"adapter": "c3a", "dp-mode": "sample+client"}, "adapter", "*.c3a_kernel"),
    ({"adapter": "c3a", "lora-init": "gaussian"}, "lora-init", "default"),
    ({"adapter": "ia3"}, "adapter", "lora, dora, vera, c3a"),
    ({"lora-init": "eva"}, "lora-init", "pissa"),
])
def test_refused_combinations_name_the_key_and_tensors(overrides, key, names):
    with pytest.raises(ConfigError) as e:
        _parse(overrides)
    assert f"'{key}'" in str(e.value) and names in str(e.value), str(e.value)


def test_accepted_combinations(tmp_path):
    for overrides in ({"adapter": "vera"}, {"adapter": "dora"}, {"lora-init": "pissa"},
                      {"adapter": "vera", "secure-aggregation": True},
                      {"adapter": "c3a", "secure-aggregation": True, "dp-mode": "update"},
                      {"adapter": "dora", "dp-mode": "client"},
                      {"lora-init": "olora", "aggregator": "svd"}):
        cfg = _parse(overrides)
        assert cfg.adapter == overrides.get("adapter", "lora")


def test_distributed_dp_refuses_a_family_with_other_tensors(monkeypatch):
    """Secure aggregation with dp-mode = sample sums every tensor but A and B as the head's:
    a family that sends others is refused, naming them, even where DP-SGD could clip it."""
    from fedlora.adapter_families import base
    from fedlora.adapter_families.lora import LoraFamily

    class Scaled(LoraFamily):
        name = "scaled"
        sends = (*LoraFamily.sends, ".lora_scale")
        per_example_gradients = True

    monkeypatch.setitem(base.FAMILIES, "scaled", Scaled)
    with pytest.raises(ConfigError) as e:
        _parse({"adapter": "scaled", "aggregator": "fedavg", "secure-aggregation": True,
                "dp-mode": "sample"})
    assert "'adapter'" in str(e.value) and "*.lora_scale" in str(e.value), str(e.value)
    _parse({"adapter": "scaled", "aggregator": "fedavg", "dp-mode": "sample"})
