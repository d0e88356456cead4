"""DP-SGD's logical batch taken in physical chunks is the same mechanism, exactly.

With the same randomness (Poisson coins and noise), a logical batch of 64 taken as chunks of
8 must give the same clipped sum and the same release as one physical batch of 64: the
chunks only bound memory. Classifier and causal LM.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from .conftest import write_reviews


@pytest.fixture()
def same_randomness(monkeypatch):
    """Poisson coins and noise from fixed seeds (tests only: the real ones are OS entropy)."""
    from fedlora import entropy

    def seeded(seed: int):
        monkeypatch.setattr(entropy, "private_numpy_rng",
                            lambda: np.random.Generator(np.random.PCG64(seed)))

        def gen(device="cpu"):
            g = torch.Generator(device=torch.device(device))
            g.manual_seed(seed)
            return g

        monkeypatch.setattr(entropy, "private_torch_generator", gen)

    return seeded


def _classifier(tiny_model_dir, tmp_path):
    from fedlora.data import EncodedDataset, read_table
    from fedlora.models import LoraSpec, build_lora_model, load_tokenizer

    data = read_table(write_reviews(tmp_path / "r.csv", 80, seed=1), text_column="text",
                      label_column="label", label_names=("negative", "positive"))
    enc = EncodedDataset(data, load_tokenizer(str(tiny_model_dir)), 24)
    spec = LoraSpec(str(tiny_model_dir), 2, 4, 8.0, 0.1, ("query", "value"), True,
                    pooling="mean")
    return (lambda: build_lora_model(spec)), enc


def _causal_lm(tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from fedlora.data import CausalLMDataset, TextDataset
    from fedlora.models import LoraSpec, build_lora_model, load_tokenizer
    from fedlora.tasks import minilm_path

    path = tmp_path / "tiny-llama"
    tok = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=tok.vocab_size, hidden_size=16,
                                 intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1,
                                 max_position_embeddings=64)).save_pretrained(path)
    tok.save_pretrained(path)
    texts = [f"the play was {'very ' * (i % 5)}good and then act {i} began" for i in range(80)]
    data = TextDataset(texts, np.zeros(80, dtype=np.int64), [""] * 80, ())
    enc = CausalLMDataset(data, load_tokenizer(str(path)), 24)
    spec = LoraSpec(str(path), 0, 4, 8.0, 0.1, ("q_proj", "v_proj"), False, causal_lm=True)
    return (lambda: build_lora_model(spec)), enc


@pytest.mark.parametrize("kind", ["classifier", "causal-lm"])
def test_a_logical_batch_in_chunks_releases_what_one_physical_batch_does(
        tiny_model_dir, tmp_path, same_randomness, kind):
    from fedlora.adapters import adapter_state
    from fedlora.dp_sgd import train_private

    make, enc = _classifier(tiny_model_dir, tmp_path) if kind == "classifier" \
        else _causal_lm(tmp_path)

    def release(seed: int, physical: int | None) -> dict[str, np.ndarray]:
        same_randomness(seed)
        model = make()
        result = train_private(model, enc, np.arange(80), steps=2, batch_size=64,
                               learning_rate=0.5, noise_multiplier=0.3, max_grad_norm=0.1,
                               optimizer="sgd", sample_rate=0.8, expected_batch_size=64,
                               max_physical_batch_size=physical)
        assert result.examples > 64  # two Poisson batches of about 64 examples
        return adapter_state(model)

    whole, chunks, other = release(7, None), release(7, 8), release(8, 8)
    assert set(whole) == set(chunks)
    for k in whole:
        np.testing.assert_allclose(chunks[k], whole[k], rtol=1e-5, atol=1e-6, err_msg=k)
    # The randomness is what the comparison holds fixed: another draw gives another release.
    assert any(not np.allclose(other[k], whole[k], atol=1e-4) for k in whole)


def test_the_physical_bound_is_a_run_config_key_that_names_itself():
    from fedlora.config import ConfigError
    from fedlora.runtime import parse_run_config

    assert parse_run_config({"max-physical-batch-size": 16}).max_physical_batch_size == 16
    with pytest.raises(ConfigError, match="max-physical-batch-size"):
        parse_run_config({"max-physical-batch-size": 0})
