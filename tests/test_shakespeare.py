"""The causal-LM task ``shakespeare``: parsing the plays, the model cache, the LM path.

Unit tests run on a tiny random Llama; the tests marked slow convert the real packaged
SmolLM2-135M (into a temporary cache) and run one federated round on it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fedlora.adapters import adapter_state, is_factor_key
from fedlora.config import ConfigError
from fedlora.data import (
    CausalLMDataset,
    TextDataset,
    partition_natural,
    split_within_groups,
)
from fedlora.dp_sgd import train_private
from fedlora.model_cache import SOURCE_FILE, cached_folder
from fedlora.models import LoraSpec, build_lora_model, load_tokenizer
from fedlora.runtime import model_spec, resolve_config
from fedlora.tasks import LLAMA_TARGETS, parse_play
from fedlora.tasks.shakespeare import _shakespeare_rows
from fedlora.training import evaluate, train

TARGETS = tuple(LLAMA_TARGETS.split(","))

PLAY = """# A Play

## ACT I

### SCENE I. A room.

_Enter HAMLET and HORATIO, with
others attending_

**HAMLET**  
Who's there?  
__\\[Aside]_  
Stand, and unfold yourself.

_Exit HORATIO_

The rest of the speech,  
after a direction.

**HORATIO**  
[To HAMLET]_  
My lord.  
*Exit.*

### SCENE II. Another room.

Prose under no speaker is not a speech.

**HAMLET**  
Again.
"""


def test_parse_play_reads_speeches_and_drops_directions():
    speeches = parse_play(PLAY)
    assert speeches == [
        ("HAMLET", ["Who's there?", "Stand, and unfold yourself.", "The rest of the speech,",
                    "after a direction."]),
        ("HORATIO", ["My lord."]),
        ("HAMLET", ["Again."]),
    ]


def test_real_plays_give_the_leaf_roles():
    rows = _shakespeare_rows()
    roles = sorted(set(rows.groups))
    # FACTS.md: 1,426 roles, 460 with >= 50 lines (the count depends a little on how
    # stage directions inside speeches are read).
    assert 440 <= len(roles) <= 480
    assert "hamlet/HAMLET" in roles and "othello/IAGO" in roles
    assert all(g.count("/") == 1 for g in roles)
    assert all(0 < t.count("\n") + 1 <= 4 for t in rows.texts)
    for marker in ("**", "_", "[", "\\"):
        assert not any(marker in t for t in rows.texts), marker
    lines = {}
    for t, g in zip(rows.texts, rows.groups):
        lines[g] = lines.get(g, 0) + t.count("\n") + 1
    assert min(lines.values()) >= 50
    assert lines["hamlet/HAMLET"] > 1000


def test_split_within_groups_keeps_every_group_on_both_sides():
    groups = ["a"] * 10 + ["b"] * 3 + ["c"] * 2
    train_idx, test_idx = split_within_groups(groups, 0.2, seed=1)
    assert sorted(np.concatenate([train_idx, test_idx]).tolist()) == list(range(15))
    test_groups = [groups[i] for i in test_idx]
    assert test_groups.count("a") == 2 and test_groups.count("b") == 1
    assert test_groups.count("c") == 1
    again = split_within_groups(groups, 0.2, seed=1)
    assert np.array_equal(again[1], test_idx)


def test_one_natural_partition_per_role():
    rows = _shakespeare_rows()
    roles = sorted(set(rows.groups))
    parts = partition_natural(rows.groups, len(roles), seed=0)
    assert all(len({rows.groups[i] for i in p}) == 1 for p in parts)


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def make_tiny_llama(path: Path) -> Path:
    """A 2-layer, 32-wide random Llama with MiniLM's tokenizer, saved as a local folder."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from fedlora.tasks import minilm_path

    tok = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, tie_word_embeddings=True,
                         initializer_range=0.2,  # frozen tied embeddings that can still fit
                         pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_task_defaults_apply_only_to_keys_left_at_the_global_default(tiny_llama_dir):
    base = {"task": "shakespeare", "model-path": str(tiny_llama_dir)}
    cfg = resolve_config(base)
    assert tuple(cfg.target_modules) == TARGETS and cfg.max_test_examples == 128
    mine = resolve_config({**base, "lora-target-modules": "q_proj,v_proj",
                           "max-test-examples": 16})
    assert mine.target_modules == ["q_proj", "v_proj"] and mine.max_test_examples == 16
    other = resolve_config({"task": "rotten-tomatoes"})
    assert other.target_modules == ["query", "value"] and other.max_test_examples == 0
    spec = model_spec(cfg)
    assert spec.causal_lm and not spec.train_head  # train-head = true has no head to train
    assert spec.target_modules == TARGETS


def test_dirichlet_is_refused_for_a_causal_lm():
    with pytest.raises(ConfigError, match="partitioner") as e:
        resolve_config({"task": "shakespeare", "partitioner": "dirichlet"})
    assert e.value.key == "partitioner"
    assert resolve_config({"task": "shakespeare", "partitioner": "iid"}).partitioner == "iid"


def _texts(n: int) -> TextDataset:
    words = ["to", "be", "or", "not", "that", "is", "the", "question", "whether", "tis", "nobler", "in", "mind"]
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(words, size=rng.integers(3, 9))) for _ in range(n)]
    return TextDataset(texts, np.zeros(n, dtype=np.int64), ["r"] * n, ())


def test_causal_batches_mask_padding_in_the_labels(tiny_llama_dir):
    tok = load_tokenizer(str(tiny_llama_dir))
    data = CausalLMDataset(TextDataset(["a b c d e", "a"], np.zeros(2, np.int64), ["r"] * 2, ()),
                           tok, max_length=16)
    batch = data.collate([0, 1])
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert torch.equal(labels[mask == 1], ids[mask == 1])
    assert (labels[mask == 0] == -100).all() and (mask == 0).any()


def _tiny_spec(path: Path, **kw) -> LoraSpec:
    return LoraSpec(model_path=str(path), num_labels=0, rank=4, alpha=8.0, dropout=0.0,
                    target_modules=TARGETS, train_head=False, causal_lm=True, **kw)


def test_lora_on_the_seven_projections_and_nothing_else_trains(tiny_llama_dir):
    model = build_lora_model(_tiny_spec(tiny_llama_dir))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    state = adapter_state(model)
    assert all(is_factor_key(k) for k in state)
    modules = {k.split(".")[-3] for k in state}
    assert modules == set(TARGETS)
    assert len(state) == 2 * len(TARGETS) * 2  # layers x projections x (A, B)
    with pytest.raises(ValueError, match="train-head"):
        build_lora_model(dataclasses.replace(_tiny_spec(tiny_llama_dir), train_head=True))


def test_next_token_training_lowers_loss_and_perplexity(tiny_llama_dir):
    model = build_lora_model(_tiny_spec(tiny_llama_dir))
    data = CausalLMDataset(_texts(32), load_tokenizer(str(tiny_llama_dir)), max_length=16)
    before = evaluate(model, data, batch_size=8)
    assert before.perplexity == pytest.approx(math.exp(before.loss))
    assert 0 <= before.accuracy <= 1 and before.examples == 32
    # A random model predicts about uniformly over the vocabulary.
    assert abs(before.loss - math.log(model.config.vocab_size)) < 2.0
    result = train(model, data, np.arange(32), steps=30, batch_size=8, learning_rate=0.05)
    after = evaluate(model, data, batch_size=8)
    assert result.steps == 30 and math.isfinite(result.loss)
    assert after.loss < before.loss - 0.5 and after.perplexity < before.perplexity


def test_evaluation_does_not_depend_on_the_batch_size(tiny_llama_dir):
    model = build_lora_model(_tiny_spec(tiny_llama_dir))
    data = CausalLMDataset(_texts(12), load_tokenizer(str(tiny_llama_dir)), max_length=16)
    one, many = evaluate(model, data, batch_size=1), evaluate(model, data, batch_size=12)
    assert one.loss == pytest.approx(many.loss, rel=1e-5)
    assert one.accuracy == pytest.approx(many.accuracy)


def test_dp_sgd_updates_the_lora_factors_of_a_causal_lm(tiny_llama_dir):
    model = build_lora_model(_tiny_spec(tiny_llama_dir))
    data = CausalLMDataset(_texts(32), load_tokenizer(str(tiny_llama_dir)), max_length=16)
    start = adapter_state(model)
    result = train_private(model, data, np.arange(32), steps=2, batch_size=8,
                           learning_rate=0.01, noise_multiplier=1.0, max_grad_norm=1.0)
    end = adapter_state(model)
    assert result.steps == 2 and math.isfinite(result.loss)
    changed = [k for k in start if not np.array_equal(start[k], end[k])]
    assert any(k.endswith(".lora_B.weight") for k in changed)
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())


# --- the model cache --------------------------------------------------------------------


def _writer(calls: list, delay: float = 0.0):
    def build(out: Path) -> None:
        calls.append(out)
        time.sleep(delay)
        (out / "config.json").write_text("{}")

    return build


def test_cache_builds_once_and_atomically(tmp_path):
    calls: list = []
    folders: list = []
    threads = [threading.Thread(target=lambda: folders.append(
        cached_folder("m", {"v": 1}, _writer(calls, 0.2), root=tmp_path))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(folders)) == 1
    target = folders[0]
    assert target == tmp_path / "m" and (target / "config.json").is_file()
    assert json.loads((target / SOURCE_FILE).read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == ["m"]  # no temporary left
    # Same source: read from the cache; another source: rebuilt in place.
    cached_folder("m", {"v": 1}, _writer(calls), root=tmp_path)
    assert len(calls) == 1
    cached_folder("m", {"v": 2}, _writer(calls), root=tmp_path)
    assert len(calls) == 2 and json.loads((target / SOURCE_FILE).read_text()) == {"v": 2}


def test_a_failed_build_leaves_no_cache_and_stale_temporaries_go(tmp_path):
    def broken(out: Path) -> None:
        (out / "config.json").write_text("{")
        raise RuntimeError("killed half-way")

    with pytest.raises(RuntimeError, match="half-way"):
        cached_folder("m", {"v": 1}, broken, root=tmp_path)
    assert not (tmp_path / "m").exists()
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]
    (tmp_path / ".m.tmp-crashed").mkdir()  # what a killed process leaves behind
    with pytest.raises(RuntimeError, match="no"):
        cached_folder("m", {"v": 1}, lambda out: None, required=("model.safetensors",),
                      root=tmp_path)
    assert not (tmp_path / ".m.tmp-crashed").exists() and not (tmp_path / "m").exists()


# --- the real model (slow) ------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_is_converted_once_then_read_from_the_cache(smollm2_cache, monkeypatch):
    from fedlora import model_cache
    from fedlora.tasks import smollm2_path

    t0 = time.perf_counter()
    path = Path(smollm2_path())
    first = time.perf_counter() - t0
    assert path.parent == smollm2_cache
    assert (path / "model.safetensors").stat().st_size > 400e6  # float32, 134.5M params

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again instead of reading the cache")

    monkeypatch.setattr(model_cache, "convert_gguf", no_conversion)
    t0 = time.perf_counter()
    assert Path(smollm2_path()) == path
    model = build_lora_model(LoraSpec(str(path), 0, 4, 8.0, 0.0, TARGETS, False,
                                      causal_lm=True))
    cached = time.perf_counter() - t0
    print(f"SmolLM2: first call {first:.1f} s (the conversion, unless an earlier test made "
          f"it), cached load + LoRA {cached:.1f} s")
    state = adapter_state(model)
    assert len(state) == 30 * len(TARGETS) * 2 and all(is_factor_key(k) for k in state)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == sum(v.size for v in state.values())


# sum over the 7 projections of (d_in + d_out) in one SmolLM2-135M layer (hidden 576,
# 3 of 9 heads for k/v, MLP 1536), times 30 layers
SMOLLM2_FACTOR_WIDTH = 30 * (2 * 1152 + 2 * 768 + 3 * 2112)


# One cheap federated round of the real task: 2 sites, 2 steps of 2 texts of <= 16 tokens.
SMOLLM2_SHORT_RUN = {
    "task": "shakespeare", "num-server-rounds": 1, "local-steps": 2, "batch-size": 2,
    "learning-rate": 0.01, "lora-rank": 4, "lora-alpha": 8.0, "max-length": 16,
    "fraction-train": 1.0, "fraction-evaluate": 0.0, "num-partitions": 2,
    "max-test-examples": 8, "eval-batch-size": 8,
}


@pytest.mark.slow
def test_one_federated_round_on_smollm2_reports_perplexity(tmp_path, smollm2_cache):
    from .test_simulation import run_in_process
    overrides = {**SMOLLM2_SHORT_RUN, "output-dir": str(tmp_path / "results"),
                 "run-name": "shakespeare"}
    t0 = time.perf_counter()
    run_dir = run_in_process(overrides, num_nodes=2)
    wall = time.perf_counter() - t0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    rounds = metrics["rounds"]
    assert [r["round"] for r in rounds] == [0, 1]
    before, after = rounds[0]["test_perplexity"], rounds[1]["test_perplexity"]
    print(f"SmolLM2 one round: {wall:.1f} s, test perplexity {before:.2f} -> {after:.2f}")
    assert math.isfinite(before) and 1 < after < before  # measured: 468.75 -> 259.74
    assert rounds[1]["test_perplexity"] == pytest.approx(math.exp(rounds[1]["test_loss"]))
    assert rounds[1]["clients_accepted"] == 2 and math.isfinite(rounds[1]["train_loss"])
    header = (run_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[-2:] == ["test_perplexity", "fed_eval_perplexity"]
    comms = json.loads((run_dir / "comms.json").read_text())
    assert comms["bytes_per_client_update"] == 4 * SMOLLM2_FACTOR_WIDTH * 4  # r=4, float32
    adapter = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert set(adapter["target_modules"]) == set(TARGETS)
    assert adapter["task_type"] == "CAUSAL_LM"


def test_causal_lm_site_files_are_read_as_texts(tmp_path):
    from fedlora.data import DataError, read_texts

    txt = tmp_path / "site.txt"
    txt.write_text("Who's there?\nStand, and unfold yourself.\n\n\nLong live the king!\r\n"
                   "\r\n  \n  He is welcome.\n")
    assert read_texts(txt, text_column="text").texts == [
        "Who's there?\nStand, and unfold yourself.", "Long live the king!", "He is welcome."]
    rows = tmp_path / "site.jsonl"
    rows.write_text(json.dumps({"line": "Peace, break thee off."}) + "\n")
    data = read_texts(rows, text_column="line")
    assert data.texts == ["Peace, break thee off."] and data.labels.tolist() == [0]
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n")
    for path, column, message in [(blank, "text", "holds no text"),
                                  (rows, "text", "no column 'text'"),
                                  (tmp_path / "none.txt", "text", "not found")]:
        with pytest.raises(DataError, match=message):
            read_texts(path, text_column=column)


@pytest.mark.slow
def test_sites_train_the_causal_lm_on_their_own_text(tiny_llama_dir, tmp_path):
    from simulations.harness import node_config_mod, read_metrics, run_inprocess

    speeches = ["Who's there?\nNay, answer me.", "Long live the king!", "He is welcome.",
                "Look where it comes again.", "Peace, break thee off.", "It is a nipping air."]
    txt = tmp_path / "site0.txt"
    txt.write_text("\n\n".join(speeches) + "\n")
    jsonl = tmp_path / "site1.jsonl"
    jsonl.write_text("".join(json.dumps({"text": s}) + "\n" for s in speeches))
    blank = tmp_path / "site2.txt"
    blank.write_text("\n\n")
    site = {0: txt, 1: jsonl, 2: blank}
    mod = node_config_mod(lambda pid: {"data-path": str(site[pid])})
    overrides = {"task": "shakespeare", "model-path": str(tiny_llama_dir), "max-length": 16,
                 "num-server-rounds": 1, "fraction-train": 1.0, "fraction-evaluate": 0.0,
                 "local-steps": 2, "batch-size": 2, "max-test-examples": 8,
                 "lora-rank": 4, "lora-alpha": 8.0,
                 "output-dir": str(tmp_path / "results"), "run-name": "sites"}
    run_dir = run_inprocess(overrides, num_nodes=3, mods=[mod], total_cpus=2)
    last = read_metrics(run_dir)["rounds"][-1]
    assert last["round"] == 1 and last["clients_accepted"] == 2
    assert [x["reason"] for x in last["refused"]] == [
        f"could-not-train: {blank}: the file holds no text"]
    assert math.isfinite(last["test_perplexity"])
