"""Several clients' adapters trained in one batched pass equal separate trainings."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedlora.adapters import adapter_state, load_adapter_state
from fedlora.data import CausalLMDataset, EncodedDataset, TextDataset, read_table
from fedlora.models import LoraSpec, build_lora_model, load_tokenizer
from fedlora.training import train
from simulations.multi_adapter import train_batched
from tests.conftest import write_reviews
from tests.test_shakespeare import TARGETS, make_tiny_llama


@pytest.fixture(scope="module")
def still_bert(tmp_path_factory):
    """A tiny random BERT without dropout, so that training is deterministic."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from fedlora.tasks import minilm_path

    path = tmp_path_factory.mktemp("still-bert")
    tok = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128,
                        num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    BertForSequenceClassification(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _starts(model, k: int) -> list[dict[str, np.ndarray]]:
    """k different starting adapters (B non-zero, so every factor gets a gradient)."""
    base = adapter_state(model)
    rng = np.random.default_rng(5)
    return [{key: (v + 0.05 * rng.standard_normal(v.shape)).astype(np.float32)
             for key, v in base.items()} for _ in range(k)]


def _sequential(model, starts, data, indices, seeds, **kw):
    states, results = [], []
    for start, d, i, s in zip(starts, data, indices, seeds):
        load_adapter_state(model, start)
        results.append(train(model, d, i, seed=s, **kw))
        states.append(adapter_state(model))
    return states, results


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_batched_classifier_training_equals_separate_trainings(still_bert, tmp_path, optimizer):
    spec = LoraSpec(str(still_bert), 2, 4, 8.0, 0.0, ("query", "value"), True, init_seed=1)
    model = build_lora_model(spec)
    table = read_table(write_reviews(tmp_path / "r.csv", 90), text_column="text",
                       label_column="label", label_names=["negative", "positive"])
    data = EncodedDataset(table, load_tokenizer(str(still_bert)), 24)
    # three clients of different sizes (the last pass of one ends in a short batch)
    indices = [np.arange(0, 30), np.arange(30, 50), np.arange(50, 90)]
    starts, seeds = _starts(model, 3), [11, 12, 13]
    kw = dict(steps=5, batch_size=8, learning_rate=0.05, weight_decay=0.01,
              optimizer=optimizer)
    expected, expected_results = _sequential(model, starts, [data] * 3, indices, seeds, **kw)
    got, results = train_batched(model, starts, [data] * 3, indices, seeds=seeds, **kw)
    for e, g, s in zip(expected, got, starts):
        assert e.keys() == g.keys()
        assert any(not np.allclose(s[k], g[k]) for k in g)  # it trained
        for key in e:
            np.testing.assert_allclose(g[key], e[key], rtol=1e-4, atol=1e-5, err_msg=key)
    for e, r in zip(expected_results, results):
        assert r.steps == e.steps and r.examples == e.examples
        assert r.loss == pytest.approx(e.loss, rel=1e-4)
    # the model's own layers work as before (the batched forwards are gone)
    load_adapter_state(model, expected[0])
    batch = data.collate(np.arange(4))
    model.eval()
    with torch.no_grad():
        a = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert a.shape == (4, 2)


def test_batched_causal_lm_training_equals_separate_trainings(tmp_path):
    path = make_tiny_llama(tmp_path / "llama")
    spec = LoraSpec(model_path=str(path), num_labels=0, rank=4, alpha=8.0, dropout=0.0,
                    target_modules=TARGETS, train_head=False, causal_lm=True)
    model = build_lora_model(spec)
    words = "the king is dead long live the king who is there stand and unfold".split()
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(words, size=int(rng.integers(3, 12)))) for _ in range(40)]
    data = CausalLMDataset(TextDataset(texts, np.zeros(40, dtype=np.int64), [""] * 40, ()),
                           load_tokenizer(str(path)), 16)
    indices = [np.arange(0, 20), np.arange(20, 40)]
    starts, seeds = _starts(model, 2), [3, 4]
    kw = dict(steps=4, batch_size=6, learning_rate=0.02)
    expected, _ = _sequential(model, starts, [data] * 2, indices, seeds, **kw)
    got, results = train_batched(model, starts, [data] * 2, indices, seeds=seeds, **kw)
    for e, g in zip(expected, got):
        for key in e:
            np.testing.assert_allclose(g[key], e[key], rtol=1e-4, atol=1e-5, err_msg=key)
    assert all(np.isfinite(r.loss) for r in results)


def test_bad_calls_are_refused(still_bert):
    spec = LoraSpec(str(still_bert), 2, 4, 8.0, 0.0, ("query", "value"), True)
    model = build_lora_model(spec)
    state = adapter_state(model)
    with pytest.raises(ValueError, match="one state, dataset, index list and seed per client"):
        train_batched(model, [state, state], [None], [[0]], seeds=[0], steps=1, batch_size=1,
                      learning_rate=0.1)
    with pytest.raises(ValueError, match="one state"):
        train_batched(model, [], [], [], seeds=[], steps=1, batch_size=1, learning_rate=0.1)


@pytest.mark.slow
def test_benchmark_runs_on_the_real_model(tmp_path, capsys):
    import json

    from simulations import bench_multi_adapter

    out = tmp_path / "bench"
    assert bench_multi_adapter.main(["--clients", "1,2", "--steps", "1", "--batch-size", "8",
                                     "--repeats", "1", "--out", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())
    assert [r["clients"] for r in result["rows"]] == [1, 2]
    assert all(r["sequential_s"] > 0 and r["batched_s"] > 0 and r["ratio"] > 0
               for r in result["rows"])
    assert "| 2 |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--steps must be >= 1"):
        bench_multi_adapter.main(["--steps", "0", "--out", str(out)])
