"""`fedlora export` of short real runs on the packaged models (slow): the merged export,
loaded by transformers alone, measures the run's own test sample as the run did."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
import torch

from fedlora import runtime
from fedlora.cli import main
from fedlora.predict import Predictor

from .test_export import _logits
from .test_shakespeare import SMOLLM2_SHORT_RUN
from .test_simulation import run_in_process


def _test_texts(run) -> list[str]:
    """The run's centralised test sample (what its rounds were scored on)."""
    cfg = runtime.resolve_config(json.loads((run / "config.json").read_text()))
    return list(runtime.encoded_test_set(cfg).data.texts)


@pytest.mark.slow
def test_export_of_a_real_run_predicts_what_the_run_measured(tmp_path, capsys):
    """A short run of the default task on the real packaged model; its merged export,
    loaded by transformers alone, scores the run's own centralised test sample as the
    run's last round did, text by text as the run's model does."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    overrides = {"num-server-rounds": 1, "local-steps": 2, "batch-size": 8, "lora-rank": 4,
                 "fraction-train": 1.0, "fraction-evaluate": 0.0, "test-fraction": 0.03,
                 "max-test-examples": 48, "base-dtype": "float32", "num-partitions": 2,
                 "output-dir": str(tmp_path / "results"), "run-name": "real"}
    run = run_in_process(overrides, num_nodes=2)
    final = json.loads((run / "metrics.json").read_text())["rounds"][-1]["test_accuracy"]
    test = runtime.encoded_test_set(runtime.resolve_config(json.loads(
        (run / "config.json").read_text()))).data
    assert len(test) == 48

    out = tmp_path / "merged"
    assert main(["export", str(run), str(out), "--merged"]) == 0
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    texts = list(test.texts)
    preds = _logits(model, tok, texts, max_length=tok.model_max_length).argmax(-1).numpy()
    assert preds.tolist() == Predictor.load(run).logits(texts).argmax(-1).tolist()
    # Same adapter, same examples; only padding differs from the server's batches.
    assert float(np.mean(preds == test.labels)) == pytest.approx(final, abs=1.5 / len(test))
    pipe = pipeline("text-classification", model=str(out))
    assert [r["label"] for r in pipe(texts[:8], truncation=True)] == [
        ("rotten", "fresh")[i] for i in preds[:8]]

    own = json.loads((run / "evaluation.json").read_text())  # written by the run itself
    assert own["round"] == 1 and sum(map(sum, own["confusion_matrix"])) == 48
    assert own["accuracy"] == pytest.approx(final, abs=1e-12)
    capsys.readouterr()
    assert main(["evaluate", str(run)]) == 0
    measured = json.loads((run / "evaluation.json").read_text())
    assert measured["labels"] == ["rotten", "fresh"] and measured["examples"] == 48
    assert measured["accuracy"] == pytest.approx(final, abs=1.5 / len(test))
    assert "Confusion matrix" in (run / "report.html").read_text()  # redrawn with it


@pytest.mark.slow
def test_shakespeare_export_measures_and_continues_as_the_run(tmp_path, capsys, smollm2_cache):
    """One short round of ``shakespeare`` on SmolLM2-135M; its merged export, loaded with
    ``AutoModelForCausalLM`` alone, has the run's test loss (hence perplexity) on the run's
    test texts, and ``fedlora predict`` continues a text as the run's own model does."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedlora.tasks import smollm2_path

    t0 = time.perf_counter()
    smollm2_path()  # converted once a session (about 20 s unloaded), then cached
    t_convert = time.perf_counter() - t0
    # One site suffices (the export is under test, not the federation): half the model loads.
    run = run_in_process({**SMOLLM2_SHORT_RUN, "num-partitions": 1, "base-dtype": "float32",
                          "output-dir": str(tmp_path / "results"), "run-name": "lm"}, num_nodes=1)
    t_run = time.perf_counter() - t0 - t_convert
    last = json.loads((run / "metrics.json").read_text())["rounds"][-1]
    assert last["round"] == 1 and last["clients_accepted"] == 1
    assert not (run / "evaluation.json").exists()  # a causal LM has no confusion matrix

    out = tmp_path / "merged"
    assert main(["export", str(run), str(out), "--merged"]) == 0
    t_export = time.perf_counter() - t0 - t_convert - t_run
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.model_max_length == 16  # the run's max-length
    texts = _test_texts(run)
    assert len(texts) == 8
    nll, tokens = 0.0, 0
    with torch.no_grad():  # one text at a time: no padding at all
        for text in texts:
            ids = tok(text, truncation=True, return_tensors="pt").input_ids  # (1, width)
            if ids.shape[1] > 1:  # mean loss over its width - 1 predicted tokens
                nll += model(input_ids=ids, labels=ids).loss.item() * (ids.shape[1] - 1)
                tokens += ids.shape[1] - 1
    assert nll / tokens == pytest.approx(last["test_loss"], rel=1e-4)
    assert math.exp(nll / tokens) == pytest.approx(last["test_perplexity"], rel=1e-3)

    prompt = "My lord, I"
    capsys.readouterr()
    for folder in (run, out):  # the run's own model (peft, as its evaluation used it), the export
        assert main(["predict", str(folder), "--text", prompt, "--max-new-tokens", "5",
                     "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 2 and rows[0]["generated"] == rows[1]["generated"] != ""
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        greedy = model.generate(ids, max_new_tokens=5, do_sample=False,
                                pad_token_id=tok.pad_token_id)
    assert tok.decode(greedy[0, ids.shape[1]:], skip_special_tokens=True) == rows[1]["generated"]
    print(f"shakespeare export: conversion {t_convert:.1f} s, run {t_run:.1f} s, export "
          f"{t_export:.1f} s, total "
          f"{time.perf_counter() - t0:.1f} s; test loss {last['test_loss']:.4f}, "
          f"continuation {rows[1]['generated']!r}")
