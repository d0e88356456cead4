"""run-config ``base-quant``: a site's frozen base quantised (int8, nf4), LoRA in float32."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from fedlora import runtime
from fedlora.adapters import adapter_state
from fedlora.base_quant import quantised_layers
from fedlora.config import ConfigError
from fedlora.data import EncodedDataset, read_table
from fedlora.dp_sgd import train_private
from fedlora.models import LoraSpec, build_lora_model, load_tokenizer
from fedlora.runtime import parse_run_config
from fedlora.training import train
from tests.conftest import write_reviews
from tests.test_simulation import _inspect_mod, run_in_process

bnb = pytest.importorskip("bitsandbytes")

QUANT_CLASS = {"int8": (bnb.nn.Linear8bitLt, torch.int8), "nf4": (bnb.nn.Linear4bit, torch.uint8)}


def _spec(tiny_model_dir, base_quant="none"):
    return LoraSpec(str(tiny_model_dir), 2, 4, 8.0, 0.0, ("query", "value"), True,
                    init_seed=3, base_quant=base_quant)


def _data(tiny_model_dir, tmp_path, n=64):
    table = read_table(write_reviews(tmp_path / "r.csv", n), text_column="text",
                       label_column="label", label_names=["negative", "positive"])
    return EncodedDataset(table, load_tokenizer(str(tiny_model_dir)), 16)


def test_key_is_validated_and_combinations_refused():
    assert parse_run_config({}).base_quant == "none"
    for ok in ("none", "int8", "nf4"):
        assert parse_run_config({"base-quant": ok}).base_quant == ok
    for bad in ("int4", "fp4", "8bit", ""):
        with pytest.raises(ConfigError, match="'base-quant'"):
            parse_run_config({"base-quant": bad})
    refused = [({"adapter": "vera"}, "'adapter'"), ({"lora-init": "pissa"}, "'lora-init'"),
               ({"lora-init": "olora"}, "'lora-init'"), ({"aggregator": "stack"}, "'aggregator'")]
    for extra, key in refused:
        parse_run_config(extra)  # fine on the unquantised base
        with pytest.raises(ConfigError, match=f"{key}.*base-quant = 'nf4'"):
            parse_run_config({"base-quant": "nf4", **extra})


def test_the_site_quantises_and_the_server_does_not():
    cfg = runtime.resolve_config({"base-quant": "int8"})
    site, server = runtime.model_spec(cfg), runtime.server_spec(cfg)
    assert site.base_quant == "int8" and server.base_quant == "none"
    assert site != runtime.model_spec(runtime.resolve_config({}))  # a separate cached model


@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_linear_weights_are_quantised_and_the_adapter_is_unchanged(tiny_model_dir, quant):
    plain = build_lora_model(_spec(tiny_model_dir))
    model = build_lora_model(_spec(tiny_model_dir, quant))
    cls, dtype = QUANT_CLASS[quant]
    layers = quantised_layers(model)
    # every linear layer of the encoder (2 layers x q, k, v, attention out, intermediate,
    # output) and the pooler; the trained head stays float32
    assert len(layers) == 2 * 6 + 1, sorted(layers)
    assert all(isinstance(m, cls) and m.weight.dtype == dtype for m in layers.values())
    assert any(n.endswith("query.base_layer") for n in layers)
    assert not any("classifier" in n for n in layers)
    # what a site sends: the same keys, shapes, dtype and initial values as unquantised
    a, b = adapter_state(plain), adapter_state(model)
    assert a.keys() == b.keys() and any("lora_A" in k for k in a)
    assert all(a[k].shape == b[k].shape and b[k].dtype == np.float32 for k in a)
    assert all(np.array_equal(a[k], b[k]) for k in a)  # every party draws the same adapter
    base_bytes = {
        m: sum(t.numel() * t.element_size() for n, t in mod.state_dict().items()
               if ".base_layer." in f".{n}" or "lora_" not in n)
        for m, mod in (("none", plain), (quant, model))}
    assert base_bytes[quant] < base_bytes["none"]


@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_lora_trains_on_the_quantised_base(tiny_model_dir, tmp_path, quant):
    data = _data(tiny_model_dir, tmp_path)
    model = build_lora_model(_spec(tiny_model_dir, quant))
    frozen = {n: t.detach().clone() for n, t in model.state_dict().items() if "lora_" not in n
              and "classifier" not in n}
    before = adapter_state(model)
    first = train(model, data, np.arange(64), steps=1, batch_size=64, learning_rate=0.05)
    last = train(model, data, np.arange(64), steps=6, batch_size=64, learning_rate=0.05)
    assert np.isfinite(last.loss) and last.loss < first.loss
    after = adapter_state(model)
    assert any(k.endswith("lora_B.weight") and not np.array_equal(before[k], after[k])
               for k in before)
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    assert all(torch.equal(t, frozen[n]) for n, t in model.state_dict().items() if n in frozen)


@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_dp_sgd_clips_and_trains_the_float32_lora(tiny_model_dir, tmp_path, quant):
    data = _data(tiny_model_dir, tmp_path)
    model = build_lora_model(_spec(tiny_model_dir, quant))
    before = adapter_state(model)
    res = train_private(model, data, np.arange(64), steps=3, batch_size=16, learning_rate=0.05,
                        noise_multiplier=0.5, max_grad_norm=1.0)
    assert np.isfinite(res.loss)
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())
    after = adapter_state(model)
    for part in ("lora_A.weight", "lora_B.weight", "classifier"):
        assert any(part in k and not np.array_equal(before[k], after[k]) for k in before), part
    # without noise, one SGD step moves the adapter by at most lr * C
    model = build_lora_model(_spec(tiny_model_dir, quant))
    before = adapter_state(model)
    train_private(model, data, np.arange(64), steps=1, batch_size=16, learning_rate=1.0,
                  noise_multiplier=0.0, max_grad_norm=0.01, optimizer="sgd")
    after = adapter_state(model)
    moved = np.sqrt(sum(float(np.sum((after[k] - before[k]) ** 2)) for k in before))
    assert 0 < moved <= 0.01 * 1.5  # Poisson batches may be below their expected size


@pytest.mark.slow
def test_a_run_with_a_quantised_base_sends_only_the_adapter(tmp_path, custom_task,
                                                            tiny_model_dir):
    log_path = tmp_path / "messages.jsonl"
    cfg = dict(custom_task, **{"base-quant": "nf4", "base-dtype": "float32"})
    run_dir = run_in_process(cfg, num_nodes=4, mods=[_inspect_mod(str(log_path))])
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert all(r["clients_accepted"] == 2 and r["clients_refused"] == 0 for r in rounds[1:])
    assert np.isfinite(rounds[-1]["test_loss"])
    expected = adapter_state(build_lora_model(dataclasses.replace(
        runtime.model_spec(runtime.resolve_config(cfg)), base_quant="none")))
    events = [json.loads(line) for line in log_path.read_text().splitlines()]
    up = [e for e in events if e["type"] == "train" and e["direction"] == "up"]
    assert len(up) == 2 * 2  # rounds x sampled nodes
    for event in up:
        shapes = {k: tuple(v["shape"]) for k, v in event["arrays"].items()}
        assert shapes == {k: v.shape for k, v in expected.items()}


@pytest.mark.slow
def test_a_private_run_on_a_quantised_base(custom_task):
    """dp-mode = sample (the DP recipe: the head probed first, then DP-SGD on LoRA) with the
    sites' base in int8: every reply accepted, the budget spent as planned."""
    cfg = dict(custom_task, **{"base-quant": "int8", "base-dtype": "float32",
                               "dp-mode": "sample", "target-delta": 1e-3})
    run_dir = run_in_process(cfg, num_nodes=4)
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert all(r["clients_accepted"] == 2 and r["clients_refused"] == 0 for r in rounds[1:])
    assert all(0 < r["max_epsilon"] <= 8.0 for r in rounds[1:])


@pytest.mark.parametrize("base_quant", ["int8", "nf4"])
def test_an_example_is_computed_the_same_whatever_else_is_in_its_batch(tiny_model_dir,
                                                                        base_quant):
    """Under DP an example's features and gradient must depend on that example alone. An
    attacker's example with huge activations beside it changes nothing for the others (with
    int8's outlier decomposition it would: the columns computed in float are chosen over the
    whole batch). Checked in eval mode, as features are read, on every quantised layer."""
    model = build_lora_model(_spec(tiny_model_dir, base_quant)).eval()
    layers = quantised_layers(model)
    assert layers
    gen = torch.Generator().manual_seed(0)
    for name, layer in layers.items():
        x = torch.randn(2, 5, layer.in_features, generator=gen)  # (examples, tokens, width)
        attacker = torch.full((1, 5, layer.in_features), 50.0)
        attacker[..., ::3] = -80.0
        # (inputs that require grad: bitsandbytes' packed nf4 inference path for AVX512-BF16
        # CPUs cannot take the tiny model's 32-wide layers)
        # (Same shapes: only the other example's values differ, not the batch's size.)
        x.requires_grad_(True)
        benign = torch.randn(1, 5, layer.in_features, generator=gen)
        beside_benign = layer(torch.cat([x, benign]))[:2]
        beside_attacker = layer(torch.cat([x, attacker]))[:2]
        assert torch.equal(beside_benign, beside_attacker), name
