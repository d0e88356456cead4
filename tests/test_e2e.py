"""End to end: `flwr run .` on the real packaged model and data, with a small run-config."""

from __future__ import annotations

import json

import numpy as np
import pytest

from .flwr_local import flwr_run, local_flwr

# `flwr run` against the local SuperLink uses its fixed ports: one such run at a time
# (tests.flwr_local.local_flwr holds a lock; with --dist loadfile this module's tests also
# run in one pytest-xdist worker, so none waits for another).
pytestmark = pytest.mark.slow


def _run_to_the_end(tmp_path, run_config: str, run_dir, *, supernodes: int, timeout: int,
                    rounds: int) -> tuple:
    """`flwr run` on the local SuperLink; asserts it finished every round. Returns the run
    folder and its metrics.json."""
    with local_flwr(tmp_path / "flwr-home") as env:
        proc = flwr_run(env, run_config, num_supernodes=supernodes, timeout=timeout)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert f"[round {rounds}/{rounds}]" in log and "done in" in log, log[-4000:]
    return run_dir, json.loads((run_dir / "metrics.json").read_text())


# svd exports the global factors as fedavg does; every aggregator also runs in process
# (tests/test_methods.py).
@pytest.mark.parametrize("aggregator", ["fedavg", "ffa", "stack"])
def test_flwr_run_real_model_writes_results_and_a_loadable_adapter(tmp_path, aggregator):
    out = tmp_path / "results"
    run_config = (f"num-server-rounds=2 local-steps=4 fraction-train=0.5 fraction-evaluate=0.25 "
                  f"lora-rank=4 test-fraction=0.03 aggregator='{aggregator}' "
                  f"output-dir='{out}' run-name='e2e'")
    run_dir, metrics = _run_to_the_end(tmp_path, run_config, out / "e2e", supernodes=4,
                                       timeout=900, rounds=2)
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


# One `flwr run` per adapter family and data-free init, on the tiny model (what crosses the
# wire and the saved adapter against the server's model: tests/test_adapter_families_runs.py).
@pytest.mark.parametrize("overrides", ["adapter='dora'", "adapter='vera'",
                                       "adapter='c3a' c3a-block-size=8", "lora-init='pissa'",
                                       "lora-init='olora'"],
                         ids=["dora", "vera", "c3a", "pissa", "olora"])
def test_flwr_run_trains_each_adapter_family_and_init(tmp_path, custom_task, tiny_model_dir,
                                                      overrides):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "results"
    keys = ("task", "model-path", "data-path", "test-data-path", "labels", "max-length")
    task = " ".join(f"{k}={json.dumps(custom_task[k])}" for k in keys)
    run_config = (f"{task} {overrides} num-server-rounds=1 local-steps=2 batch-size=8 "
                  f"lora-rank=4 lora-alpha=8.0 fraction-train=1.0 fraction-evaluate=0.0 "
                  f"num-partitions=2 base-dtype='float32' output-dir='{out}' run-name='family'")
    run_dir, metrics = _run_to_the_end(tmp_path, run_config, out / "family", supernodes=2,
                                       timeout=600, rounds=1)
    wanted = dict(item.split("=", 1) for item in overrides.split())
    for key, value in wanted.items():
        assert str(metrics["config"][key]) == value.strip("'"), (key, metrics["config"][key])
    assert metrics["rounds"][1]["clients_accepted"] == 2
    assert json.loads((run_dir / "comms.json").read_text())["measured_equals_analytic"]

    # The saved adapter is plain peft: it loads on the base model and answers.
    adapter_config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    family = wanted.get("adapter", "'lora'").strip("'")
    assert adapter_config["peft_type"] == {"dora": "LORA", "lora": "LORA", "vera": "VERA",
                                           "c3a": "C3A"}[family]
    assert adapter_config.get("use_dora", False) == (family == "dora")
    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_model_dir), num_labels=2)
    model = PeftModel.from_pretrained(base, str(run_dir / "adapter")).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[101, 2023, 3185, 102]])).logits
    assert logits.shape == (1, 2) and torch.isfinite(logits).all()
