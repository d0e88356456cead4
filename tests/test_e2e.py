"""End to end: `flwr run .` on the real packaged model and data, with a small run-config."""

from __future__ import annotations

import json

import numpy as np
import pytest

from .flwr_local import flwr_run, local_flwr

# `flwr run` against the local SuperLink uses its fixed ports: one such run at a time, so
# every test here runs in the same pytest-xdist worker.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("local-superlink")]


# svd exports the global factors as fedavg does; every aggregator also runs in process
# (tests/test_methods.py).
@pytest.mark.parametrize("aggregator", ["fedavg", "ffa", "stack"])
def test_flwr_run_real_model_writes_results_and_a_loadable_adapter(tmp_path, aggregator):
    out = tmp_path / "results"
    run_config = (f"num-server-rounds=2 local-steps=4 fraction-train=0.5 fraction-evaluate=0.25 "
                  f"lora-rank=4 test-fraction=0.03 aggregator='{aggregator}' "
                  f"output-dir='{out}' run-name='e2e'")
    with local_flwr(tmp_path / "flwr-home") as env:
        proc = flwr_run(env, run_config, num_supernodes=4, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "[round 2/2]" in log and "done in" in log, log[-4000:]

    run_dir = out / "e2e"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    rounds = metrics["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert metrics["config"]["lora-rank"] == 4  # the run-config override took effect
    assert metrics["config"]["aggregator"] == aggregator
    assert all(r["clients_accepted"] == 2 for r in rounds[1:])
    for name in ("metrics.csv", "comms.csv", "comms.json", "config.json",
                 "adapter/adapter_config.json", "adapter/adapter_model.safetensors"):
        assert (run_dir / name).is_file(), name

    # Load the adapter with plain peft + transformers and re-evaluate on the held-out movies.
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fedlora.runtime import parse_run_config
    from fedlora.tasks import load_task_data, minilm_path

    base = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    model = PeftModel.from_pretrained(base, str(run_dir / "adapter")).eval()
    tok = AutoTokenizer.from_pretrained(minilm_path())
    test = load_task_data(parse_run_config({"test-fraction": 0.03})).test
    preds = []
    with torch.no_grad():
        for i in range(0, len(test), 64):
            enc = tok(test.texts[i:i + 64], padding=True, truncation=True, max_length=64,
                      return_tensors="pt")
            preds.append(model(**enc).logits.argmax(-1).numpy())
    accuracy = float(np.mean(np.concatenate(preds) == test.labels))
    # Same adapter, same examples; only padding differs from the server's batches.
    assert accuracy == pytest.approx(rounds[-1]["test_accuracy"], abs=1.5 / len(test))
