"""Each adapter family and derived init through a tiny in-process simulation: what crosses
the wire, and the saved adapter (in plain peft and as ``fedlora export`` loads it) against
the server's own model."""

from __future__ import annotations

import csv
import dataclasses
import json

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors.numpy import load_file
from transformers import AutoModelForSequenceClassification

from fedlora import runtime
from fedlora.adapter_families import get_family
from fedlora.adapters import adapter_state, load_adapter_state
from fedlora.checkpoint import load_checkpoint
from fedlora.export import load_run_model
from fedlora.models import build_lora_model, load_tokenizer
from tests.test_simulation import _inspect_mod, run_in_process


def _plain_peft_logits(adapter_dir, model_dir, batch):
    base = AutoModelForSequenceClassification.from_pretrained(str(model_dir), num_labels=2)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    with torch.no_grad():
        return model(**batch).logits


def _server_logits(run_dir, batch):
    """The global adapter of the checkpoint in the model the server evaluates it with."""
    ckpt = load_checkpoint(run_dir)
    cfg = runtime.resolve_config(ckpt.config)
    model = build_lora_model(dataclasses.replace(runtime.model_spec(cfg), base_dtype="float32"))
    load_adapter_state(model, ckpt.global_state)
    with torch.no_grad():
        return model.eval()(**batch).logits, ckpt.global_state


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [{"adapter": "vera"}, {"adapter": "dora"},
                                       {"adapter": "c3a", "c3a-block-size": 8},
                                       {"lora-init": "pissa"}, {"lora-init": "olora"}],
                         ids=["vera", "dora", "c3a", "pissa", "olora"])
def test_a_family_runs_and_sends_only_its_keys(tmp_path, custom_task, tiny_model_dir,
                                               overrides):

    log_path = tmp_path / "messages.jsonl"
    cfg = dict(custom_task, **overrides, **{"base-dtype": "float32"})
    run_dir = run_in_process(cfg, num_nodes=4, mods=[_inspect_mod(str(log_path))])
    assert (run_dir / "adapter" / "adapter_config.json").is_file()

    family = get_family(overrides.get("adapter", "lora"))
    events = [json.loads(line) for line in log_path.read_text().splitlines()]
    train = [e for e in events if e["type"] == "train"]
    assert len(train) == 2 * 2 * 2  # rounds x sampled nodes x (down, up)
    head = {"base_model.model.classifier.weight", "base_model.model.classifier.bias"}
    for e in train:
        keys = set(e["arrays"])
        own = keys - head
        assert own and all(k.endswith(family.sends) for k in own), sorted(keys)
        assert {s for s in family.sends for k in own if k.endswith(s)} == set(family.sends)

    # The communication audit: the family's bytes, measured == analytic.
    comms = json.loads((run_dir / "comms.json").read_text())
    up = next(e for e in train if e["direction"] == "up")
    own_bytes = sum(a["bytes"] for k, a in up["arrays"].items() if k not in head)
    assert own_bytes == 4 * sum(int(np.prod(a["shape"])) for k, a in up["arrays"].items()
                                if k not in head)
    assert comms["measured_equals_analytic"]
    assert comms["bytes_per_client_update"] == sum(a["bytes"] for a in up["arrays"].values())
    with open(run_dir / "comms.csv") as f:
        row = next(r for r in csv.DictReader(f) if r["direction"] == "up")
    assert int(row["factor_bytes"]) == own_bytes

    tok = load_tokenizer(str(tiny_model_dir))
    batch = dict(tok(["a fine film", "dull and slow, sadly"], padding=True,
                     return_tensors="pt"))
    server, state = _server_logits(run_dir, batch)
    assert any(np.abs(v).max() > 0 for k, v in state.items() if k not in head)
    plain = _plain_peft_logits(run_dir / "adapter", tiny_model_dir, batch)
    torch.testing.assert_close(plain, server, atol=1e-5, rtol=1e-4)

    with torch.no_grad():
        exported = load_run_model(run_dir).model(**batch).logits
    torch.testing.assert_close(exported, server, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    {"adapter": "c3a", "c3a-block-size": 8, "secure-aggregation": True, "secagg-clip": 0.05},
    {"adapter": "vera", "dp-mode": "client"},
    {"adapter": "dora", "dp-mode": "update"},
], ids=["c3a-secure-aggregation", "vera-client-dp", "dora-update-dp"])
def test_a_family_runs_under_secure_aggregation_and_dp(tmp_path, custom_task, overrides):
    cfg = dict(custom_task, **overrides, **{
        "base-dtype": "float32", "num-server-rounds": 1, "fraction-train": 1.0,
        "fraction-evaluate": 0.0, "target-delta": 1e-3, "local-steps": 1})
    run_dir = run_in_process(cfg, num_nodes=4)
    family = get_family(overrides["adapter"])
    state = load_checkpoint(run_dir).global_state
    own = family.sent_keys(state)
    assert own and load_checkpoint(run_dir).round == 1
    saved = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert {k for k in saved if k.endswith(family.sends)}
    initial = adapter_state(build_lora_model(runtime.model_spec(runtime.resolve_config(
        load_checkpoint(run_dir).config))))
    assert any(not np.array_equal(state[k], initial[k]) for k in own)  # it trained
