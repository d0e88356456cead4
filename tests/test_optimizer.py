"""The local optimiser choice (run-config ``optimizer``), private and not."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedlora.adapters import adapter_state
from fedlora.config import ConfigError
from fedlora.data import EncodedDataset, read_table
from fedlora.dp_sgd import train_private
from fedlora.models import LoraSpec, build_lora_model, load_tokenizer
from fedlora.runtime import parse_run_config
from fedlora.training import make_optimizer, train
from tests.conftest import write_reviews


def test_optimizer_key_and_factory():
    assert parse_run_config({}).optimizer == "adamw"
    assert parse_run_config({"optimizer": "sgd"}).optimizer == "sgd"
    with pytest.raises(ConfigError, match="'optimizer'"):
        parse_run_config({"optimizer": "adam"})
    p = [torch.nn.Parameter(torch.zeros(2))]
    assert isinstance(make_optimizer("adamw", p, learning_rate=0.1, weight_decay=0.0),
                      torch.optim.AdamW)
    sgd = make_optimizer("sgd", p, learning_rate=0.1, weight_decay=0.0)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.9
    with pytest.raises(ValueError, match="unknown optimizer"):
        make_optimizer("lbfgs", p, learning_rate=0.1, weight_decay=0.0)


@pytest.mark.parametrize("private", [False, True])
def test_sgd_trains_only_the_adapter(tiny_model_dir, tmp_path, private):
    model = build_lora_model(LoraSpec(str(tiny_model_dir), 2, 4, 8.0, 0.0, ("query", "value"),
                                      True))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = adapter_state(model)
    table = read_table(write_reviews(tmp_path / "r.csv", 64), text_column="text",
                       label_column="label", label_names=["negative", "positive"])
    data = EncodedDataset(table, load_tokenizer(str(tiny_model_dir)), 16)
    kwargs = dict(steps=3, batch_size=16, learning_rate=0.05, optimizer="sgd")
    if private:
        train_private(model, data, np.arange(64), noise_multiplier=0.5, max_grad_norm=1.0,
                      **kwargs)
    else:
        train(model, data, np.arange(64), **kwargs)
    after = adapter_state(model)
    assert any(k.endswith("lora_B.weight") and not np.array_equal(before[k], after[k])
               for k in before)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
