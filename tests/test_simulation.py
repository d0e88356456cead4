"""In-process Flower simulations on a tiny model: what crosses the wire, and the results."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest


def _inspect_mod(log_path: str):
    """A client mod that writes, for every message in and out, its array keys and bytes."""

    def mod(msg, context, call_next):
        def describe(m, direction):
            rec = m.content.array_records
            arrays = {k: {"shape": list(a.shape), "dtype": a.dtype, "bytes": len(a.data)}
                      for r in rec.values() for k, a in r.items()}
            with open(log_path, "a") as f:
                f.write(json.dumps({"direction": direction, "type": m.metadata.message_type,
                                    "records": sorted(m.content.keys()),
                                    "arrays": arrays}) + "\n")

        describe(msg, "down")
        reply = call_next(msg, context)
        describe(reply, "up")
        return reply

    return mod


def run_in_process(overrides: dict, num_nodes: int, mods=None, node_ranks=None) -> Path:
    from simulations.harness import run_inprocess

    return run_inprocess(overrides, num_nodes=num_nodes, mods=mods, node_ranks=node_ranks,
                         total_cpus=2)


@pytest.mark.slow
def test_only_adapter_factors_cross_the_wire(tmp_path, custom_task, tiny_model_dir):
    log_path = tmp_path / "messages.jsonl"
    overrides = dict(custom_task, **{"train-head": False})
    run_in_process(overrides, num_nodes=4, mods=[_inspect_mod(str(log_path))])

    # Independent count of the factor bytes from the model itself.
    from fedlora.models import LoraSpec, build_lora_model

    model = build_lora_model(LoraSpec(str(tiny_model_dir), 2, 4, 8.0, 0.0, ("query", "value"),
                                      False))
    expected_bytes = 0
    for _, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            expected_bytes += 4 * (module.in_features + module.out_features) * 4  # r=4, float32
    base_names = {n for n, _ in model.named_parameters() if "lora_" not in n}

    events = [json.loads(line) for line in log_path.read_text().splitlines()]
    train = [e for e in events if e["type"] == "train"]
    assert len(train) == 2 * 2 * 2  # rounds x sampled nodes x (down, up)
    for e in train:
        keys = set(e["arrays"])
        assert keys and all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys), keys
        assert not keys & base_names
        assert sum(a["bytes"] for a in e["arrays"].values()) == expected_bytes
    ups = [e for e in events if e["direction"] == "up" and e["type"] == "evaluate"]
    assert ups and all(not e["arrays"] for e in ups)  # evaluation replies carry metrics only

    run_dir = Path(custom_task["output-dir"]) / "tiny"
    comms = json.loads((run_dir / "comms.json").read_text())
    assert comms["measured_equals_analytic"] and comms["bytes_per_client_update"] == expected_bytes


@pytest.mark.slow
def test_results_folder_and_adapter_reload(custom_task):
    run_in_process(custom_task, num_nodes=4)
    run_dir = Path(custom_task["output-dir"]) / "tiny"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    rounds = metrics["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert all(r["clients_accepted"] == 2 and r["clients_refused"] == 0 for r in rounds[1:])
    csv_lines = (run_dir / "metrics.csv").read_text().splitlines()
    assert csv_lines[0].startswith("round,train_loss,test_loss,test_accuracy") and len(csv_lines) == 4
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()

    # The saved adapter, loaded with plain peft, reproduces the reported test accuracy.
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fedlora.data import read_table

    base = AutoModelForSequenceClassification.from_pretrained(custom_task["model-path"], num_labels=2)
    model = PeftModel.from_pretrained(base, str(run_dir / "adapter")).eval()
    tok = AutoTokenizer.from_pretrained(custom_task["model-path"])
    test = read_table(custom_task["test-data-path"], text_column="text", label_column="label",
                      label_names=("negative", "positive"))
    with torch.no_grad():
        enc = tok(test.texts, padding=True, truncation=True, max_length=16, return_tensors="pt")
        pred = model(**enc).logits.argmax(-1).numpy()
    assert np.mean(pred == test.labels) == pytest.approx(rounds[-1]["test_accuracy"], abs=1e-9)


@pytest.mark.slow
def test_news_task_learns_topics_in_two_rounds(tmp_path):
    # Real all-MiniLM-L6-v2 on real BBC News articles, 4 clients, 2 rounds of 6 steps.
    overrides = {
        "task": "news", "num-server-rounds": 2, "local-steps": 6, "batch-size": 16,
        "learning-rate": 0.005, "max-length": 48, "fraction-train": 0.5,
        "fraction-evaluate": 0.0, "num-partitions": 4, "output-dir": str(tmp_path / "results"),
        "run-name": "news",
    }
    run_dir = run_in_process(overrides, num_nodes=4)
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    first, last = rounds[0], rounds[-1]
    # Measured: test accuracy 0.22 -> 0.42 -> 0.81 (5 topics, chance 0.2), test loss 1.61 -> 0.93.
    assert last["test_accuracy"] > 0.5
    assert last["test_accuracy"] > first["test_accuracy"] + 0.25
    assert last["test_loss"] < first["test_loss"]
