"""Device selection: the CPU here, a GPU where torch sees one (checked only there)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedlora.adapters import adapter_state
from fedlora.config import ConfigError
from fedlora.models import LoraSpec, build_lora_model, resolve_device
from fedlora.runtime import parse_run_config

GPU = torch.cuda.is_available()


def test_device_key_is_validated():
    assert parse_run_config({}).device == "auto"
    for ok in ("auto", "cpu", "cuda", "cuda:0"):
        assert parse_run_config({"device": ok}).device == ok
    for bad in ("gpu", "cuda:", "cuda:x", ""):
        with pytest.raises(ConfigError, match="'device'"):
            parse_run_config({"device": bad})


def test_auto_is_the_gpu_when_there_is_one():
    assert resolve_device("auto") == ("cuda" if GPU else "cpu")
    assert resolve_device("cpu") == "cpu"


@pytest.mark.skipif(GPU, reason="this machine has a GPU")
def test_asking_for_a_missing_gpu_names_the_key():
    with pytest.raises(ConfigError, match="'device'.*sees no GPU"):
        resolve_device("cuda")


def _spec(tiny_model_dir, device):
    return LoraSpec(str(tiny_model_dir), 2, 4, 8.0, 0.0, ("query", "value"), True,
                    init_seed=3, device=device)


@pytest.mark.skipif(not GPU, reason="needs a GPU")
def test_gpu_model_starts_from_the_same_adapter_and_trains(tiny_model_dir, tmp_path):
    from fedlora.data import EncodedDataset, read_table
    from fedlora.models import load_tokenizer
    from fedlora.training import evaluate, train
    from tests.conftest import write_reviews

    cpu, gpu = build_lora_model(_spec(tiny_model_dir, "cpu")), \
        build_lora_model(_spec(tiny_model_dir, "cuda"))
    a, b = adapter_state(cpu), adapter_state(gpu)
    assert all(np.array_equal(a[k], b[k]) for k in a)  # same seeded init on every party
    assert all(p.device.type == "cuda" for p in gpu.parameters())
    table = read_table(write_reviews(tmp_path / "r.csv", 64), text_column="text",
                       label_column="label", label_names=["negative", "positive"])
    data = EncodedDataset(table, load_tokenizer(str(tiny_model_dir)), 16)
    train(gpu, data, np.arange(64), steps=3, batch_size=16, learning_rate=0.01)
    after = adapter_state(gpu)
    assert any(not np.array_equal(a[k], after[k]) for k in a)
    assert np.isfinite(evaluate(gpu, data).loss)
