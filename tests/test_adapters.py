"""Adapter tensors in and out of a model, and through the wire format, exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedlora.adapters import (
    adapter_state,
    analytic_bytes,
    factor_layout,
    is_factor_key,
    load_adapter_state,
)
from fedlora.models import LoraSpec, build_lora_model
from fedlora.wire import from_record, record_bytes, to_record


def _spec(path, rank=4, head=True, targets=("query", "value")):
    return LoraSpec(model_path=str(path), num_labels=2, rank=rank, alpha=8.0, dropout=0.0,
                    target_modules=targets, train_head=head)


def _randomise(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g))


def test_state_holds_only_factors_and_head(tiny_model_dir):
    model = build_lora_model(_spec(tiny_model_dir))
    state = adapter_state(model)
    factors = [k for k in state if is_factor_key(k)]
    others = sorted(set(state) - set(factors))
    assert len(factors) == 2 * 2 * 2  # 2 layers x (query, value) x (A, B)
    assert others == ["base_model.model.classifier.bias", "base_model.model.classifier.weight"]
    no_head = adapter_state(build_lora_model(_spec(tiny_model_dir, head=False)))
    assert all(is_factor_key(k) for k in no_head)
    # Every trainable parameter is in the state: nothing trained stays behind.
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n_trainable == sum(a.size for a in state.values())


@pytest.mark.parametrize("wire", ["float32", "float16", "bfloat16"])
def test_round_trip_through_the_wire(tiny_model_dir, wire):
    src = build_lora_model(_spec(tiny_model_dir))
    _randomise(src)
    state = adapter_state(src)
    record = to_record(state, wire)
    size = {"float32": 4, "float16": 2, "bfloat16": 2}[wire]
    assert record_bytes(record) == sum(a.size for a in state.values()) * size
    dst = build_lora_model(_spec(tiny_model_dir))
    load_adapter_state(dst, from_record(record))
    back = adapter_state(dst)
    assert back.keys() == state.keys()
    for k in state:
        if wire == "float32":
            np.testing.assert_array_equal(back[k], state[k])
        else:
            np.testing.assert_allclose(back[k], state[k], rtol=1e-2 if wire == "bfloat16" else 1e-3,
                                       atol=1e-2)


def test_loaded_adapter_gives_identical_outputs(tiny_model_dir):
    src = build_lora_model(_spec(tiny_model_dir))
    _randomise(src, seed=5)
    dst = build_lora_model(_spec(tiny_model_dir))
    load_adapter_state(dst, from_record(to_record(adapter_state(src))))
    x = {"input_ids": torch.randint(0, 1000, (3, 7)), "attention_mask": torch.ones(3, 7, dtype=torch.long)}
    src.eval(), dst.eval()
    with torch.no_grad():
        torch.testing.assert_close(src(**x).logits, dst(**x).logits, rtol=0, atol=0)


def test_load_refuses_wrong_keys_and_shapes(tiny_model_dir):
    model = build_lora_model(_spec(tiny_model_dir))
    state = adapter_state(model)
    extra = dict(state, **{"base_model.model.bert.embeddings.word_embeddings.weight": np.zeros(3)})
    with pytest.raises(KeyError, match="unexpected"):
        load_adapter_state(model, extra)
    missing = dict(state)
    missing.pop(next(iter(missing)))
    with pytest.raises(KeyError, match="missing"):
        load_adapter_state(model, missing)
    key = next(k for k in state if k.endswith("lora_A.weight"))
    with pytest.raises(ValueError, match="shape"):
        load_adapter_state(model, dict(state, **{key: np.zeros((2, 2), np.float32)}))


def test_analytic_bytes_from_the_model_itself(tiny_model_dir):
    model = build_lora_model(_spec(tiny_model_dir, rank=3))
    layout = factor_layout(adapter_state(model))
    # Independent count: every LoRA-wrapped Linear contributes r x (in + out).
    expected = 0
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            expected += 3 * (module.in_features + module.out_features)
    assert analytic_bytes(layout, 4) == expected * 4 and expected > 0
